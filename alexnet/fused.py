"""The colour recipes' photometric ops and normalisation as one compiled kernel (on the CPU;
on CUDA when asked).

Eager PyTorch runs the pixel and combined recipes as about a dozen passes over a float batch
(uint8 -> float, brightness, clamp, contrast, clamp, saturation, clamp, noise, normalise and
its clip), each a trip through memory, and a per-image factor broadcast over channels_last
memory leaves the vectorised loop unless each op is shaped with care (augment.py). Here the
same formulas are written once over the three colour planes of a batch and `torch.compile`
(inductor's C++ backend) turns them into one loop that reads each uint8 pixel once, computes
its three channels together and writes the normalised float pixel once, after a first loop
that takes each image's grey mean for the contrast. Measured on this project's 2-core CPU
(docs/speed.md), the whole augmentation of a batch read from the cache, crops included, took
0.61-0.65 of the eager ops' time for the combined recipe at 256 images (about 5 ms against
9) and 0.79-0.83 at 64; the pixels differ from the eager ops' by rounding (under 1e-5).

The planes come from the crop's gather in "row-planar" order, (N, S, 3, S): each image row's
red, green and blue rows one after another, so that every load in the kernel is contiguous
(read straight from channels_last memory, the three channels are 3-strided loads, and the
augmentation took up to twice as long). The output is (N, S, S, 3): channels_last memory, as
the model reads it.

One kernel serves every colour recipe: a jitter a recipe leaves out gets the factor 1 that
`BatchAugment.sample` draws for it, which leaves pixels in [0, 1] exactly as they are; the
lighting and the noise, absent from most recipes, are left out of the kernel when their
tensors are None (another kernel). Its batch dimension is dynamic. Compilation happens at
the first batch: 27-31 s the first time on this project's machine, 4-5 s once PyTorch's
on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER) holds it.
Where there is no kernel (no C++ compiler, a platform `torch.compile` does not support), the
eager ops run instead, after one warning. `ALEXNET_FUSED_AUGMENT=0` keeps the eager ops.

On CUDA the eager ops run by default: each is one small kernel over memory that is fast
anyway, but each also costs a launch, and a GPU step of a few milliseconds is bound by
launches (docs/speed.md, On a GPU: the colour recipes' data path cost more there than the
Baseline's). `ALEXNET_FUSED_AUGMENT=all` compiles the same function for the GPU too (inductor's
Triton backend), for `scripts/gpu_bench.sh` to measure against the eager ops before it
becomes a default; tests/test_cuda.py checks its pixels.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from alexnet.errors import ConfigError

ENV = "ALEXNET_FUSED_AUGMENT"
CHOICES = {"0": (), "1": ("cpu",), "all": ("cpu", "cuda")}  # value -> devices that fuse


def enabled(device: torch.device) -> bool:
    """Whether a BatchAugment on `device` should fuse its photometric ops: on the CPU unless
    ALEXNET_FUSED_AUGMENT=0, on CUDA only with ALEXNET_FUSED_AUGMENT=all."""
    value = os.environ.get(ENV, "1")
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={value!r}: expected 0 (eager ops everywhere), 1 (the default: the kernel on "
                          "the CPU) or all (the kernel on the CPU and on CUDA)")
    return device.type in CHOICES[value]


def photometric_planes(luma: tuple[float, float, float], noise_unit: float = 0.0) -> Callable:
    """The function that is compiled: torchvision's formulas in a fixed order (brightness,
    contrast, saturation, then the paper's lighting and the pixel noise), a clamp to [0, 1] after each
    op, then (x - mean) / std; `luma`: the grey image's weights; `noise_unit`: the pixel noise
    of noise code 1 (augment.py, `BatchAugment.noise`).

    rows: (N,S,3,S) uint8; b, c, s: (N,1,1) factors (1 for an op that is off); shift: (N,3)
    lighting shifts or None; eps: (N,S,3,S) int8 noise codes (planar, as rows) or None;
    mean, std: (3,). Returns (N,S,S,3) float32."""

    def gray(x: list[torch.Tensor]) -> torch.Tensor:
        return luma[0] * x[0] + luma[1] * x[1] + luma[2] * x[2]

    def kernel(rows, b, c, s, shift, eps, mean, std):
        x = [(v.float() * (b / 255)).clamp(0, 1) for v in rows.unbind(2)]  # three (N,S,S) planes
        m = gray(x).mean(dim=(1, 2), keepdim=True)  # (N,1,1)
        x = [(c * v + (1 - c) * m).clamp(0, 1) for v in x]
        g = gray(x)
        x = [(s * v + (1 - s) * g).clamp(0, 1) for v in x]
        if shift is not None:
            x = [(v + shift[:, i, None, None]).clamp(0, 1) for i, v in enumerate(x)]
        if eps is not None:
            x = [(v + e.float() * noise_unit).clamp(0, 1) for v, e in zip(x, eps.unbind(2))]
        return torch.stack([(v - mean[i]) / std[i] for i, v in enumerate(x)], dim=-1)

    return kernel


@contextmanager
def _without_cuda_home_note() -> Iterator[None]:
    """PyTorch's CUDA build logs "No CUDA runtime is found, using CUDA_HOME=..." when it
    first compiles on a machine without CUDA: a line that reads like an error in a CPU run and
    concerns CUDA extensions only. It is dropped while the kernel compiles, nowhere else."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No CUDA runtime is found" not in record.getMessage()

    log, drop = logging.getLogger("torch.utils.cpp_extension"), Drop()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class FusedPhotometric:
    """A BatchAugment's compiled kernel, and the fallback decision if there is none."""

    def __init__(self, luma: tuple[float, float, float], mean: torch.Tensor, std: torch.Tensor,
                 noise_unit: float = 0.0) -> None:
        self.luma, self.noise_unit = luma, noise_unit
        self.mean, self.std = mean.reshape(3), std.reshape(3)
        self.kernel: Callable | None = None  # compiled at the first batch
        self.failed: str | None = None  # why the eager ops run instead, once compiling failed
        self.calls = 0  # batches the kernel produced

    def __call__(self, rows: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
                 shift: torch.Tensor | None, eps: torch.Tensor | None) -> torch.Tensor | None:
        """(N,3,S,S) channels_last normalised batch, or None when there is no kernel (the
        caller then runs the eager ops; `failed` says why)."""
        if self.failed is not None:
            return None
        n = rows.shape[0]
        args = (rows, b.view(n, 1, 1), c.view(n, 1, 1), s.view(n, 1, 1), shift, eps)
        for t in args:
            if t is not None:  # one kernel for every batch size (batches of 1 excepted)
                torch._dynamo.maybe_mark_dynamic(t, 0)
        try:
            if self.kernel is None:  # torch.compile itself raises where dynamo does not run (a new Python)
                # Its own recompile budget where this torch offers one per compiled function:
                # other compiled code in the process, and other BatchAugments, do not use it up.
                own = "isolate_recompiles" in inspect.signature(torch.compile).parameters
                self.kernel = torch.compile(photometric_planes(self.luma, self.noise_unit), fullgraph=True,
                                            **({"isolate_recompiles": True} if own else {}))
            # float32 pixels whatever the caller's autocast; no autograd state to guard on
            with torch.autocast(rows.device.type, enabled=False), torch.no_grad(), _without_cuda_home_note():
                out = self.kernel(*args, self.mean, self.std)
        except Exception as e:  # inductor's errors have no common base; any of them means "no kernel"
            first_line = (str(e).strip().splitlines() or [""])[0]
            self.failed = f"{type(e).__name__}: {first_line}"
            warnings.warn(f"no compiled augmentation kernel ({self.failed}); running the eager ops instead "
                          "(the same formulas, slower)", RuntimeWarning, stacklevel=3)
            return None
        self.calls += 1
        return out.permute(0, 3, 1, 2)
