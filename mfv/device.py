"""Where MFV's torch work runs and with how many CPU threads: the one policy the `mfv`
commands apply (``configure``) before they load a net.

CPU threads: by default the cores this process may run on (``os.sched_getaffinity``,
lowered by a cgroup CPU quota when one is set), at most ``THREAD_CAP``: a batch-1
CaffeNet pass gains little beyond that and a larger pool spends its time waiting in
barriers. ``--threads N`` overrides. The TV denoiser and the crops run on the CPU even
when the net runs on a GPU, so the count matters there too.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from porting.errors import PortingError

THREAD_CAP = 16


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, lowered by a cgroup v2 quota (cpu.max)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def torch_device(device: str) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1", ...) checked: a bad name or CUDA missing is an error."""
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise PortingError(f"not a torch device ({err})", place="--device") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise PortingError("no CUDA device is available to torch", place=f"--device {device}")
    return where


def default_threads() -> int:
    return min(available_cores(), THREAD_CAP)


def configure(threads: int | None = None, device: str = "cpu") -> str:
    """Set torch's intra-op thread count (``threads``, or ``default_threads()``); returns the
    line the commands print once, on stderr: "mfv: torch on DEVICE, N threads"."""
    count = default_threads() if threads is None else int(threads)
    if count < 1:
        raise ValueError(f"threads must be at least 1, not {count}")
    torch.set_num_threads(count)
    return f"mfv: torch on {device}, {count} thread{'s' if count != 1 else ''}"
