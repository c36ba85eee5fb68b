"""Where real Caffe runs: one interface, three backends.

- ``chroot``: the root folder of porting/legacy_build.py, made with debootstrap and entered
  with ``unshare --mount`` + ``chroot``. Needs root privileges.
- ``docker`` (and ``podman``, whose command line is the same): an image built from
  docker/Dockerfile on a base image made locally from a debootstrap (as root) or
  mmdebstrap (as anyone) tree, so no registry is needed. The worker runs in a container
  with no network (``--network none``); its job folder and the reference code are bind
  mounts. Needs a running engine the user may talk to.
- ``rootless``: the same root folder made by ``mmdebstrap --mode=unshare`` and entered with
  ``unshare --user --map-root-user``: no privileges, no daemon, only user namespaces (and,
  to build, mmdebstrap, newuidmap and a /etc/subuid range).

A backend offers: ``unavailable()`` (one line saying what is missing for it to run here,
or None), ``build()``, ``status()`` (a dict ``format_status`` prints: the backend, the
image digest or the root's recipe hash, every pinned version), ``problem()`` (why real
Caffe cannot run now, or None), ``launch(command, binds, env, name)`` (argv and
environment of a process running ``command`` in the stack, with host folders bound
inside) and ``stop(name)`` (make sure what ``launch`` started under ``name`` is gone),
``shell()``.

``get_backend()`` picks one: the name given, else ``$PORTING_BACKEND``, else the first of
``BACKENDS`` that works here (said once on stderr).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from porting.errors import PortingError
from porting.legacy_build import (BUILD_HINT, CHROOT_ENV, HOST_CA_BUNDLE, INSIDE_REFERENCE, LAPACK_LINK,
                                  BLAS_LINK, RECIPE_DIR, RECIPE_FILES, REFERENCE_DIR, STACK, build_lock,
                                  build as build_root, chroot_argv, debootstrap, default_root, describe_stack,
                                  missing_tools, mmdebstrap_argv, recipe_hash, remove_tree, require_built,
                                  resolve_root, run_logged, status as root_status)

BACKENDS = ("chroot", "docker", "podman", "rootless")
IMAGE_REPO = "caffe-port-legacy"
BASE_IMAGE = "caffe-port-legacy-base:bullseye"  # made here from a minbase tree when absent
LABEL = "org.caffe-port-harness"
_chosen: str | None = None  # the backend "first that works" found, once per process
# Run in the image by ``status``: stack.json and the BLAS/LAPACK alternatives, as JSON.
_READ_STACK = f"""
import json, os
def link(p):
    try:
        return os.readlink(p)
    except OSError:
        return None
print(json.dumps({{"stack": json.load(open("/{STACK}")), "blas": link("/{BLAS_LINK}"), "lapack": link("/{LAPACK_LINK}")}}))
"""


def jobs_parent() -> Path:
    """Host folder holding the workers' job folders (bound into the stack at INSIDE_JOBS)."""
    return default_root().parent / "jobs"


class Backend:
    """The interface; see the module's docstring."""
    name = ""

    def unavailable(self) -> str | None:
        """What is missing for this backend to run here at all (one line), or None."""
        raise NotImplementedError

    def problem(self) -> str | None:
        """Why real Caffe cannot run through this backend now (one line: unavailable, or not built), or None."""
        raise NotImplementedError

    def require_ready(self) -> None:
        reason = self.problem()
        if reason:
            raise PortingError(reason)

    def build(self, rebuild=False, progress=True, snapshot=None, base_image=None, dry_run=False) -> str:
        """Build the stack when missing or its recipe changed; return where it is (root path or image tag)."""
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    def launch(self, command: list[str], binds=(), env: dict | None = None, name: str = "") -> tuple[list, dict]:
        """(argv, environment) of a process running ``command`` in the stack; ``binds``: (host path,
        path inside, "ro" or "rw"); ``env``: variables inside; ``name``: for ``stop``."""
        raise NotImplementedError

    def stop(self, name: str) -> None:
        """Make sure what ``launch(name=name)`` started is gone after its process group was
        killed; nothing to do for a process tree."""

    def shell(self) -> int:
        raise NotImplementedError


