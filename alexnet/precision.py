"""Whether bf16 autocast pays on a device, and what a run asking for it does where it would not.

bf16 autocast (`--amp`) is this project's recommended setting because the machines it was
tuned on compute bf16 natively: x86 CPUs with AVX512 (oneDNN's bf16 kernels; AVX512-BF16 and
AMX natively) and NVIDIA GPUs from Ampere (compute capability 8.0) on. Elsewhere PyTorch still
accepts bf16 but emulates it, far slower than fp32: on a 2-core AMD EPYC with AVX2 only
(torch 2.14.1), the Baseline's training step at batch 128 ran 2.1 images/s in bf16 against
166.0 in fp32 (0.012x; Combined-Small 9.1 against 262.0; docs/speed.md). A 30-epoch run would
take weeks instead of hours, so `--amp` there runs in fp32 and says so, before anything is
written: the run's config and checkpoints record the precision it really used. (On CUDA the
same rule is a precaution: no pre-Ampere GPU has been measured.)
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _cpu_reason() -> str | None:
    try:
        # The check PyTorch's own bf16 tests use: oneDNN has bf16 kernels on AVX512 (and AMX,
        # AVX512-BF16) x86 CPUs and on Arm CPUs with BF16; elsewhere it falls back to
        # reference loops.
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's check: trust --amp
        return None
    if native:
        return None
    return (f"this CPU ({torch.backends.cpu.get_cpu_capability()} vector unit) has no native bf16 arithmetic "
            "(oneDNN's bf16 kernels need AVX512, AVX512-BF16 or AMX on x86), so PyTorch would emulate bf16: "
            "about 80x slower than fp32 on a 2-core AVX2 CPU (docs/speed.md, Precision)")


@lru_cache(maxsize=None)
def _cuda_reason(index: int) -> str | None:
    if torch.cuda.is_bf16_supported(including_emulation=False):  # compute capability 8.0 (Ampere) on
        return None
    major, minor = torch.cuda.get_device_capability(index)
    # Not measured by this project (no such GPU was at hand): a precaution, by analogy with the CPU.
    return (f"this GPU ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor}) has no native "
            "bf16 arithmetic (from 8.0, Ampere, on), so PyTorch would emulate bf16")


def bf16_emulated(device: torch.device) -> str | None:
    """Why bf16 would be emulated on `device`, or None where it is native."""
    if device.type == "cpu":
        return _cpu_reason()
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _cuda_reason(torch.cuda.current_device())
    return None


def resolve_amp(amp: bool, device: torch.device, log=None) -> bool:
    """The precision a run asking for `amp` uses on `device`: bf16 autocast only where the
    device computes bf16 natively; elsewhere fp32, with a warning through `log` that says why."""
    if not amp:
        return False
    why = bf16_emulated(device)
    if why is None:
        return True
    if log is not None:
        log(f"warning: --amp: {why}; running in fp32 instead")
    return False
