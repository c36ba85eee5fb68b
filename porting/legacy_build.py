"""The legacy Caffe stack as a root folder: build it, describe it, enter it.

The root is a Debian bullseye tree made by ``debootstrap`` and provisioned by
``docker/provision.sh`` (the script the Dockerfile runs too). It lives at
``$PORTING_LEGACY_ROOT`` or ``~/.cache/caffe-port-harness/legacy-root``. A stamp file in
it, ``opt/porting/recipe.json``, holds the sha256 of the recipe (provision.sh, the pinned
package and wheel lists, record_versions.py, and the snapshot date if any): a changed
recipe rebuilds, an unchanged one makes ``build()`` a no-op that reads one small file.

Everything that enters the root goes through ``chroot_argv``: ``unshare --mount`` with
private propagation, so /proc, /dev, /sys and the bind mounts it makes vanish with the
process and nothing stays mounted on the host.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from porting.errors import PortingError

REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "docker"
REFERENCE_DIR = REPO / "reference"
RECIPE_FILES = ("provision.sh", "debian-packages.txt", "requirements-py2.txt", "record_versions.py")
MIRROR = "http://deb.debian.org/debian"
SNAPSHOT_MIRROR = "http://snapshot.debian.org/archive/debian/{}"
STAMP = "opt/porting/recipe.json"
STACK = "opt/porting/stack.json"
INSIDE_REFERENCE = "/opt/porting/reference"  # where reference/ appears inside the root
INSIDE_JOBS = "/opt/porting/jobs"  # per-worker job folders live under here
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_HINT = "build it with `porting env build` (or `make test`)"

# Runs inside the new mount namespace: mount what a Debian userland expects, bind the
# requested host folders, then become the root. Arguments: ROOT, then triples
# (host path, path inside, ro|rw), then "--", then the command.
_ENTER_SCRIPT = r"""
set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
while [ "$1" != "--" ]; do
  mount --bind "$1" "$root$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$root$2"; fi
  shift 3
done
shift
exec chroot "$root" "$@"
"""

CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": os.environ.get("TERM", "dumb"),
}


def default_root() -> Path:
    """``$PORTING_LEGACY_ROOT`` or ``~/.cache/caffe-port-harness/legacy-root``."""
    env = os.environ.get("PORTING_LEGACY_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "caffe-port-harness" / "legacy-root"


def resolve_root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser().absolute() if root is not None else default_root().absolute()


def recipe_hash(snapshot: str | None = None) -> str:
    """sha256 over the recipe files (name and bytes) and the snapshot date."""
    digest = hashlib.sha256()
    for name in RECIPE_FILES:
        digest.update(name.encode() + b"\0" + (RECIPE_DIR / name).read_bytes() + b"\0")
    digest.update(f"snapshot={snapshot or ''}".encode())
    return digest.hexdigest()


def read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def is_current(root: Path, snapshot: str | None = None) -> bool:
    stamp = read_stamp(root)
    return bool(stamp) and stamp.get("recipe_sha256") == recipe_hash(snapshot)


def require_built(root: Path) -> None:
    """PortingError saying how to build when the root is missing or half-made."""
    if read_stamp(root) is None or not (root / STACK).is_file():
        raise PortingError(f"the legacy Caffe root is not built; {BUILD_HINT}", root)


def chroot_argv(root: Path, command: list[str], binds: list[tuple[Path, str, str]] = ()) -> list[str]:
    """argv that runs ``command`` inside ``root`` in a private mount namespace.

    ``binds``: (host path, absolute path inside the root, "ro" or "rw"). ``--kill-child``
    takes the chrooted process down with ``unshare`` when the latter is killed.
    """
    argv = ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child", "--",
            "/bin/sh", "-c", _ENTER_SCRIPT, "porting-enter", str(root)]
    for host, inside, mode in binds:
        argv += [str(host), inside, mode]
    return argv + ["--"] + list(command)


def _check_tools(names: tuple[str, ...]) -> None:
    for name in names:
        if shutil.which(name) is None:
            raise PortingError(f"`{name}` not found on PATH (apt-get install debootstrap util-linux coreutils)")


def _require_privileges(action: str) -> None:
    if os.geteuid() != 0:
        raise PortingError(
            f"{action} the legacy Caffe root needs root privileges (debootstrap, chroot, mount "
            "namespaces); run it as root, or use the Docker recipe: "
            "docker build -f docker/Dockerfile -t caffe-port-legacy .")


@contextlib.contextmanager
def _lock(root: Path):
    """One builder at a time per root (flock on a file beside it)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(argv: list[str], log: Path, progress: bool, step: str, env: dict | None = None) -> None:
    """Run a build step, appending its output to ``log`` (and echoing it when ``progress``)."""
    with open(log, "ab") as sink:
        sink.write(f"\n=== {step}: {' '.join(argv[:12])}\n".encode())
        sink.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        tail: list[bytes] = []
        for line in proc.stdout:
            sink.write(line)
            tail = (tail + [line])[-15:]
            if progress:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        code = proc.wait()
    if code != 0:
        last = b"".join(tail).decode(errors="replace").strip().splitlines()
        raise PortingError(f"build step '{step}' failed (exit {code}): {last[-1] if last else ''} "
                           f"[full log: {log}]")