class RootBackend(Backend):
    """The root folder, entered as root (``chroot``) or from a user namespace (``rootless``)."""

    def __init__(self, name: str, root: str | os.PathLike | None = None):
        self.name, self.userns = name, name == "rootless"
        self.root = self.where = resolve_root(root)

    def unavailable(self) -> str | None:
        missing = missing_tools(("unshare", "chroot"))
        if missing:
            return missing
        if not self.userns:
            return None if os.geteuid() == 0 else "the chroot backend needs root privileges"
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            return ("the rootless backend needs unprivileged user namespaces, which this kernel refuses "
                    f"({(probe.stderr.strip().splitlines() or ['unshare failed'])[-1]}); as root: "
                    "sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000")
        return None

    def problem(self) -> str | None:
        try:
            require_built(self.root)
        except PortingError as err:
            return str(err)  # "ROOT: not built; how to build"
        return self.unavailable()

    def build(self, rebuild=False, progress=True, snapshot=None, base_image=None, dry_run=False) -> str:
        if base_image:
            raise PortingError(f"--base-image is for the docker and podman backends, not {self.name}")
        return str(build_root(self.root, rebuild=rebuild, progress=progress, snapshot=snapshot,
                              rootless=self.userns, dry_run=dry_run))

    def status(self) -> dict:
        return {"backend": self.name, **root_status(self.root)}

    def launch(self, command: list[str], binds=(), env: dict | None = None, name: str = "") -> tuple[list, dict]:
        return chroot_argv(self.root, command, binds, userns=self.userns), dict(CHROOT_ENV, **(env or {}))

    def shell(self) -> int:
        require_built(self.root)
        reason = self.unavailable()
        if reason:
            raise PortingError(reason)
        argv, env = self.launch(["/bin/bash", "-l"], [(REFERENCE_DIR, INSIDE_REFERENCE, "ro")],
                                {"PYTHONPATH": "/opt/porting", "PS1": "(legacy-caffe) \\w# "})
        return subprocess.call(argv, env=env)


