"""The process's peak memory, for the per-epoch report: resident set and GPU tensor memory.

Both are high-water marks, reset when a training run starts (`reset_peak`), so that the runs
of an ablation, which share one process, each report their own peak, not the largest of the
runs before them.
"""

from __future__ import annotations

import os
import sys

import torch

_STATUS = "/proc/self/status"


def reset_peak(device: torch.device) -> None:
    """Start both high-water marks afresh from what the process holds now."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (proc(5))
        except OSError:  # a kernel or sandbox that does not allow it: the process's peak then
            pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mib() -> float:
    """Peak resident set since the last reset (Linux) or since the process started: the
    memory-mapped cache's pages count once read, as in `/usr/bin/time -v`. 0.0 where the
    platform does not tell (Windows)."""
    if sys.platform.startswith("linux"):
        try:
            with open(_STATUS) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
    try:
        import resource
    except ImportError:
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def rss_bytes() -> int | None:
    """The process's resident set now (Linux: /proc/self/statm, ~20 µs to read); None where
    the platform does not tell."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_memory_mib(device: torch.device) -> dict:
    """{'peak_rss_mib', 'peak_gpu_mib'}: the peaks since `reset_peak`, in MiB (GPU: tensor
    memory on this process's GPU; 0.0 off CUDA)."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {"peak_rss_mib": round(peak_rss_mib(), 1), "peak_gpu_mib": round(gpu, 1)}
