"""The legacy Caffe stack as a root folder: the recipe, building the folder, entering it.

The recipe is ``docker/`` in a source checkout and ``porting/legacy_recipe/`` in an
installed wheel (pyproject.toml maps the one onto the other); the code that runs inside
is the ``reference`` package, found by importing it. The root is a Debian bullseye tree
provisioned by the recipe's ``provision.sh`` (the script the Dockerfile runs too). It
lives at ``$PORTING_LEGACY_ROOT`` or ``~/.cache/caffe-port-harness/legacy-root``. A stamp
file in it, ``opt/porting/recipe.json``, holds the sha256 of the recipe (provision.sh, the
pinned package and wheel lists, record_versions.py, and the snapshot date if any): a
changed recipe rebuilds, an unchanged one makes ``build()`` a no-op that reads one small file.

Two ways to make and enter the folder (porting/legacy_backends.py names them):
- as root (``chroot`` backend): ``debootstrap``, then provision.sh in the chroot;
- as anyone (``rootless`` backend): ``mmdebstrap --mode=unshare`` (user namespaces, the
  user's /etc/subuid range) streams the provisioned tree as a tar that is unpacked owned
  by the user, so entering it later needs only ``unshare --map-root-user``.
Everything that enters the root goes through ``chroot_argv``: ``unshare --mount`` with
private propagation (plus ``--user --map-root-user --pid`` when rootless), so /proc,
/dev, /sys and the bind mounts it makes vanish with the process and nothing stays
mounted on the host.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import reference
from porting.errors import PortingError

PACKAGE = Path(__file__).resolve().parent


def _find_recipe_dir() -> Path:
    """``porting/legacy_recipe`` (an installed wheel) or ``docker/`` beside the package (a checkout)."""
    for folder in (PACKAGE / "legacy_recipe", PACKAGE.parent / "docker"):
        if (folder / "provision.sh").is_file():
            return folder
    return PACKAGE / "legacy_recipe"


RECIPE_DIR = _find_recipe_dir()
REFERENCE_DIR = Path(reference.__file__).resolve().parent
RECIPE_FILES = ("provision.sh", "debian-packages.txt", "requirements-py2.txt", "record_versions.py")
MIRROR = "http://deb.debian.org/debian"
SNAPSHOT_MIRROR = "http://snapshot.debian.org/archive/debian/{}"
SUITE = "bullseye"
STAMP = "opt/porting/recipe.json"
STACK = "opt/porting/stack.json"
INSIDE_REFERENCE = "/opt/porting/reference"  # where reference/ appears inside the stack
INSIDE_JOBS = "/opt/porting/jobs"  # a worker's job folder appears here (each worker its own mount)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_HINT = "build it with `porting env build` (or `make test`)"
BLAS_LINK = "etc/alternatives/libblas.so.3-x86_64-linux-gnu"
LAPACK_LINK = "etc/alternatives/liblapack.so.3-x86_64-linux-gnu"

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
        try:
            data = (RECIPE_DIR / name).read_bytes()
        except OSError as err:
            raise PortingError(f"the legacy recipe is incomplete in this installation ({err.strerror})",
                               RECIPE_DIR / name) from None
        digest.update(name.encode() + b"\0" + data + b"\0")
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


def chroot_argv(root: Path, command: list[str], binds: list[tuple[Path, str, str]] = (),
                userns: bool = False) -> list[str]:
    """argv that runs ``command`` inside ``root`` in a private mount namespace.

    ``binds``: (host path, absolute path inside the root, "ro" or "rw"). ``--kill-child``
    takes the chrooted process down with ``unshare`` when the latter is killed.
    ``userns``: also a user namespace where the caller is root (``--map-root-user``) and a
    PID namespace (an unprivileged user may mount /proc only for its own): no privileges needed.
    """
    argv = ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child"]
    if userns:
        argv[1:1] = ["--user", "--map-root-user", "--pid"]
    argv += ["--", "/bin/sh", "-c", _ENTER_SCRIPT, "porting-enter", str(root)]
    for host, inside, mode in binds:
        argv += [str(host), inside, mode]
    return argv + ["--"] + list(command)


# The Debian package of each host tool a backend uses.
TOOL_PACKAGES = {"debootstrap": "debootstrap", "mmdebstrap": "mmdebstrap", "newuidmap": "uidmap",
                 "newgidmap": "uidmap", "unshare": "util-linux", "chroot": "coreutils", "tar": "tar",
                 "docker": "docker.io", "podman": "podman"}


def missing_tools(names: tuple[str, ...]) -> str | None:
    """One line naming the tools of ``names`` not on PATH and the apt-get line that installs them."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return None
    packages = " ".join(dict.fromkeys(TOOL_PACKAGES[name] for name in missing))
    return f"{', '.join(f'`{m}`' for m in missing)} not found on PATH (as root: apt-get install -y {packages})"


