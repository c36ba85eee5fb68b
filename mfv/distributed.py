"""Ray, optional: the one home of starting or joining a Ray cluster for MFV's many-task
commands (`mfv means --classes-root`, `mfv sweep`).

``session(address, num_cpus, enabled)`` yields the ``ray`` module, initialised, or None
for in-process work: with ``enabled`` False (``--no-ray``), or when Ray is not installed
(a note says so; ``--address`` then is an error). Without ``address`` a new local cluster
is started with ``num_cpus`` CPUs (``address="local"``: never someone else's cluster
found through RAY_ADDRESS or /tmp/ray); with it, that cluster is joined (``ray start
--head`` printed its address). A Ray already initialised in this process (a test's
fixture, a notebook) is used as it is and left running; one started here is shut down
when the block ends. On a cluster of several machines, inputs and outputs must lie on a
filesystem every machine sees at the same path: tasks read and write files themselves.
"""
from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator

from porting.errors import PortingError

INSTALL_HINT = "pip install 'caffe-port-harness[distributed]'"


def import_ray():
    """The ``ray`` module, or None when it is not installed."""
    try:
        import ray
    except ImportError:
        return None
    return ray


def _note(text: str) -> None:
    print(f"mfv: {text}", file=sys.stderr)


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int = 2, enabled: bool = True, log=_note) -> Iterator:
    """The ``ray`` module ready for tasks, or None (in-process); see the module docstring."""
    if not enabled:
        if address:
            raise PortingError("--address and --no-ray contradict each other")
        yield None
        return
    ray = import_ray()
    if ray is None:
        if address:
            raise PortingError(f"--address needs Ray, which is not installed ({INSTALL_HINT})", address)
        log(f"Ray is not installed ({INSTALL_HINT}): working in-process")
        yield None
        return
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        with contextlib.suppress(Exception):
            ray.shutdown()
        where = address or "local"
        raise PortingError(f"cannot start or join a Ray cluster: {str(err).splitlines()[0] if str(err) else err}",
                           where) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT address must accept a TCP connection (Ray itself would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray://..., or a form Ray judges itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError, OverflowError) as err:
        raise PortingError(f"no Ray cluster answers there ({err.strerror or err})", address) from None


def cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised (``ray.get`` wraps it in a RayTaskError), else ``err``."""
    inner = getattr(err, "cause", None)
    return inner if isinstance(inner, BaseException) else err
