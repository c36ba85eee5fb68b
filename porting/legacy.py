"""The pinned legacy Caffe 1.0 stack, seen from the host.

Build side (``porting.legacy_build``): ``build``, ``status``, ``shell``, ``default_root``.
Worker side (``porting.legacy_worker``): ``Worker``, ``CaffeResult``, ``CaffeError``,
``CaffeTimeout``. ``add_parser(subparsers)`` adds ``porting env build|status|shell``.
"""
from __future__ import annotations

import json

from porting.legacy_build import build, default_root, format_status, shell, status
from porting.legacy_worker import CaffeError, CaffeResult, CaffeTimeout, Worker


def add_parser(subparsers) -> None:
    """``porting env build|status|shell``."""
    env = subparsers.add_parser("env", help="the legacy Caffe 1.0 stack (build, status, shell)")
    sub = env.add_subparsers(dest="env_command", required=True)
    root_help = "root folder (default: $PORTING_LEGACY_ROOT or ~/.cache/caffe-port-harness/legacy-root)"

    p = sub.add_parser("build", help="build the legacy root (a no-op when it is current)")
    p.add_argument("--root", help=root_help)
    p.add_argument("--rebuild", action="store_true", help="rebuild even when current")
    p.add_argument("--snapshot", help="take Debian packages from snapshot.debian.org at this date "
                                      "(e.g. 20240801T000000Z); default $PORTING_DEBIAN_SNAPSHOT or off")
    p.add_argument("-q", "--quiet", action="store_true", help="build output to the log file only")
    p.set_defaults(func=_build_command)

    p = sub.add_parser("status", help="where the root is and every pinned version in it")
    p.add_argument("--root", help=root_help)
    p.add_argument("--json", action="store_true", help="print JSON (all Debian packages included)")
    p.set_defaults(func=_status_command)

    p = sub.add_parser("shell", help="an interactive shell inside the root")
    p.add_argument("--root", help=root_help)
    p.set_defaults(func=lambda args: shell(args.root))


def _build_command(args) -> int:
    build(args.root, rebuild=args.rebuild, progress=not args.quiet, snapshot=args.snapshot)
    return 0


def _status_command(args) -> int:
    info = status(args.root)
    print(json.dumps(info, indent=1) if args.json else format_status(info))
    return 0


__all__ = ["build", "status", "shell", "default_root", "Worker", "CaffeResult", "CaffeError",
           "CaffeTimeout", "add_parser"]
