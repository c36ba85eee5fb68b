"""Host client of the reference worker: real Caffe 1.0 (and Python 2.7) from the harness.

``Worker`` keeps one ``python3 -m reference.worker`` process running inside the legacy
stack, through one of the backends of porting/legacy_backends.py (a chroot, a container
with no network, or a user namespace), so a test session or an optimisation loop pays
Caffe's start-up once. Requests are JSON lines over its pipes; arrays travel as
.npy/.npz files in a per-worker job folder on the host (under
``~/.cache/caffe-port-harness/jobs``), bound into the stack at /opt/porting/jobs; input
files (prototxt, caffemodel, images) enter that folder once per worker, by hard link
when on the same filesystem, else by copy, named by their sha256.

Failures are raised, never swallowed: a failed Caffe CHECK kills the worker, and the
client raises ``CaffeError`` with glog's "Check failed" line and the layer it came from,
then starts a fresh worker on the next call; a worker silent past ``timeout`` seconds is
killed (``CaffeTimeout``); a missing root or image raises ``PortingError`` saying how to build it.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from porting.errors import PortingError
from porting.files import copy_atomic, file_digest
from porting.legacy_backends import Backend, get_backend, jobs_parent
from porting.legacy_build import INSIDE_JOBS, INSIDE_REFERENCE, REFERENCE_DIR


def _passed_through(name: str) -> bool:
    """Host variables the worker inherits: OPENBLAS_* and thread counts, so one machine can
    reproduce another's rounding in Caffe (OPENBLAS_CORETYPE=Zen, Sandybridge, ...)."""
    return name.startswith("OPENBLAS_") or name in ("GOTO_NUM_THREADS", "OMP_NUM_THREADS")


_GLOG_FATAL = re.compile(r"^F\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)$")
_LAYER_STEP = re.compile(r"\] (Creating layer|Setting up|Forward layer|Backward layer) (.+?)\s*$")
_STEP_WORDS = {"Creating layer": "while creating it", "Setting up": "while setting it up",
               "Forward layer": "in its forward pass", "Backward layer": "in its backward pass"}


class CaffeError(PortingError):
    """Caffe refused a job: ``check`` (glog's fatal line, or the Python error of the
    worker), ``layer`` (the layer it came from, when known), ``log_tail`` (last stderr lines)."""

    def __init__(self, problem: str, path: object = None, layer: str | None = None,
                 log_tail: str = "", check: str | None = None):
        super().__init__(problem, path, f"layer {layer}" if layer else None)
        self.layer, self.log_tail, self.check = layer, log_tail, check or problem


class CaffeTimeout(CaffeError):
    """The worker gave no answer in time and was killed."""


class CaffeResult(dict):
    """Arrays of one job by key (``blob/<name>/data`` ...), plus ``provenance``: versions,
    BLAS, seed, sha256 of every input (prototxt, caffemodel, arrays)."""

    def __init__(self, arrays=(), provenance: dict | None = None):
        super().__init__(arrays)
        self.provenance = provenance or {}


def parse_caffe_log(lines: list[str]) -> tuple[str | None, str | None]:
    """(fatal message with its source place, layer) from a worker's stderr lines.

    The message is glog's last F line (e.g. "eltwise_layer.cpp:34] Check failed: ...");
    the layer comes from the last "Creating layer"/"Setting up" line of Caffe's net set-up,
    or the worker's own "Forward layer"/"Backward layer" marker before it.
    """
    fatal_at = None
    for i in range(len(lines) - 1, -1, -1):
        if _GLOG_FATAL.match(lines[i]):
            fatal_at = i
            break
    if fatal_at is None:
        return None, None
    where, message = _GLOG_FATAL.match(lines[fatal_at]).groups()
    for line in reversed(lines[:fatal_at]):
        step = _LAYER_STEP.search(line)
        if step:
            return f"{message} [{where.strip()}, {_STEP_WORDS[step.group(1)]}]", step.group(2)
    return f"{message} [{where.strip()}]", None


