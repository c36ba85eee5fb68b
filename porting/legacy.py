"""The pinned legacy Caffe 1.0 stack, seen from the host.

Build side (``porting.legacy_build``): the recipe and the root folder; backends
(``porting.legacy_backends``): chroot, docker/podman, rootless, behind one interface,
``get_backend``. Worker side (``porting.legacy_worker``): ``Worker``, ``CaffeResult``,
``CaffeError``, ``CaffeTimeout``. ``add_parser(subparsers)`` adds ``porting env build|status|shell``.
"""
from __future__ import annotations

import json

from porting.legacy_backends import BACKENDS, get_backend
from porting.legacy_build import default_root, format_status
from porting.legacy_worker import CaffeError, CaffeResult, CaffeTimeout, Worker


def add_parser(subparsers) -> None:
    """``porting env build|status|shell``."""
    env = subparsers.add_parser("env", help="the legacy Caffe 1.0 stack (build, status, shell)")
    sub = env.add_subparsers(dest="env_command", required=True)
    root_help = ("root folder of the chroot and rootless backends (default: $PORTING_LEGACY_ROOT or "
                 "~/.cache/caffe-port-harness/legacy-root)")
    backend_help = (f"where Caffe runs: {', '.join(BACKENDS)} (default: $PORTING_BACKEND, else the first "
                    "that works here)")

    def common(p):
        p.add_argument("--backend", choices=BACKENDS, help=backend_help)
        p.add_argument("--root", help=root_help)

    p = sub.add_parser("build", help="build the legacy root or image (a no-op when it is current)")
    common(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild even when current")
    p.add_argument("--snapshot", help="take Debian packages from snapshot.debian.org at this date "
                                      "(e.g. 20240801T000000Z); default $PORTING_DEBIAN_SNAPSHOT or off")
    p.add_argument("--base-image", help="docker/podman: a local Debian bullseye image to build on (default: "
                                        "one made here from a debootstrap or mmdebstrap minbase tree)")
    p.add_argument("--dry-run", action="store_true", help="say what would be built, from which recipe; change nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="build output to the log file only")
    p.set_defaults(func=_build_command)

    p = sub.add_parser("status", help="the backend, where the stack is, and every pinned version in it")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON (all Debian packages included)")
    p.set_defaults(func=_status_command)

    p = sub.add_parser("shell", help="an interactive shell inside the stack")
    common(p)
    p.set_defaults(func=lambda args: _backend(args).shell())


def _backend(args):
    return get_backend(args.backend, args.root)


def _build_command(args) -> int:
    _backend(args).build(rebuild=args.rebuild, progress=not args.quiet, snapshot=args.snapshot,
                         base_image=args.base_image, dry_run=args.dry_run)
    return 0


def _status_command(args) -> int:
    info = _backend(args).status()
    print(json.dumps(info, indent=1) if args.json else format_status(info))
    return 0


__all__ = ["get_backend", "default_root", "Worker", "CaffeResult", "CaffeError", "CaffeTimeout", "add_parser"]
