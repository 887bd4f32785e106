"""The colour recipes' photometric ops and normalisation as one compiled kernel on the CPU.

Eager PyTorch runs the pixel and combined recipes as about a dozen passes over a float batch
(uint8 -> float, brightness, clamp, contrast, clamp, saturation, clamp, noise, normalise and
its clip), each a trip through memory, and a per-image factor broadcast over channels_last
memory leaves the vectorised loop unless each op is shaped with care (augment.py). Here the
same formulas are written once over the three colour planes of a batch and `torch.compile`
(inductor's C++ backend) turns them into one loop that reads each uint8 pixel once, computes
its three channels together and writes the normalised float pixel once, after a first loop
that takes each image's grey mean for the contrast. Measured on this project's 2-core CPU
(README, Speed), the whole augmentation of a batch read from the cache, crops included, took
0.61-0.64 of the eager ops' time for the combined recipe at 256 images (about 5 ms against
9) and 0.79-0.81 at 64; the pixels differ from the eager ops' by rounding (under 1e-5).

The planes come from the crop's gather in "row-planar" order, (N, S, 3, S): each image row's
red, green and blue rows one after another, so that every load in the kernel is contiguous
(read straight from channels_last memory, the three channels are 3-strided loads, and the
augmentation took up to twice as long). The output is (N, S, S, 3): channels_last memory, as
the model reads it.

Compilation happens at the first batch of each shape: 27-31 s the first time on this
project's machine, 4-5 s once PyTorch's on-disk cache holds the result. Where it fails (no C++ compiler, an unsupported platform), the eager ops run
instead, after one warning. `ALEXNET_FUSED_AUGMENT=0` keeps the eager ops; CUDA always runs
them (there each op is one small kernel over memory that is fast anyway).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Callable

import torch


class _NoCudaHomeNote(logging.Filter):
    """Drops the one line PyTorch's CUDA build logs when it compiles on a machine without CUDA
    ("No CUDA runtime is found, using CUDA_HOME=..."): it reads like an error in a CPU run and
    concerns CUDA extensions only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaHomeNote())


def enabled(device: torch.device) -> bool:
    """Whether a BatchAugment on `device` should fuse its photometric ops."""
    return device.type == "cpu" and os.environ.get("ALEXNET_FUSED_AUGMENT", "1") != "0"


def photometric_planes(brightness: bool, contrast: bool, saturation: bool, lighting: bool, noise: bool,
                       luma: tuple[float, float, float]) -> Callable:
    """The function that is compiled, for one recipe's set of ops (Python constants, so that
    the ops a recipe leaves out are not in its kernel). torchvision's formulas and order, a
    clamp to [0, 1] after each op, then (x - mean) / std; `luma`: the grey image's weights.

    rows: (N,S,3,S) uint8; b, c, s: (N,1,1) factors; shift: (N,3) lighting shifts; eps:
    (N,S,S,3) noise; mean, std: (3,). Returns (N,S,S,3) float32."""

    def gray(x: list[torch.Tensor]) -> torch.Tensor:
        return luma[0] * x[0] + luma[1] * x[1] + luma[2] * x[2]

    def kernel(rows, b, c, s, shift, eps, mean, std):
        x = list(rows.unbind(2))  # three (N,S,S) uint8 planes
        if brightness:
            x = [(v.float() * (b / 255)).clamp(0, 1) for v in x]
        else:
            x = [v.float() * (1 / 255) for v in x]
        if contrast:
            m = gray(x).mean(dim=(1, 2), keepdim=True)  # (N,1,1)
            x = [(c * v + (1 - c) * m).clamp(0, 1) for v in x]
        if saturation:
            g = gray(x)
            x = [(s * v + (1 - s) * g).clamp(0, 1) for v in x]
        if lighting:
            x = [(v + shift[:, i, None, None]).clamp(0, 1) for i, v in enumerate(x)]
        if noise:
            e = eps.unbind(3)
            x = [(v + e[i]).clamp(0, 1) for i, v in enumerate(x)]
        else:
            x = [v.clamp(0, 1) for v in x]
        return torch.stack([(v - mean[i]) / std[i] for i, v in enumerate(x)], dim=-1)

    return kernel


class FusedPhotometric:
    """One recipe's compiled kernel, and the fallback decision if compiling fails."""

    def __init__(self, flags: tuple[bool, bool, bool, bool, bool], luma: tuple[float, float, float],
                 mean: torch.Tensor, std: torch.Tensor) -> None:
        """flags: brightness, contrast, saturation, lighting, noise on or off."""
        self.flags, self.luma = flags, luma
        self.mean, self.std = mean.reshape(3), std.reshape(3)
        self.kernel: Callable | None = None  # compiled at the first batch
        self.failed: str | None = None  # why the eager ops run instead, once compiling failed
        self.calls = 0  # batches the kernel produced

    def __call__(self, rows: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
                 shift: torch.Tensor | None, eps: torch.Tensor | None) -> torch.Tensor | None:
        """(N,3,S,S) channels_last normalised batch, or None when the kernel cannot be had
        (the caller then runs the eager ops)."""
        if self.failed is not None:
            return None
        n = rows.shape[0]
        args = (rows, b.view(n, 1, 1), c.view(n, 1, 1), s.view(n, 1, 1), shift, eps, self.mean, self.std)
        try:
            if self.kernel is None:  # torch.compile itself raises where dynamo does not run (a new Python)
                self.kernel = torch.compile(photometric_planes(*self.flags, self.luma), dynamic=False, fullgraph=True)
            with torch.autocast("cpu", enabled=False):  # float32 pixels whatever the caller's context
                out = self.kernel(*args)
        except Exception as e:  # inductor's errors have no common base; any of them means "no kernel"
            first_line = (str(e).strip().splitlines() or [""])[0]
            self.failed = f"{type(e).__name__}: {first_line}"
            warnings.warn(f"torch.compile of the augmentation kernel failed ({self.failed}); "
                          "running the eager ops instead (the same formulas, slower)", RuntimeWarning, stacklevel=3)
            return None
        self.calls += 1
        return out.permute(0, 3, 1, 2)