class Worker:
    """One long-lived reference worker (Python 3 + pycaffe in the legacy stack).

    ``backend``: a backend name ("chroot", "docker", "podman", "rootless") or object; by
    default ``get_backend(root=root)``: $PORTING_BACKEND, or a root-folder backend when
    ``root`` is given, or the first that works. ``timeout``: seconds a job may take before the worker is killed (CaffeTimeout).
    Calls from several threads are served one at a time.
    ``blas_threads``: OPENBLAS_NUM_THREADS inside (None: the host's, else OpenBLAS's default, all cores);
    recorded in every result's provenance. ``env``: more variables inside, over the host's
    OPENBLAS_* ones (e.g. {"OPENBLAS_CORETYPE": "Prescott"}: another BLAS kernel path, so
    Caffe's own float32 rounding can be varied; ``openblas()`` names the kernel in use).
    Use as a context manager, or call ``close()``.
    """

    def __init__(self, root: str | os.PathLike | None = None, timeout: float = 600.0,
                 start_timeout: float = 120.0, blas_threads: int | None = None, start: bool = True,
                 backend: str | Backend | None = None, env: dict | None = None):
        self.backend = get_backend(backend, root)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.backend.require_ready()
        self.timeout, self.start_timeout, self.blas_threads = timeout, start_timeout, blas_threads
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.jobdir = jobs_parent() / self.name
        self._inside = INSIDE_JOBS
        self._proc: subprocess.Popen | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=3000)
        self._log_count = 0  # lines read so far; a job's own lines are those after its mark
        self._log_mark = 0
        self._drain: threading.Thread | None = None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._busy = threading.Lock()
        self._inputs: dict[tuple, str] = {}  # (dev, inode, size, mtime) -> name inside the job folder
        self.versions_python3: dict | None = None
        self.starts = 0
        _remove_orphan_jobdirs(jobs_parent())
        (self.jobdir / "in").mkdir(parents=True, exist_ok=True)
        if start:
            self.start()

    # ------------------------------------------------------------ process

    def start(self) -> None:
        """Start the worker process (a no-op when it runs) and wait for it to be ready."""
        if self._proc is not None and self._proc.poll() is None:
            return
        argv, env = self.backend.launch(
            ["/bin/sh", "-c", 'cd /opt/porting && exec python3 -m reference.worker "$0"', self._inside],
            [(REFERENCE_DIR, INSIDE_REFERENCE, "ro"), (self.jobdir, INSIDE_JOBS, "rw")], self.inside_env(),
            name=self.name)
        self._log.clear()
        self._log_count = self._log_mark = 0
        self._buffer = b""
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env, start_new_session=True)
        self._drain = threading.Thread(target=self._drain_stderr, args=(self._proc,), daemon=True)
        self._drain.start()
        self.starts += 1
        self._sent = time.monotonic()
        ready = self._read_reply(time.monotonic() + self.start_timeout, "start")
        self.versions_python3 = ready["versions"]

    def inside_env(self) -> dict:
        """The variables the worker runs with inside the stack (besides the backend's own)."""
        env = dict(PYTHONPATH="/opt/porting", PYTHONDONTWRITEBYTECODE="1", GLOG_logtostderr="1")
        env.update({k: v for k, v in os.environ.items() if _passed_through(k)})
        env.update(self.env)
        if self.blas_threads is not None:
            env["OPENBLAS_NUM_THREADS"] = str(int(self.blas_threads))
        return env

    def openblas(self, timeout: float = 120.0) -> dict:
        """{"core", "threads"}: OpenBLAS's name for the kernel path Caffe uses in this worker's
        environment and its thread count (``openblas_get_corename()`` and
        ``openblas_get_num_threads()`` of the stack's libblas.so.3 in a process started with
        ``inside_env()``; OpenBLAS picks the kernel from the CPU unless OPENBLAS_CORETYPE says
        otherwise, e.g. "Zen", "Sandybridge", "Prescott")."""
        code = ("import ctypes; lib = ctypes.CDLL('/usr/lib/x86_64-linux-gnu/libblas.so.3'); "
                "lib.openblas_get_corename.restype = ctypes.c_char_p; "
                "print(lib.openblas_get_corename().decode(), lib.openblas_get_num_threads())")
        argv, env = self.backend.launch(["python3", "-c", code], [], self.inside_env())
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        words = done.stdout.split()
        if done.returncode != 0 or len(words) != 2:
            raise CaffeError(f"cannot ask OpenBLAS for its kernel: {done.stderr.strip()[-300:]}")
        return {"core": words[0], "threads": int(words[1])}

    def _drain_stderr(self, proc: subprocess.Popen) -> None:
        for raw in proc.stderr:
            self._log.append(raw.decode(errors="replace").rstrip("\n"))
            self._log_count += 1

    def close(self) -> None:
        """Stop the worker and remove its job folder."""
        self._stop(graceful=True)
        shutil.rmtree(self.jobdir, ignore_errors=True)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop(graceful=False)
        except Exception:
            pass

    def _stop(self, graceful: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if graceful and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        killed = proc.poll() is None
        if killed or graceful:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the python2.7 child too
            except ProcessLookupError:
                pass
        proc.wait()
        if killed:
            self.backend.stop(self.name)  # a container outlives its killed client
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self._drain is not None:
            self._drain.join(timeout=5)

    @property
    def log(self) -> list[str]:
        """The worker's recent stderr lines (glog and Python)."""
        return list(self._log)

    # ------------------------------------------------------------ messages

    def _read_reply(self, deadline: float, what: str, prototxt: object = None) -> dict:
        proc = self._proc
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    self._stop(graceful=False)
                    raise CaffeTimeout(f"the Caffe worker gave no answer to {what} in "
                                       f"{deadline - self._sent:.0f} s; killed it (the next call starts "
                                       f"a new one)", prototxt, log_tail="\n".join(self._log))
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise self._died(what, prototxt)
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _died(self, what: str, prototxt: object) -> CaffeError:
        proc = self._proc
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        code = proc.returncode
        self._stop(graceful=False)
        lines = list(self._log)
        own = lines[max(len(lines) - (self._log_count - self._log_mark), 0):]  # this job's lines
        message, layer = parse_caffe_log(own)
        tail = "\n".join(lines[-40:])
        if message is None:
            last = next((s for s in reversed(lines) if s.strip()), "(no output)")
            message = f"the Caffe worker exited (status {code}) during {what}: {last.strip()}"
        return CaffeError(message, prototxt, layer, tail, check=message)

    def _request(self, op: str, args: dict, timeout: float | None = None, prototxt: object = None) -> dict:
        with self._busy:
            return self._request_unlocked(op, args, timeout, prototxt)

    def _request_unlocked(self, op: str, args: dict, timeout: float | None, prototxt: object) -> dict:
        if self._proc is None or self._proc.poll() is not None:
            self._stop(graceful=False)
            self.start()
        rid = next(self._ids)
        self._log_mark = self._log_count
        line = json.dumps({"id": rid, "op": op, "args": args, "arrays": []}) + "\n"
        self._sent = time.monotonic()
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._died(op, prototxt) from None
        reply = self._read_reply(self._sent + (self.timeout if timeout is None else timeout), op, prototxt)
        if reply.get("id") != rid:
            self._stop(graceful=False)
            raise CaffeError(f"protocol error: reply {reply.get('id')} to request {rid}", prototxt)
        if not reply["ok"]:
            raise CaffeError(reply["error"], prototxt, log_tail=reply.get("traceback", ""))
        return reply["result"]

    # ------------------------------------------------------------ files

    def _file_inside(self, path: str | os.PathLike) -> str:
        """Path inside the root of a host file, placed in the job folder once per content."""
        path = Path(path)
        try:
            st = path.stat()
        except OSError as err:
            raise PortingError(f"cannot read: {err.strerror}", path) from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._inputs:
            digest = file_digest(path)
            name = digest + "".join(path.suffixes[-1:])
            target = self.jobdir / "in" / name
            if not target.exists():
                tmp = target.with_name(name + ".tmp")
                try:
                    os.link(path, tmp)
                except OSError:
                    shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            self._inputs[key] = name
        return f"{self._inside}/in/{self._inputs[key]}"

    def _call_dir(self) -> tuple[Path, str]:
        name = f"call-{next(self._ids)}"
        (self.jobdir / name).mkdir()
        return self.jobdir / name, f"{self._inside}/{name}"

    @staticmethod
    def _load_npz(path: Path) -> CaffeResult:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        provenance = json.loads(arrays.pop("provenance.json").tobytes()) if "provenance.json" in arrays else {}
        return CaffeResult(arrays, provenance)

    # ------------------------------------------------------------ operations

    def run_net(self, prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None,
                inputs: dict[str, np.ndarray] | None = None, blobs="all",
                top_diffs: dict[str, np.ndarray] | None = None, capture_tops=True, params: bool = False,
                timeout: float | None = None, net_backward: bool = False, phase: str = "test",
                seed: int | None = None) -> CaffeResult:
        """Run the net in real Caffe (TEST phase unless ``phase="train"``); every array float32 NCHW.

        ``inputs``: blob name -> array (an input of another shape reshapes the net).
        ``top_diffs``: blob name -> diff to inject after the forward pass; backward then
        runs from the last layer writing that blob down to the first (force_backward on).
        Keys: ``blob/<name>/data`` and, after a backward, ``blob/<name>/diff`` (Caffe's
        view: in-place layers overwrite); ``top/<layer>/<i>/data|diff`` (each layer's own
        outputs, taken before any in-place layer overwrote them; ``capture_tops`` may
        also be a list of layer names); ``param/<layer>/<i>`` when ``params``, and
        ``param/<layer>/<i>/diff`` (this backward's parameter gradient) when ``params`` and
        ``top_diffs``.
        ``net_backward`` (instead of ``top_diffs``): Caffe's Net::Forward then Net::Backward,
        each loss top's diff seeded with its loss weight as Caffe's own training does, on
        the net as written (an input blob gets a diff only with ``force_backward: true`` in
        the prototxt); adds ``loss`` (the float32 sum Net::Forward returns) and every diff key.
        ``blobs``: "all" or a list of blob names.
        ``phase``: "test" or "train" (Caffe's TRAIN phase: the layers its include/exclude
        rules keep there; Dropout draws masks, BatchNorm uses batch statistics).
        ``seed``: ``caffe.set_random_seed(seed)`` right before each forward, so a TRAIN
        Dropout draws masks a port can reproduce (porting.layers.neuron.seed_dropout).
        A net with data layers (Data, ImageData...) cannot run here without their sources:
        give ``porting.layers.data_layers.caffe_net_with_inputs(graph)`` written as a prototxt.
        """
        if phase not in ("test", "train"):
            raise ValueError(f"phase must be 'test' or 'train', got {phase!r}")
        call_host, call_inside = self._call_dir()
        try:
            def put(group: dict | None, prefix: str) -> dict:
                paths = {}
                for i, (name, value) in enumerate((group or {}).items()):
                    file = f"{prefix}{i}.npy"
                    np.save(call_host / file, np.ascontiguousarray(value, dtype=np.float32))
                    paths[name] = f"{call_inside}/{file}"
                return paths

            args = {"prototxt": self._file_inside(prototxt),
                    "caffemodel": self._file_inside(caffemodel) if caffemodel else None,
                    "inputs": put(inputs, "input"), "top_diffs": put(top_diffs, "diff"),
                    "blobs": blobs if blobs == "all" else list(blobs),
                    "capture_tops": capture_tops if isinstance(capture_tops, bool) else list(capture_tops),
                    "params": params, "out": f"{call_inside}/out.npz"}
            if net_backward:
                args["net_backward"] = True
            if phase != "test":
                args["phase"] = phase
            if seed is not None:
                args["seed"] = int(seed)
            result = self._request("run_net", args, timeout, prototxt)
            out = self._load_npz(call_host / "out.npz")
            out.provenance = result["provenance"]
            return out
        finally:
            shutil.rmtree(call_host, ignore_errors=True)

    def make_weights(self, prototxt: str | os.PathLike, out_path: str | os.PathLike, filler="gaussian",
                     std: float = 0.01, bias_filler="constant", bias_std: float = 0.01,
                     bias_value: float = 0.0, seed: int = 0, timeout: float | None = None) -> dict:
        """Write a caffemodel for ``prototxt`` with weights drawn by Caffe's own fillers.

        ``filler``/``bias_filler``: a Caffe filler type ("gaussian" uses ``std``/``bias_std``,
        "constant" uses ``bias_value``; "msra", "xavier", "uniform", ...) or a dict of
        FillerParameter fields. Seeded with ``caffe.set_random_seed(seed)``; the file is
        Caffe's ``net.save``. Returns the provenance (with the output's sha256).
        """
        weight_spec = _filler_spec(filler, std=std, value=0.0)
        bias_spec = _filler_spec(bias_filler, std=bias_std, value=bias_value)
        call_host, call_inside = self._call_dir()
        out_path = Path(out_path)
        try:
            result = self._request("make_weights", {
                "prototxt": self._file_inside(prototxt), "out": f"{call_inside}/weights.caffemodel",
                "weight_filler": weight_spec, "bias_filler": bias_spec, "seed": int(seed)}, timeout, prototxt)
            copy_atomic(call_host / "weights.caffemodel", out_path)
            return result["provenance"]
        finally:
            shutil.rmtree(call_host, ignore_errors=True)

    def train(self, train_prototxt: str | os.PathLike, out_path: str | os.PathLike,
              deploy_prototxt: str | os.PathLike | None = None, iterations: int = 200, seed: int = 0,
              base_lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, classes: int = 4,
              noise: float = 0.5, scale: float = 1.0, heldout: int = 16, data_blob: str = "data",
              label_blob: str = "label", loss_blob: str = "loss", timeout: float | None = None) -> CaffeResult:
        """Train ``train_prototxt`` with real Caffe's SGD solver and write the trained caffemodel.

        The training net has Input layers for ``data_blob`` (N x C x H x W) and
        ``label_blob`` (N) and a loss top ``loss_blob`` (e.g. SoftmaxWithLoss). Each of
        ``iterations`` steps feeds a fresh batch of seeded synthetic images of ``classes``
        classes (reference/caffe_ops.py SyntheticImages: per-class channel offsets and
        stripes plus Gaussian noise of std ``noise``, times ``scale``; float32 NCHW, no
        BGR/0-255 convention) and runs ``solver.step(1)``: SGD, fixed learning rate
        ``base_lr``, ``momentum``, ``weight_decay``, CPU, SolverParameter.random_seed =
        ``seed`` (fillers and Dropout), so a run repeats exactly. BatchNorm layers train in
        TRAIN phase, so their moving statistics and factor (blob 2) accumulate. The file is
        Caffe's ``net.save`` of the training net (data and loss layers included, as Caffe's
        own snapshots are), written to ``out_path`` atomically. With ``deploy_prototxt``,
        Caffe checks that the deploy net loads it and that every deploy layer with blobs
        was trained. Returns arrays ``data``/``label`` (``heldout`` fresh images of the same
        generator, for testing) and ``provenance``: ``loss_first``, ``loss_last``,
        ``losses`` (every iteration), ``train_seconds``, the solver text, the data recipe,
        the output's sha256 and Caffe's version.
        """
        if int(iterations) < 1 or int(classes) < 2 or int(heldout) < 1:
            raise PortingError(f"need iterations >= 1, classes >= 2, heldout >= 1 (got {iterations}, "
                               f"{classes}, {heldout})", train_prototxt)
        call_host, call_inside = self._call_dir()
        out_path = Path(out_path)
        try:
            result = self._request("train", {
                "train_prototxt": self._file_inside(train_prototxt), "out": f"{call_inside}/trained.caffemodel",
                "deploy_prototxt": self._file_inside(deploy_prototxt) if deploy_prototxt else None,
                "iterations": int(iterations), "seed": int(seed), "base_lr": float(base_lr),
                "momentum": float(momentum), "weight_decay": float(weight_decay), "classes": int(classes),
                "noise": float(noise), "scale": float(scale), "heldout": int(heldout), "data_blob": str(data_blob),
                "label_blob": str(label_blob), "loss_blob": str(loss_blob),
                "heldout_out": f"{call_inside}/heldout.npz"}, timeout, train_prototxt)
            copy_atomic(call_host / "trained.caffemodel", out_path)
            out = self._load_npz(call_host / "heldout.npz")
            out.provenance = result["provenance"]
            return out
        finally:
            shutil.rmtree(call_host, ignore_errors=True)

    def py2(self, op: str, timeout: float | None = None, **kwargs) -> CaffeResult:
        """Run a Python 2.7 op (reference/py2_ops.py) in the 2016 stack.

        Keyword values: ndarrays travel as .npy files, ``Path`` values as files placed in
        the root (the op gets their path inside), bytes as files too; the rest as JSON.
        Returns the op's arrays and plain values together, with ``provenance``.
        """
        call_host, call_inside = self._call_dir()
        try:
            args = {}
            for i, (key, value) in enumerate(kwargs.items()):
                if isinstance(value, np.ndarray):
                    np.save(call_host / f"arg{i}.npy", value)
                    args[key] = {"__npy__": f"{call_inside}/arg{i}.npy"}
                elif isinstance(value, Path):
                    args[key] = {"__file__": self._file_inside(value)}
                elif isinstance(value, bytes):
                    (call_host / f"arg{i}.bin").write_bytes(value)
                    args[key] = {"__file__": f"{call_inside}/arg{i}.bin"}
                else:
                    args[key] = value
            result = self._request("py2", {"op": op, "args": args, "out": f"{call_inside}/out.npz"}, timeout)
            out = self._load_npz(call_host / "out.npz") if result["npz"] else CaffeResult()
            out.update(result["values"])
            out.provenance = result["provenance"]
            return out
        finally:
            shutil.rmtree(call_host, ignore_errors=True)

    def versions(self, timeout: float | None = None) -> dict:
        """{"python3": Caffe side versions and BLAS, "python2": the 2016 stack's versions}."""
        return self._request("version", {"python2": True}, timeout)


def _filler_spec(filler, std: float, value: float) -> dict:
    if isinstance(filler, dict):
        return dict(filler)
    spec = {"type": str(filler)}
    if filler == "gaussian":
        spec["std"] = float(std)
    elif filler == "constant":
        spec["value"] = float(value)
    return spec


def _remove_orphan_jobdirs(jobs: Path) -> None:
    """Job folders of host processes that no longer exist (killed without close())."""
    for folder in jobs.glob("*-*") if jobs.is_dir() else ():
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)
