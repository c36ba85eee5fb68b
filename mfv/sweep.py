"""MFV sweeps: every facet of many units, as tasks on Ray (or in this process), resumable.

A sweep visualises facets 0..F-1 of each unit U: facet f starts from the unit's mean image
f (``mean_<f>.png`` in its folder of the means root, the layout ``mfv means`` writes;
``.jpg``, ``.jpeg`` or the float64 ``.npy`` when there is no PNG) with the sweep's seed.
The unit of work is a task: one unit and a batch of its facets, run as one batch by
``mfv.batch.run_facets`` (as `mfv facets` runs a unit's facets). A task writes, per
facet, into ``<out>/<U>/``: ``facet_<f>.png/.npy/_trace.json/_snapshots.npz`` (``mfv.loop.save_facet``),
``mean_<f>.png`` (the start image, 8-bit, for the gallery) and, last, ``facet_<f>.json``,
the facet's record (seed, start file and its SHA-256, final objective, seconds, worker).
Every file is written whole or not at all (``mfv.files``); a facet is done when its record
exists. A task retried after its worker died skips the facets its first attempt finished.

The driver alone writes ``<out>/manifest.json`` (whole or not at all): settings, model
digests, versions, units (class name, synset, start files), every done facet's record,
the failed tasks with their errors, and one entry per run of the sweep. A rerun with the
same settings resumes: facets with a record (in the manifest or on disk) are not run again.

Ray is optional: ``ray.init`` starts a local cluster (``workers`` CPUs) or joins one at
``address``; tasks ask for ``cpus_per_task`` CPUs and ``gpus_per_task`` GPUs (fractions
allowed; the net then lives on ``cuda``), are retried ``retries`` times when their worker
dies or they raise, and the net is loaded once per worker process (a per-process cache),
not per task. On a cluster, the model files, the means root and ``out`` must be visible at
the same paths on every node (a shared filesystem). Without Ray the same task function
runs in this process, one task after another, without retries.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from porting.errors import PortingError
from porting.files import file_digest

from mfv.batch import MEAN_SUFFIXES, read_mean
from mfv.distributed import cause, session
from mfv.files import save_json, save_png, truncating_uint8

SCHEMA = "caffe-port-harness/mfv-sweep"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Fault injection for tests: when this variable names a file that exists, the first task
# to remove it kills its own worker process (SIGKILL) right after saving a facet.
KILL_ONCE_ENV = "MFV_SWEEP_KILL_ONCE"
# settings that must agree for a rerun to resume into the same folder
RESUME_KEYS = ("prototxt_sha256", "caffemodel_sha256", "mean", "layer", "xy", "variant", "mode", "iterations",
               "seed", "snapshot_every")


@dataclass(frozen=True)
class Model:
    """What a worker needs to load the net (paths seen by every node)."""
    prototxt: str
    caffemodel: str | None
    mean: tuple = (104.0, 117.0, 123.0)
    device: str = "cpu"


@dataclass(frozen=True)
class Settings:
    """How every facet of the sweep runs (``mfv.batch.run_facets``'s arguments; the octave
    table of ``variant``, "mean": facets start from mean images)."""
    layer: str = "fc8"
    xy: int = 0
    variant: str = "mean"
    mode: str = "faithful"
    iterations: int | None = None     # stop each facet after N iterations (quick runs); None: the schedule
    seed: int = 1                     # every facet's seed (1: the authors' opt_from_mean.sh)
    snapshot_every: int = 0           # trace arrays every N iterations (0: none)


@dataclass(frozen=True)
class Unit:
    """A unit to sweep: its class (from a synset list, else None) and its start images
    (facet f starts from ``means[f]``)."""
    unit: int
    name: str | None
    synset: str | None
    means: tuple


@dataclass
class Task:
    unit: Unit
    facets: list


@dataclass
class Outcome:
    """What a sweep did: the manifest as written, and the failed tasks of this run."""
    manifest: dict
    ran: int = 0                                       # facets done by this run
    failed: list = field(default_factory=list)        # [{"unit", "facets", "error"}]


# --------------------------------------------------------------------------------------
# inputs: units, synsets, means
# --------------------------------------------------------------------------------------

def read_synset_list(path) -> list[tuple[str, str]]:
    """(WordNet id, class name) per line of a synset_words.txt (``porting.report.read_synset_list``);
    line u is unit u. The name is the first synonym."""
    from porting.report import read_synset_list as entries

    return [(wnid, words.split(",")[0].strip() or wnid) for wnid, words in entries(path)]


def start_file(folder: Path, facet: int) -> Path | None:
    """The start image of ``facet`` in a unit's means folder, or None."""
    for suffix in MEAN_SUFFIXES:
        path = folder / f"mean_{facet}{suffix}"
        if path.is_file():
            return path
    return None


