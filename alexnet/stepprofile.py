"""What a training step costs the host and the device: `alexnet bench --profile`.

On a GPU a step of a few milliseconds can be bound by the host, which issues one kernel per
op, rather than by the GPU's arithmetic (README, On a GPU: the project's full path (2) ran at
0.65-0.80 of the model alone (1) on an H200, bf16 slower than fp32 at batch 256). Three
figures per step tell the two apart:

- ops: on CUDA the kernels and copies the step launched, from `torch.profiler`; on the CPU
  the ATen ops it ran (called by Python or autograd, not by another op), views left out: an
  op that makes a view of existing memory launches nothing on a GPU;
- host ms: wall time to issue 2 steps without waiting for the device, per step (on the CPU,
  where every op runs as it is issued, the whole step; 2, not more, so that the queue of
  launches a GPU accepts before the host must wait stays far from full);
- device ms (CUDA): the kernels' and copies' summed durations per step, the time the GPU is
  busy (the gaps between kernels not included);
- wall ms: the step as the bench timed it, images/s turned into ms per step.

A step whose wall time is near its host time and well above its device time keeps the GPU
waiting: fewer ops, not faster kernels, make it faster. One whose wall time is near its device
time is the GPU's.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Callable

import torch

# Ops that make a view of existing memory: no kernel on any device.
VIEWS = frozenset({"view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand",
                   "slice", "select", "unsqueeze", "squeeze", "flatten", "unfold", "unbind", "alias",
                   "as_strided", "detach", "split", "chunk", "view_as", "expand_as", "narrow", "diagonal"})


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _nested(e) -> bool:
    """Whether an ATen op was called by another ATen op (its cost is its caller's)."""
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profiled(step: Callable[[], object], steps: int, dev: torch.device) -> tuple[float, float | None]:
    """(ops, device ms) per step over `steps` steps under `torch.profiler` (a profiler, not a
    dispatch hook, so that compiled code, the CPU's augmentation kernel among it, runs as in
    training): on CUDA the kernels and copies and their summed durations; on the CPU the
    top-level ATen ops that are not views, and None."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    if not cuda:
        # Kineto, the profiler's engine, otherwise prints its start and stop on stderr, and on
        # a CUDA build of PyTorch without a GPU an "ERROR" that it found none: read at its
        # first use, so set here. (Kept on CUDA, where its messages may say why a figure is missing.)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    sync(dev)
    with warnings.catch_warnings():
        # Some versions (2.11) warn that a profile keeps only its last cycle's events: one
        # cycle here, every time.
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        # On CUDA the CPU's activity too, though only kernels are counted: traces of CUDA
        # activity alone have come back without kernel events (meta-pytorch/tritonbench#401).
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(dev)
    events = prof.events()
    if cuda:
        # The GPU's side of a CPU range (the optimizer's "Optimizer.step#SGD.step") is a CUDA
        # event too, over kernels already counted: left out.
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        if not kernels:  # CUPTI did not load or record: no figures, rather than a GPU that looks idle
            return None, None
        return len(kernels) / steps, sum(e.time_range.elapsed_us() for e in kernels) / steps / 1e3
    ops = [e for e in events if e.name.startswith("aten::") and e.name[6:] not in VIEWS and not _nested(e)]
    return len(ops) / steps, None


def step_profile(step: Callable[[], object], steps: int, dev: torch.device) -> dict:
    """{"ops", "host_ms", "device_ms"} per step of a warmed-up `step` (device_ms: CUDA only,
    else None)."""
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - t) / steps * 1e3
    sync(dev)
    ops, busy = profiled(step, steps, dev)
    return {"ops": ops, "host_ms": host, "device_ms": busy}


def profile_line(name: str, figures: dict[str, dict], cuda: bool) -> str:
    """One line per variant: each mode's ops, host ms, (CUDA) device ms, and the wall time of
    a step as the bench timed it (synchronised), per step."""
    parts = []
    for mode, f in figures.items():
        if f["ops"] is None:
            parts.append(f"{mode} no CUDA events recorded (CUPTI), host {f['host_ms']:.2f} ms")
            continue
        busy = f", device {f['device_ms']:.2f} ms" if cuda else ""
        wall = f", wall {f['wall_ms']:.2f} ms" if "wall_ms" in f else ""
        parts.append(f"{mode} {f['ops']:.0f} ops, host {f['host_ms']:.2f} ms{busy}{wall}")
    return f"{name:<15} per step: " + " | ".join(parts)
