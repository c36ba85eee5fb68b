"""The resource budget: what a net needs, computed from its graph's shapes (Python ints,
exact at any size) before anything is allocated, and the limits it must stay within.

Memory: float32 bytes of every parameter blob and of every layer's tops (the net keeps
each layer's outputs, see ``CaffeNet.layer_outputs``; the inputs count as the Input
layer's tops), and as much again for their gradients when a backward is planned.
A layer's own workspace (``workspace()``: Caffe's column buffer of a convolution, one
image's worth) counts too; other temporaries (a padded copy) do not.
Work: multiply-adds (or comparisons) of one forward as the port computes it, the sum of
the layers' ``work()``; three times that with a backward.
Both scale with the batch: the declared shapes hold the prototxt's batch (the first
dim of the first input); another batch multiplies activations and work by batch / that.

Limits, each settable by a command-line option or an environment variable:
- memory: ``--memory-limit`` / ``PORTING_MEMORY_LIMIT``, bytes or with a unit (``512M``,
  ``4G``, ``1.5T`` and ``4GiB`` are binary, ``4GB`` decimal; ``none``: no limit). Default:
  what this process can still get: MemAvailable of /proc/meminfo, and no more than an
  address-space limit (RLIMIT_AS) leaves above the process's current size (VmSize);
  no limit where neither is known.
- work: ``--work-limit`` / ``PORTING_WORK_LIMIT``, a count (``1e13``, ``10T``: decimal
  units; ``none``). Default 10^13 multiply-adds: VGG-16 needs 1.5e10 per image, and 10^13
  takes from tens of minutes to hours on a few CPU cores.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction

from porting.errors import PortingError, shown

try:
    import resource
except ImportError:  # not a Unix
    resource = None

BYTES_PER_VALUE = 4  # float32
DEFAULT_WORK_LIMIT = 10**13
MEMORY_ENV, WORK_ENV = "PORTING_MEMORY_LIMIT", "PORTING_WORK_LIMIT"
_PREFIXES = "KMGTP"
_NO_LIMIT = ("none", "off", "unlimited")


def parse_size(text: str, what: str = "--memory-limit") -> int | None:
    """Bytes from ``4G``, ``512M``, ``1.5T``, ``4GiB`` (binary), ``4GB`` (decimal) or a plain
    number; None for ``none``. PortingError naming ``what`` when it cannot be read."""
    return _parse(text, what, "a size such as 4G, 512M or 17179869184", binary=True)


def parse_count(text: str, what: str = "--work-limit") -> int | None:
    """A count from ``1e13``, ``10T`` (decimal units) or a plain number; None for ``none``."""
    return _parse(text, what, "a count such as 1e13 or 10T", binary=False)


def _parse(text: str, what: str, example: str, binary: bool) -> int | None:
    t = str(text).strip()
    if t.lower() in _NO_LIMIT:
        return None
    m = re.fullmatch(r"([0-9]{0,30}\.?[0-9]{1,30}(?:[eE][+]?[0-9]{1,2})?)\s*(?:([kKmMgGtTpP])(i?)([bB]?)|([bB]?))", t)
    if m is None or (not binary and any(m.group(g) for g in (3, 4, 5))):
        raise PortingError(f"cannot read {shown(t)!r} as {example} (or none)", what)
    number, prefix, iec, byte = m.group(1), m.group(2), m.group(3), m.group(4)
    factor = 1
    if prefix:
        base = 1024 if binary and (iec or not byte) else 1000
        factor = base ** (_PREFIXES.index(prefix.upper()) + 1)
    value = int(Fraction(number) * factor)
    if value <= 0:
        raise PortingError(f"{shown(t)!r} is not a positive limit (give none for no limit)", what)
    return value


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable (/proc/meminfo), at most what
    RLIMIT_AS leaves above the current VmSize; None where neither is known."""
    known = []
    meminfo = _proc_kib("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        known.append(meminfo)
    if resource is not None:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            known.append(max(soft - (_proc_kib("/proc/self/status", "VmSize:") or 0), 0))
    return min(known) if known else None


def _proc_kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Budget:
    """Limits (None: none) and the run they are for: ``batch`` (None: the prototxt's) and
    whether a backward is planned."""

    memory: int | None = None
    work: int | None = None
    batch: int | None = None
    backward: bool = False

    @classmethod
    def default(cls, memory: str | int | None = None, work: str | int | None = None,
                batch: int | None = None, backward: bool = False) -> "Budget":
        """Limits as given (an int, or text as the options take), else from
        PORTING_MEMORY_LIMIT / PORTING_WORK_LIMIT, else the machine's memory and 10^13."""
        if memory is None and os.environ.get(MEMORY_ENV):
            memory_limit = parse_size(os.environ[MEMORY_ENV], MEMORY_ENV)
        elif memory is None:
            memory_limit = available_memory()
        else:
            memory_limit = memory if isinstance(memory, int) else parse_size(memory)
        if work is None and os.environ.get(WORK_ENV):
            work_limit = parse_count(os.environ[WORK_ENV], WORK_ENV)
        elif work is None:
            work_limit = DEFAULT_WORK_LIMIT
        else:
            work_limit = work if isinstance(work, int) else parse_count(work)
        return cls(memory_limit, work_limit, batch, backward)


@dataclass
class Needs:
    """What a graph needs at ``batch``: per layer (name, bytes, work), in layer order."""

    batch: int
    backward: bool
    layers: list[tuple[str, int, int]]

    @property
    def memory(self) -> int:
        return sum(b for _, b, _ in self.layers)

    @property
    def work(self) -> int:
        return sum(w for _, _, w in self.layers)

    def summary(self) -> str:
        """One line: memory and work, e.g. for ``porting inspect``."""
        return (f"needs {format_bytes(self.memory)} for {self._what()} at batch {self.batch}, "
                f"{self.work:.3g} multiply-adds per {'forward and backward' if self.backward else 'forward'}")

    def _what(self) -> str:
        return "parameters, activations and their gradients" if self.backward else "parameters and activations"


def needs(graph, batch: int | None = None, backward: bool = False) -> Needs:
    """What ``graph`` (a porting.graph.Graph) needs; layers without a module (unsupported,
    in an ``inspect`` graph) count nothing."""
    first = next(iter(graph.inputs.values()), ())
    declared = first[0] if first and first[0] > 0 else 1
    run = declared if batch is None else batch
    scale = Fraction(run, declared)
    copies = 2 if backward else 1
    rows = []
    for spec in graph.layers:
        module = spec.module
        if module is None:
            continue
        params = sum(_count(s) for s in module.param_shapes)
        tops = sum(_count(s) for s in module.top_shapes)
        memory = copies * BYTES_PER_VALUE * (params + _ceil(tops * scale) + module.workspace())
        rows.append((spec.name, memory, (3 if backward else 1) * _ceil(module.work() * scale)))
    return Needs(run, backward, rows)


def check(graph, budget: Budget, source: object = None) -> Needs:
    """Needs of ``graph`` at the budget's batch; PortingError (naming the layer that needs
    the most) when they pass a limit."""
    need = needs(graph, budget.batch, budget.backward)
    if budget.memory is not None and need.memory > budget.memory:
        name, own, _ = max(need.layers, key=lambda row: row[1])
        raise PortingError(f"needs {format_bytes(need.memory)} for {need._what()} at batch {need.batch} "
                           f"(this layer {format_bytes(own)}), above the limit of {format_bytes(budget.memory)} "
                           f"(set --memory-limit or {MEMORY_ENV})", source, f"layer {shown(name)}")
    if budget.work is not None and need.work > budget.work:
        name, _, own = max(need.layers, key=lambda row: row[2])
        run = "a forward and backward" if need.backward else "a forward"
        raise PortingError(f"needs {need.work:.3g} multiply-adds for {run} at batch {need.batch} "
                           f"(this layer {own:.3g}), above the limit of {budget.work:.3g} "
                           f"(set --work-limit or {WORK_ENV})", source, f"layer {shown(name)}")
    return need


def format_bytes(n: int) -> str:
    """Binary units with one decimal: 512 B, 1.5 KiB, 17.2 GiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def add_options(parser) -> None:
    """``--memory-limit`` and ``--work-limit`` for a command that builds a net."""
    parser.add_argument("--memory-limit", metavar="SIZE",
                        help=f"refuse a net needing more memory (e.g. 4G, 512M, none; default ${MEMORY_ENV} "
                             "or the memory available)")
    parser.add_argument("--work-limit", metavar="COUNT",
                        help=f"refuse a net needing more multiply-adds per forward (e.g. 1e13, none; "
                             f"default ${WORK_ENV} or 1e13)")


def from_args(args, batch: int | None = None, backward: bool = False) -> Budget:
    """The Budget of a command's parsed ``--memory-limit`` / ``--work-limit``."""
    return Budget.default(getattr(args, "memory_limit", None), getattr(args, "work_limit", None), batch, backward)


def _count(shape) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _ceil(value: Fraction | int) -> int:
    return -(-value.numerator // value.denominator) if isinstance(value, Fraction) else int(value)