class DockerBackend(Backend):
    """The image of docker/Dockerfile, run by ``docker`` or ``podman`` (``engine``)."""

    def __init__(self, engine: str = "docker"):
        self.name = self.engine = engine

    def image(self, snapshot: str | None = None) -> str:
        """``caffe-port-legacy:<12 hex>``: sha256 of the recipe (with the snapshot) and the Dockerfile."""
        digest = hashlib.sha256(recipe_hash(snapshot).encode() + (RECIPE_DIR / "Dockerfile").read_bytes())
        return f"{IMAGE_REPO}:{digest.hexdigest()[:12]}"

    @property
    def where(self) -> str:
        return self.image(os.environ.get("PORTING_DEBIAN_SNAPSHOT") or None)

    def _run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.engine, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def unavailable(self) -> str | None:
        missing = missing_tools((self.engine,))
        if missing:
            return missing
        try:
            probe = self._run(["info", "--format", "{{json .}}"], timeout=20)
        except subprocess.TimeoutExpired:
            return f"`{self.engine} info` gave no answer in 20 s"
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
            return f"the {self.engine} engine does not answer ({last}); start it (e.g. systemctl start {self.engine})"
        return None

    def _inspect(self, image: str) -> dict | None:
        found = self._run(["image", "inspect", image])
        return json.loads(found.stdout)[0] if found.returncode == 0 else None

    def problem(self) -> str | None:
        reason = self.unavailable()
        if reason:
            return reason
        if self._inspect(self.where) is None:
            return f"the legacy Caffe image {self.where} is not built; {BUILD_HINT.replace('build`', 'build --backend ' + self.engine + '`')}"
        return None

    # ------------------------------------------------------------ build

    def build(self, rebuild=False, progress=True, snapshot=None, base_image=None, dry_run=False) -> str:
        """Build the image when absent (or ``rebuild``); return its tag.

        ``base_image``: a local (or pullable) Debian bullseye image to build on; default
        ``BASE_IMAGE``, made from a minbase tree (``docker import``) when absent.
        """
        snapshot = snapshot or os.environ.get("PORTING_DEBIAN_SNAPSHOT") or None
        image = self.image(snapshot)
        base = base_image or BASE_IMAGE
        if dry_run:
            print(f"backend: {self.engine}\nimage: {image}\nbase image: {base}\nrecipe: {RECIPE_DIR} "
                  f"(sha256 {recipe_hash(snapshot)})\nreference code: {REFERENCE_DIR}")
            return image
        reason = self.unavailable()
        if reason:
            raise PortingError(reason)
        if not rebuild and self._inspect(image) is not None:
            return image
        folder = default_root().parent
        with build_lock(folder / f"image-{image.split(':')[1]}"):
            if not rebuild and self._inspect(image) is not None:
                return image  # built by another process while we waited
            log = folder / f"image-{image.split(':')[1]}.build.log"
            log.write_text(f"building {image} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
            started = time.monotonic()
            if base_image is None and self._inspect(base) is None:
                self._import_base(base, log, progress, snapshot)
            with tempfile.TemporaryDirectory(prefix="porting-image-") as context:
                self._context(Path(context))
                run_logged([self.engine, "build", "--network", "host", "-f", f"{context}/docker/Dockerfile",
                            "--build-arg", f"BASE_IMAGE={base}",
                            "--build-arg", f"PORTING_DEBIAN_SNAPSHOT={snapshot or ''}",
                            "--label", f"{LABEL}.recipe-sha256={recipe_hash(snapshot)}",
                            "--label", f"{LABEL}.base-image={base}",
                            "-t", image, context], log, progress, f"{self.engine} build")
        if progress:
            print(f"legacy Caffe image {image} built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        return image

    def _import_base(self, base: str, log: Path, progress: bool, snapshot: str | None) -> None:
        """``BASE_IMAGE`` from a bullseye minbase tree: debootstrap as root, mmdebstrap otherwise."""
        importer = [self.engine, "import", "--change", 'CMD ["/bin/bash"]', "-", base]
        if os.geteuid() == 0 and shutil.which("debootstrap"):
            tree = default_root().parent / f".base-tree-{os.getpid()}"
            try:
                debootstrap(tree, log, progress, snapshot)
                tar = subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", "-cf", "-", "."],
                                       stdout=subprocess.PIPE)
                run_logged(importer, log, progress, f"{self.engine} import", env=None, stdin=tar.stdout)
                tar.stdout.close()
                if tar.wait() != 0:
                    raise PortingError(f"tar of the base tree failed [full log: {log}]")
            finally:
                remove_tree(tree)
            return
        missing = missing_tools(("mmdebstrap", "newuidmap", "newgidmap"))
        if missing:
            raise PortingError(f"no base image {base}: making it needs debootstrap as root, or {missing}; "
                               "or pass --base-image with a local Debian bullseye image")
        maker = subprocess.Popen(mmdebstrap_argv(snapshot, provision=False), stdout=subprocess.PIPE,
                                 stderr=open(log, "ab"))
        run_logged(importer, log, progress, f"{self.engine} import", stdin=maker.stdout)
        maker.stdout.close()
        if maker.wait() != 0:
            raise PortingError(f"mmdebstrap of the base tree failed [full log: {log}]")

    @staticmethod
    def _context(context: Path) -> None:
        """The build context: docker/ (recipe, Dockerfile, the host's CA bundle) and reference/."""
        (context / "docker").mkdir()
        for name in RECIPE_FILES + ("Dockerfile",):
            shutil.copy2(RECIPE_DIR / name, context / "docker" / name)
        if HOST_CA_BUNDLE.is_file():  # for pip behind an egress proxy's CA
            shutil.copy2(HOST_CA_BUNDLE, context / "docker" / "build-ca.crt")
        (context / "reference").mkdir()
        for file in REFERENCE_DIR.glob("*.py"):
            shutil.copy2(file, context / "reference" / file.name)

    # ------------------------------------------------------------ use

    def status(self) -> dict:
        """The image's tag, digest and labels, and the stack read from the image (one container)."""
        snapshot = os.environ.get("PORTING_DEBIAN_SNAPSHOT") or None
        image = self.image(snapshot)
        info: dict = {"backend": self.engine, "engine": self.engine, "image": image,
                      "recipe_sha256": recipe_hash(snapshot), "built": False, "current": False}
        reason = self.unavailable()
        found = None if reason else self._inspect(image)
        if found is None:
            info["hint"] = reason or BUILD_HINT.replace("build`", f"build --backend {self.engine}`")
            return info
        labels = found.get("Config", {}).get("Labels") or {}
        shown = self._run(["run", *self._run_options(), "--entrypoint", "python3", image, "-c", _READ_STACK])
        if shown.returncode != 0:
            raise PortingError(f"cannot read the stack in {image}: {shown.stderr.strip()[-300:]}")
        inside = json.loads(shown.stdout)
        built_hash = labels.get(f"{LABEL}.recipe-sha256")
        info.update({"built": True, "current": built_hash == info["recipe_sha256"], "image_id": found["Id"],
                     "base_image": labels.get(f"{LABEL}.base-image"), "built_recipe_sha256": built_hash,
                     "built_at": found.get("Created", "")[:19], "snapshot": snapshot})
        info.update(describe_stack(inside["stack"], inside["blas"], inside["lapack"]))
        return info

    def _run_options(self) -> list[str]:
        """Options of every container: removed on exit, no network. Docker runs as the caller's
        uid so job files stay theirs; rootless podman's root already is the caller."""
        user = [] if self.engine == "podman" else ["--user", f"{os.getuid()}:{os.getgid()}"]
        return ["--rm", "--network", "none", *user]

    def launch(self, command: list[str], binds=(), env: dict | None = None, name: str = "") -> tuple[list, dict]:
        argv = [self.engine, "run", "-i", *self._run_options()]
        if name:
            argv += ["--name", f"porting-{name}"]
        for host, inside, mode in binds:
            argv += ["-v", f"{host}:{inside}:{mode}"]
        for key, value in dict({"HOME": "/tmp"}, **(env or {})).items():
            argv += ["-e", f"{key}={value}"]
        return argv + [self.where] + list(command), dict(os.environ)

    def stop(self, name: str) -> None:
        """Remove the container: killing the ``docker run`` client leaves it running."""
        try:
            self._run(["rm", "-f", f"porting-{name}"], timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def shell(self) -> int:
        self.require_ready()
        tty = ["-it"] if sys.stdin.isatty() else ["-i"]  # a piped script runs too
        return subprocess.call([self.engine, "run", *tty, *self._run_options(),
                                "-v", f"{REFERENCE_DIR}:{INSIDE_REFERENCE}:ro", "-e", "HOME=/tmp",
                                self.where, "/bin/bash", "-l"])


def make_backend(name: str, root: str | os.PathLike | None = None) -> Backend:
    if name in ("chroot", "rootless"):
        return RootBackend(name, root)
    if name in ("docker", "podman"):
        return DockerBackend(name)
    raise PortingError(f"unknown legacy backend {name!r} (choose one of {', '.join(BACKENDS)})")


def get_backend(name: str | Backend | None = None, root: str | os.PathLike | None = None) -> Backend:
    """The backend named (an instance passes through), else ``$PORTING_BACKEND``; a ``root``
    folder given without a name means a root-folder backend (chroot for root, else rootless);
    otherwise the first of ``BACKENDS`` that works here, said once on stderr."""
    global _chosen
    if isinstance(name, Backend):
        return name
    env = os.environ.get("PORTING_BACKEND") or None
    if name is None and root is not None and env not in ("chroot", "rootless"):
        name = "chroot" if os.geteuid() == 0 else "rootless"
    name = name or env or _chosen
    if name:
        return make_backend(name, root)
    reasons = []
    for candidate in BACKENDS:
        backend = make_backend(candidate, root)
        reason = backend.unavailable()
        if reason is None:
            print(f"porting: legacy Caffe runs through the {candidate} backend, the first of "
                  f"{', '.join(BACKENDS)} that works here (PORTING_BACKEND chooses)", file=sys.stderr)
            _chosen = candidate
            return backend
        reasons.append(f"{candidate}: {reason}")
    raise PortingError("no legacy backend works here: " + "; ".join(reasons))