def find_units(means_root, units: list[int], facets: int, synsets=None) -> list[Unit]:
    """The units' folders under ``means_root`` (named by the unit number, e.g. 498 or 0498,
    or, with a synset list, by the unit's WordNet id) and their first ``facets`` mean images.
    A missing folder or mean image is a PortingError naming it."""
    root = Path(means_root)
    if not root.is_dir():
        raise PortingError("no such folder (--means-root)", root)
    numbered = {}
    for child in root.iterdir():
        if child.is_dir() and child.name.isdigit():
            numbered.setdefault(int(child.name), child)
    table = read_synset_list(synsets) if synsets else None
    found = []
    for unit in units:
        wnid, name = table[unit] if table and unit < len(table) else (None, None)
        if table is not None and unit >= len(table):
            raise PortingError(f"unit {unit} has no line (the list has {len(table)})", synsets)
        folder = root / wnid if wnid and (root / wnid).is_dir() else numbered.get(unit)
        if folder is None:
            raise PortingError(f"no folder of mean images for unit {unit}"
                               + (f" (looked for {wnid} and {unit})" if wnid else f" (looked for {unit})"), root)
        starts = []
        for f in range(facets):
            path = start_file(folder, f)
            if path is None:
                raise PortingError(f"no mean_{f} image ({', '.join(MEAN_SUFFIXES)}) for facet {f} of "
                                   f"unit {unit}", folder)
            starts.append(str(path.resolve()))
        found.append(Unit(unit, name, wnid, tuple(starts)))
    return found


# --------------------------------------------------------------------------------------
# the task (runs on a worker)
# --------------------------------------------------------------------------------------

_NETS: dict = {}   # per process: Model -> FacetNet (a worker loads its net once)
_LOADS = [0]       # nets this process has loaded (in each facet's record)


def _net(model: Model):
    if model not in _NETS:
        import torch

        from porting.net import load_caffe

        from mfv.step import FacetNet

        net = FacetNet.from_caffe(load_caffe(model.prototxt, model.caffemodel), mean=model.mean)
        net.module.to(torch.device(model.device))
        _LOADS[0] += 1
        _NETS.clear()
        _NETS[model] = net
    return _NETS[model]


def _run_unit_facets(net, settings: Settings, unit: int, starts: list[np.ndarray]) -> list:
    """The facet work of one task: each start image's facet of ``unit``, all in one batch
    (``mfv.batch.run_facets``, as `mfv facets` runs them), as ``FacetResult``s."""
    from mfv import schedule
    from mfv.batch import run_facets

    return run_facets(net, [(unit, settings.seed, start) for start in starts], schedule.octaves_for(settings.variant),
                      layer=settings.layer, xy=settings.xy, mode=settings.mode, snapshot_every=settings.snapshot_every,
                      progress=False, iterations=settings.iterations)


def facet_name(facet: int) -> str:
    return f"facet_{facet}"


def record_path(out, unit: int, facet: int) -> Path:
    return Path(out) / str(unit) / f"{facet_name(facet)}.json"