def _remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


def _remove_stale_builds(root: Path) -> None:
    """Temp trees of builds whose process is gone (killed mid-build)."""
    for old in root.parent.glob(f".{root.name}.build-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            _remove_tree(old)


def build(root: str | os.PathLike | None = None, rebuild: bool = False, progress: bool = True,
          snapshot: str | None = None) -> Path:
    """Build the legacy root if it is missing or its recipe changed; return its path.

    A no-op (one small file read) when the root is current. Builds into a temp folder
    beside the root and renames it into place, so an interrupted build leaves nothing
    half-made at the root path. ``snapshot`` (e.g. "20240801T000000Z", default
    ``$PORTING_DEBIAN_SNAPSHOT``) takes packages from snapshot.debian.org at that date.
    Needs root privileges; without them raises PortingError pointing at the Dockerfile.
    """
    root = resolve_root(root)
    snapshot = snapshot or os.environ.get("PORTING_DEBIAN_SNAPSHOT") or None
    if not rebuild and is_current(root, snapshot):
        return root
    _require_privileges("building")
    _check_tools(("debootstrap", "unshare", "chroot"))
    with _lock(root):
        if not rebuild and is_current(root, snapshot):
            return root  # built by another process while we waited
        _remove_stale_builds(root)
        tmp = root.parent / f".{root.name}.build-{os.getpid()}"
        log = root.parent / f"{root.name}.build.log"
        log.write_text(f"building {root} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        started = time.monotonic()
        try:
            _build_into(tmp, log, progress, snapshot)
            stamp = {"recipe_sha256": recipe_hash(snapshot), "snapshot": snapshot,
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "build_seconds": round(time.monotonic() - started, 1)}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            if root.exists():
                os.rename(root, old)
            os.rename(tmp, root)
            _remove_tree(old)
        except BaseException:
            _remove_tree(tmp)
            raise
    if progress:
        print(f"legacy Caffe root built at {root} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return root


def _build_into(tmp: Path, log: Path, progress: bool, snapshot: str | None) -> None:
    mirror = SNAPSHOT_MIRROR.format(snapshot) if snapshot else MIRROR
    _remove_tree(tmp)
    cache = tmp.parent / "debootstrap-cache"  # downloaded .debs, reused by the next build
    cache.mkdir(exist_ok=True)
    _run_logged(["debootstrap", "--variant=minbase", f"--cache-dir={cache}", "bullseye", str(tmp), mirror],
                log, progress, "debootstrap")
    recipe = tmp / "opt/porting/recipe"
    recipe.mkdir(parents=True)
    for name in RECIPE_FILES:
        shutil.copy2(RECIPE_DIR / name, recipe / name)
    shutil.copy2("/etc/resolv.conf", tmp / "etc/resolv.conf")
    env = dict(CHROOT_ENV)
    if snapshot:
        env["PORTING_DEBIAN_SNAPSHOT"] = snapshot
    ca_inside = "/opt/porting/build-ca.crt"
    if HOST_CA_BUNDLE.is_file():  # the host's trust store (may hold an egress proxy's CA)
        shutil.copy2(HOST_CA_BUNDLE, tmp / ca_inside.lstrip("/"))
        env["PORTING_CA_BUNDLE"] = ca_inside
    _run_logged(chroot_argv(tmp, ["/bin/sh", "/opt/porting/recipe/provision.sh"]), log, progress,
                "provision", env=env)
    (tmp / ca_inside.lstrip("/")).unlink(missing_ok=True)


def status(root: str | os.PathLike | None = None) -> dict:
    """Where the root lives and what it holds, read from files in it (no chroot).

    Keys: root, built, current, recipe_sha256 (of the recipe here), built_recipe_sha256,
    built_at, snapshot, caffe, blas, lapack, pinned_debian {name: {pinned, installed}},
    python2 {python, numpy, scipy, ...}, python3 {python, caffe, numpy, protobuf},
    debian (every installed package -> version).
    """
    root = resolve_root(root)
    stamp = read_stamp(root)
    snapshot = (stamp or {}).get("snapshot")
    info: dict = {"root": str(root), "built": stamp is not None, "current": is_current(root, snapshot),
                  "recipe_sha256": recipe_hash(snapshot)}
    if stamp is None:
        info["hint"] = BUILD_HINT
        return info
    stack = json.loads((root / STACK).read_text())
    pinned = {}
    for line in stack["pinned_debian"]:
        name, version = line.split("=", 1)
        pinned[name] = {"pinned": version, "installed": stack["debian"].get(name)}
    info.update({
        "built_recipe_sha256": stamp.get("recipe_sha256"), "built_at": stamp.get("built_at"),
        "snapshot": snapshot, "caffe": stack["python3"]["caffe"],
        "caffe_debian": stack["debian"].get("python3-caffe"),
        "blas": _alternative(root, "libblas.so.3-x86_64-linux-gnu"),
        "lapack": _alternative(root, "liblapack.so.3-x86_64-linux-gnu"),
        "pinned_debian": pinned, "pinned_wheels": stack["pinned_wheels"],
        "python2": stack["python2"], "python3": stack["python3"], "debian": stack["debian"],
    })
    return info


def _alternative(root: Path, name: str) -> str | None:
    """The update-alternatives target of ``name`` inside the root (read from its symlink)."""
    try:
        return os.readlink(root / "etc/alternatives" / name)
    except OSError:
        return None


def format_status(info: dict) -> str:
    """A readable table of ``status()``."""
    rows = [("root", info["root"]),
            ("built", "yes" if info["built"] else f"no ({info.get('hint', '')})")]
    if info["built"]:
        rows += [("current", "yes" if info["current"] else "no: recipe changed, `porting env build` rebuilds"),
                 ("recipe sha256", info["built_recipe_sha256"]),
                 ("built at", info["built_at"]),
                 ("debian snapshot", info["snapshot"] or "(none: deb.debian.org bullseye)"),
                 ("caffe", f"{info['caffe']} (python3-caffe {info['caffe_debian']}, CPU)"),
                 ("BLAS", info["blas"]), ("LAPACK", info["lapack"])]
        for name, v in info["pinned_debian"].items():
            mark = "" if v["pinned"] == v["installed"] else f"  (pinned {v['pinned']})"
            rows.append((f"deb {name}", f"{v['installed']}{mark}"))
        rows.append(("deb (all)", f"{len(info['debian'])} packages (--json lists them)"))
        rows += [(f"py3 {k}", v) for k, v in info["python3"].items()]
        rows += [(f"py2 {k}", v) for k, v in info["python2"].items()]
    else:
        rows.append(("recipe sha256", info["recipe_sha256"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def shell(root: str | os.PathLike | None = None) -> int:
    """An interactive bash inside the root (reference/ mounted at /opt/porting/reference)."""
    root = resolve_root(root)
    require_built(root)
    _require_privileges("entering")
    argv = chroot_argv(root, ["/bin/bash", "-l"], [(REFERENCE_DIR, INSIDE_REFERENCE, "ro")])
    env = dict(CHROOT_ENV, PYTHONPATH="/opt/porting", PS1="(legacy-caffe) \\w# ")
    return subprocess.call(argv, env=env)