def subid_problem() -> str | None:
    """Why ``mmdebstrap --mode=unshare`` cannot map the ids a Debian tree holds, or None."""
    user = pwd.getpwuid(os.getuid()).pw_name
    for table in ("/etc/subuid", "/etc/subgid"):
        try:
            rows = [line.split(":") for line in Path(table).read_text().splitlines() if line.count(":") == 2]
        except OSError:
            rows = []
        if not any(row[0] in (user, str(os.getuid())) for row in rows):
            free = max([int(start) + int(count) for _, start, count in rows
                        if start.isdigit() and count.isdigit()] + [100000])  # after every range given out
            return (f"no range for {user} in {table} (as root: usermod --add-subuids {free}-{free + 65535} "
                    f"--add-subgids {free}-{free + 65535} {user})")
    return None


def _require_privileges(action: str) -> None:
    if os.geteuid() != 0:
        raise PortingError(
            f"{action} the legacy Caffe root as a chroot needs root privileges (debootstrap, chroot, "
            "mount namespaces); as another user choose PORTING_BACKEND=rootless (user namespaces) "
            "or PORTING_BACKEND=docker (docker/Dockerfile)")


@contextlib.contextmanager
def build_lock(path: Path):
    """One builder at a time per root or image (flock on a file beside ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_logged(argv: list[str], log: Path, progress: bool, step: str, env: dict | None = None,
               stdout=None, stdin=None) -> None:
    """Run a build step, appending its output to ``log`` (and echoing it when ``progress``).

    ``stdout``: a file object that takes the step's standard output instead (a tar stream);
    its standard error still goes to the log. ``stdin``: a file object it reads (default none).
    """
    with open(log, "ab") as sink:
        sink.write(f"\n=== {step}: {shlex.join(argv)[:400]}\n".encode())
        sink.flush()
        proc = subprocess.Popen(argv, stdout=stdout if stdout is not None else subprocess.PIPE,
                                stderr=subprocess.PIPE if stdout is not None else subprocess.STDOUT,
                                env=env, stdin=stdin if stdin is not None else subprocess.DEVNULL)
        started = time.monotonic()
        tail: list[bytes] = []
        for line in proc.stderr if stdout is not None else proc.stdout:
            sink.write(line)
            tail = (tail + [line])[-15:]
            if progress:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        code = proc.wait()
        sink.write(f"=== {step}: exit {code} after {time.monotonic() - started:.0f} s\n".encode())
    if code != 0:
        last = b"".join(tail).decode(errors="replace").strip().splitlines()
        raise PortingError(f"build step '{step}' failed (exit {code}): {last[-1] if last else ''} "
                           f"[full log: {log}]")


def remove_tree(path: Path) -> None:
    """Remove a folder even where the tree made some of its folders read-only."""
    def writable_then_retry(func, name, _exc):
        os.chmod(os.path.dirname(name), 0o700)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, 0o700)
        func(name)

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=writable_then_retry)


def _remove_stale_builds(root: Path) -> None:
    """Temp trees of builds whose process is gone (killed mid-build)."""
    for old in root.parent.glob(f".{root.name}.build-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            remove_tree(old)


def build(root: str | os.PathLike | None = None, rebuild: bool = False, progress: bool = True,
          snapshot: str | None = None, rootless: bool = False, dry_run: bool = False) -> Path:
    """Build the legacy root if it is missing or its recipe changed; return its path.

    A no-op (one small file read) when the root is current. Builds into a temp folder
    beside the root and renames it into place, so an interrupted build leaves nothing
    half-made at the root path. ``snapshot`` (e.g. "20240801T000000Z", default
    ``$PORTING_DEBIAN_SNAPSHOT``) takes packages from snapshot.debian.org at that date.
    ``rootless``: mmdebstrap in user namespaces (no privileges; needs mmdebstrap, newuidmap
    and a /etc/subuid range); else debootstrap + chroot, which need root privileges.
    ``dry_run``: print what would be done (the recipe, the steps) and change nothing.
    """
    root = resolve_root(root)
    snapshot = snapshot or os.environ.get("PORTING_DEBIAN_SNAPSHOT") or None
    current = not rebuild and is_current(root, snapshot)
    if dry_run:
        print(f"root: {root} ({'current, nothing to do' if current else 'would be built'})\n"
              f"recipe: {RECIPE_DIR} (sha256 {recipe_hash(snapshot)})\nreference code: {REFERENCE_DIR}")
        if not current:
            steps = (["mmdebstrap --mode=unshare ... | tar -x (provision.sh in a customize hook)"] if rootless
                     else ["debootstrap --variant=minbase " + SUITE, "provision.sh in the chroot"])
            print("steps: " + "; ".join(steps))
        return root
    if current:
        return root
    if rootless:
        as_user = os.geteuid() != 0  # root's mmdebstrap needs no id mapping
        problem = (missing_tools(("mmdebstrap", "unshare", "tar") + (("newuidmap", "newgidmap") if as_user else ()))
                   or (subid_problem() if as_user else None))
        if problem:
            raise PortingError(f"the rootless legacy root cannot be built: {problem}")
    else:
        _require_privileges("building")
        problem = missing_tools(("debootstrap", "unshare", "chroot"))
        if problem:
            raise PortingError(problem)
    with build_lock(root):
        if not rebuild and is_current(root, snapshot):
            return root  # built by another process while we waited
        _remove_stale_builds(root)
        tmp = root.parent / f".{root.name}.build-{os.getpid()}"
        log = root.parent / f"{root.name}.build.log"
        log.write_text(f"building {root} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        started = time.monotonic()
        try:
            (_build_rootless if rootless else _build_into)(tmp, log, progress, snapshot)
            stamp = {"recipe_sha256": recipe_hash(snapshot), "snapshot": snapshot,
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "build_seconds": round(time.monotonic() - started, 1),
                     "built_by": "mmdebstrap --mode=unshare" if rootless else "debootstrap"}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            if root.exists():
                os.rename(root, old)
            os.rename(tmp, root)
            remove_tree(old)
        except BaseException:
            remove_tree(tmp)
            raise
    if progress:
        print(f"legacy Caffe root built at {root} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return root


def mirror_url(snapshot: str | None) -> str:
    return SNAPSHOT_MIRROR.format(snapshot) if snapshot else MIRROR


def debootstrap(tmp: Path, log: Path, progress: bool, snapshot: str | None) -> None:
    """A bullseye minbase tree at ``tmp`` (root only); downloaded .debs are kept beside it for the next build."""
    remove_tree(tmp)
    cache = tmp.parent / "debootstrap-cache"
    cache.mkdir(exist_ok=True)
    run_logged(["debootstrap", "--variant=minbase", f"--cache-dir={cache}", SUITE, str(tmp), mirror_url(snapshot)],
               log, progress, "debootstrap")


def _build_into(tmp: Path, log: Path, progress: bool, snapshot: str | None) -> None:
    debootstrap(tmp, log, progress, snapshot)
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
    run_logged(chroot_argv(tmp, ["/bin/sh", "/opt/porting/recipe/provision.sh"]), log, progress,
               "provision", env=env)
    (tmp / ca_inside.lstrip("/")).unlink(missing_ok=True)


def mmdebstrap_argv(snapshot: str | None, provision: bool) -> list[str]:
    """argv of ``mmdebstrap`` writing a bullseye minbase tree as a tar on stdout (as root or,
    in user namespaces, as anyone); with ``provision``, the recipe runs inside it first."""
    argv = ["mmdebstrap", "--variant=minbase", "--mode=auto", "--format=tar"]
    if provision:
        files = " ".join(shlex.quote(str(RECIPE_DIR / name)) for name in RECIPE_FILES)
        # the chroot build's clean environment: none of the caller's (proxy CA paths, PIP_*)
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in CHROOT_ENV.items())
        env += f" PORTING_DEBIAN_SNAPSHOT={shlex.quote(snapshot or '')}"
        argv += ["--customize-hook=mkdir -p \"$1/opt/porting/recipe\"",
                 f"--customize-hook=copy-in {files} /opt/porting/recipe"]
        if HOST_CA_BUNDLE.is_file():
            argv += [f"--customize-hook=copy-in {shlex.quote(str(HOST_CA_BUNDLE))} /opt/porting"]
            env += " PORTING_CA_BUNDLE=/opt/porting/ca-certificates.crt"
        argv += [f"--customize-hook=chroot \"$1\" env -i {env} sh /opt/porting/recipe/provision.sh",
                 "--customize-hook=rm -f \"$1/opt/porting/ca-certificates.crt\""]
    return argv + [SUITE, "-", mirror_url(snapshot)]


def _build_rootless(tmp: Path, log: Path, progress: bool, snapshot: str | None) -> None:
    """mmdebstrap's tar unpacked by the user: every file owned by them (root inside a user namespace)."""
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    untar = subprocess.Popen(["tar", "-x", "-f", "-", "-C", str(tmp), "--no-same-owner", "--exclude=./dev/*"],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        run_logged(mmdebstrap_argv(snapshot, provision=True), log, progress, "mmdebstrap + provision",
                   stdout=untar.stdin)
    finally:
        untar.stdin.close()
        err = untar.stderr.read().decode(errors="replace").strip()
        code = untar.wait()
    if code != 0:
        raise PortingError(f"unpacking the rootless tree failed (tar exit {code}): {err.splitlines()[-1:]}")


def describe_stack(stack: dict, blas: str | None, lapack: str | None) -> dict:
    """The status fields read from the stack's stack.json and its BLAS/LAPACK alternatives."""
    pinned = {}
    for line in stack["pinned_debian"]:
        name, version = line.split("=", 1)
        pinned[name] = {"pinned": version, "installed": stack["debian"].get(name)}
    return {"caffe": stack["python3"]["caffe"], "caffe_debian": stack["debian"].get("python3-caffe"),
            "blas": blas, "lapack": lapack, "pinned_debian": pinned, "pinned_wheels": stack["pinned_wheels"],
            "python2": stack["python2"], "python3": stack["python3"], "debian": stack["debian"]}


def status(root: str | os.PathLike | None = None) -> dict:
    """Where the root lives and what it holds, read from files in it (no chroot).

    Keys: root, built, current, recipe_sha256 (of the recipe here), built_recipe_sha256,
    built_at, built_by, snapshot, caffe, blas, lapack, pinned_debian {name: {pinned, installed}},
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
    info.update({"built_recipe_sha256": stamp.get("recipe_sha256"), "built_at": stamp.get("built_at"),
                 "built_by": stamp.get("built_by", "debootstrap"), "snapshot": snapshot})
    info.update(describe_stack(json.loads((root / STACK).read_text()),
                               _readlink(root / BLAS_LINK), _readlink(root / LAPACK_LINK)))
    return info


def _readlink(path: Path) -> str | None:
    """An update-alternatives target inside the root (read from its symlink)."""
    try:
        return os.readlink(path)
    except OSError:
        return None


def format_status(info: dict) -> str:
    """A readable table of a backend's ``status()``."""
    rows = [("backend", info.get("backend", "chroot"))]
    if "image" in info:
        rows += [("engine", info["engine"]), ("image", info["image"])]
        if info["built"]:
            rows += [("image digest", info["image_id"]), ("base image", info.get("base_image"))]
    else:
        rows.append(("root", info["root"]))
    rows.append(("built", "yes" if info["built"] else f"no ({info.get('hint', '')})"))
    if info["built"]:
        rows += [("current", "yes" if info["current"] else "no: recipe changed, `porting env build` rebuilds"),
                 ("recipe sha256", info["built_recipe_sha256"]),
                 ("built at", info["built_at"])]
        if "built_by" in info:
            rows.append(("built by", info["built_by"]))
        rows += [("debian snapshot", info["snapshot"] or "(none: deb.debian.org bullseye)"),
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