def read_record(out, unit: int, facet: int) -> dict | None:
    """A facet's record, or None when it has none (or one that is not a record: run it again)."""
    try:
        record = json.loads(record_path(out, unit, facet).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("facet") == facet else None


def _fault_point() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def _ray_node() -> str | None:
    """The Ray node this task runs on (None outside Ray)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def facet_task(model: Model, settings: Settings, out: str, unit: Unit, facets: list[int]) -> list[dict]:
    """Run the facets of ``unit`` that have no record yet, write their outputs and records
    into ``<out>/<unit>/``, and return the records of all ``facets``."""
    from mfv.loop import save_facet

    folder = Path(out) / str(unit.unit)
    todo = [f for f in facets if read_record(out, unit.unit, f) is None]
    if todo:
        net = _net(model)
        starts = [read_mean(unit.means[f]) for f in todo]
        began = time.perf_counter()
        results = _run_unit_facets(net, settings, unit.unit, starts)
        seconds = time.perf_counter() - began
        for f, start, result in zip(todo, starts, results):
            saved = save_facet(result, folder, facet_name(f))
            save_png(folder / f"mean_{f}.png", truncating_uint8(start))
            last = result.records[-1]
            save_json(record_path(out, unit.unit, f), {
                "unit": unit.unit, "facet": f, "seed": settings.seed, "start": unit.means[f],
                "start_sha256": file_digest(unit.means[f]), "iterations": len(result.records),
                "objective": last.objective, "best_unit": last.best_unit, "best_value": last.best_value,
                "seconds": seconds / len(todo), "task_seconds": seconds, "task_facets": len(todo),
                "files": sorted([f"{unit.unit}/{Path(p).name}" for p in saved.values()]
                                + [f"{unit.unit}/mean_{f}.png"]),
                "worker": {"host": socket.gethostname(), "pid": os.getpid(), "device": model.device,
                           "ray_node": _ray_node(), "net_loads": _LOADS[0]},
                "finished": _now(),
            })
            _fault_point()
    return [read_record(out, unit.unit, f) for f in facets]


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------

def versions(ray_module=None) -> dict:
    import importlib.metadata

    import torch

    found = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    try:
        found["caffe-port-harness"] = importlib.metadata.version("caffe-port-harness")
    except importlib.metadata.PackageNotFoundError:
        pass
    if ray_module is not None:
        found["ray"] = ray_module.__version__
    return found


def sweep_settings(model: Model, settings: Settings) -> dict:
    return {"prototxt": model.prototxt, "prototxt_sha256": file_digest(model.prototxt),
            "caffemodel": model.caffemodel,
            "caffemodel_sha256": file_digest(model.caffemodel) if model.caffemodel else None,
            "mean": list(model.mean), **asdict(settings)}


def load_manifest(out) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PortingError(f"cannot read the sweep manifest: {err}", path) from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise PortingError(f"not a sweep manifest (schema {SCHEMA!r} expected)", path)
    return manifest


def _disk_records(out, units: list[Unit], facets: int) -> dict:
    """Records on disk of the units' first ``facets`` facets: {(unit, facet): record}."""
    found = {}
    for unit in units:
        for f in range(facets):
            record = read_record(out, unit.unit, f)
            if record is not None:
                found[(unit.unit, f)] = record
    return found


def _plan(units: list[Unit], done: set, facets: int, per_task: int) -> list[Task]:
    tasks = []
    for unit in units:
        missing = [f for f in range(facets) if (unit.unit, f) not in done]
        tasks += [Task(unit, missing[i:i + per_task]) for i in range(0, len(missing), per_task)]
    return tasks


def _error_text(err: BaseException) -> str:
    """One line: the task's error, type and message (unwrapped from Ray's RayTaskError)."""
    err = cause(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}".strip()


def run_sweep(model: Model, settings: Settings, units: list[Unit], out, facets: int = 10,
              facets_per_task: int | None = None, use_ray: bool = True, address: str | None = None,
              workers: int | None = None, cpus_per_task: float = 1, gpus_per_task: float = 0,
              retries: int = 2, progress: bool = True, gallery: bool = True, stop_after: int | None = None,
              log=None) -> Outcome:
    """Run every facet of ``units`` that is not done yet in ``out`` (see the module docstring).

    use_ray: Ray if it imports (else in-process; ``log`` says so), through ``mfv.distributed.session``
    (a Ray already initialised in this process is used as it is). workers: CPUs of a local
    cluster (default: this machine's). stop_after: stop after this many tasks (for tests
    and quick looks; the rest stays for a rerun). Returns the manifest and this run's failures.
    """
    log = log or (lambda text: print(f"mfv sweep: {text}", file=sys.stderr))
    with session(address, workers or os.cpu_count() or 1, enabled=use_ray, log=log) as ray:
        per_task = max(1, int(facets_per_task or facets))
        outcome = _sweep(ray, model, settings, units, Path(out).resolve(), facets, per_task, cpus_per_task,
                         gpus_per_task, retries, progress, stop_after, log)
    if gallery:
        from mfv.gallery import write_gallery

        write_gallery(out, outcome.manifest)
    return outcome


def _sweep(ray, model, settings, units, out, facets, per_task, cpus_per_task, gpus_per_task, retries, progress,
           stop_after, log) -> Outcome:
    if ray is not None:
        cluster = ray.cluster_resources()
        for kind, need in (("CPU", cpus_per_task), ("GPU", gpus_per_task)):
            if need > cluster.get(kind, 0):   # such a task would wait for ever
                raise PortingError(f"a task asks for {need:g} {kind}s and the Ray cluster has "
                                   f"{cluster.get(kind, 0):g}", place=f"--{kind.lower()}s-per-task")
    out.mkdir(parents=True, exist_ok=True)
    current = sweep_settings(model, settings)
    manifest = load_manifest(out)
    if manifest is not None:
        differ = [k for k in RESUME_KEYS if manifest["settings"].get(k) != current.get(k)]
        if differ:
            raise PortingError(f"this folder holds a sweep with other settings ({', '.join(differ)} differ): "
                               f"use another --out or the same settings", out / MANIFEST)
    else:
        manifest = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": _now(), "settings": current,
                    "units": {}, "facets": {}, "failed": [], "runs": []}
    manifest["settings"] = {**current, "facets": max(facets, manifest["settings"].get("facets", 0))}
    for unit in units:
        manifest["units"][str(unit.unit)] = {"name": unit.name, "synset": unit.synset, "means": list(unit.means)}
    for (u, f), record in _disk_records(out, units, facets).items():
        manifest["facets"].setdefault(str(u), {})[str(f)] = record   # done by a task the driver did not see end
    done = {(int(u), int(f)) for u, by in manifest["facets"].items() for f in by}
    tasks = _plan(units, done, facets, per_task)
    if stop_after is not None:
        tasks = tasks[:stop_after]
    planned = sum(len(t.facets) for t in tasks)
    run = {"started": _now(), "finished": None, "executor": None, "tasks": len(tasks), "facets_planned": planned,
           "facets_done": 0, "failed": 0, "seconds": None}
    manifest["runs"].append(run)
    outcome = Outcome(manifest)

    def prune_failed() -> None:   # a failure stays listed until all its facets are done
        manifest["failed"] = [f for f in manifest["failed"] if not all((f["unit"], x) in done for x in f["facets"])]

    prune_failed()
    last_write = [0.0]

    def write(force: bool = False) -> None:
        if force or time.monotonic() - last_write[0] > 2.0:
            save_json(out / MANIFEST, manifest)
            last_write[0] = time.monotonic()

    def finished(task: Task, records: list[dict] | None, error: BaseException | None) -> None:
        if records is not None:
            by_unit = manifest["facets"].setdefault(str(task.unit.unit), {})
            for record in records:
                by_unit[str(record["facet"])] = record
            done.update((task.unit.unit, r["facet"]) for r in records)
            outcome.ran += len(records)
            run["facets_done"] += len(records)
            prune_failed()
        else:
            entry = {"unit": task.unit.unit, "facets": task.facets, "error": _error_text(error), "at": _now()}
            outcome.failed.append(entry)
            manifest["failed"] = [f for f in manifest["failed"]
                                  if not (f["unit"] == task.unit.unit and f["facets"] == task.facets)] + [entry]
            run["failed"] += 1
            log(f"unit {task.unit.unit} facets {','.join(map(str, task.facets))} failed: {entry['error']}")
        write()

    from tqdm import tqdm

    bar = tqdm(total=planned, unit="facet", desc="sweep", disable=not progress, smoothing=0.1)
    units_left = {t.unit.unit: 0 for t in tasks}
    for t in tasks:
        units_left[t.unit.unit] += 1
    units_done = [0]

    def advance(task: Task) -> None:
        units_left[task.unit.unit] -= 1
        units_done[0] += units_left[task.unit.unit] == 0
        bar.set_postfix(units=f"{units_done[0]}/{len(units_left)}", failed=len(outcome.failed), refresh=False)
        bar.update(len(task.facets))

    began = time.perf_counter()
    manifest["versions"] = versions(ray)
    write(force=True)
    try:
        if ray is not None:
            cluster = ray.cluster_resources()
            run["executor"] = (f"ray {ray.__version__}: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} "
                               f"GPUs; {cpus_per_task:g} CPUs and {gpus_per_task:g} GPUs per task")
            _run_on_ray(ray, model, settings, out, tasks, cpus_per_task, gpus_per_task, retries, finished, advance)
        else:
            run["executor"] = "in-process"
            for task in tasks:
                try:
                    records = facet_task(model, settings, str(out), task.unit, task.facets)
                except Exception as err:  # reported in the manifest; the sweep goes on
                    finished(task, None, err)
                else:
                    finished(task, records, None)
                advance(task)
    finally:
        bar.close()
        run["finished"] = _now()
        run["seconds"] = time.perf_counter() - began
        write(force=True)
    return outcome


def _run_on_ray(ray, model, settings, out, tasks, cpus_per_task, gpus_per_task, retries, finished, advance) -> None:
    """Every task as a Ray task; ``finished`` and ``advance`` called as each ends. Interrupted,
    the tasks still pending are cancelled."""
    remote = ray.remote(facet_task).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                                            max_retries=retries, retry_exceptions=True)
    model_ref, settings_ref = ray.put(model), ray.put(settings)
    pending = {remote.remote(model_ref, settings_ref, str(out), t.unit, t.facets): t for t in tasks}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                records = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                finished(task, None, err)
            else:
                finished(task, records, None)
            advance(task)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
