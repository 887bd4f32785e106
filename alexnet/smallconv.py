"""A convolution whose weight gradient on small feature maps is computed as matrix products.

At 64x64 input, AlexNet's conv3-conv5 run on 3x3 maps. On the CPU in bf16, oneDNN computes
the weight gradient of such a convolution 3-3.5x slower than k*k matrix products do (the
gradient of a kxk kernel is, for each tap (i, j), the output gradient times the input shifted
by (i, j): (C_out x NHW) @ (NHW x C_in)). Measured on this project's 2-core CPU at batch
256, bf16, channels_last: conv4 (384 -> 256 on 3x3) 21.2 ms against 5.8, conv3 16.0 against
4.5; at 6x6 maps 24.2 against 13.7; at 7x7 with a 5x5 kernel (conv2) 9.9 against 18.4, and
at 13x13 (224-pixel input) 54 against 152, so oneDNN keeps those. In fp32 the two are level
(18.2 against 15.7, 11.7 against 12.2), so fp32 keeps oneDNN too there. On a 2-core AVX2
CPU (no AVX512), in fp32, the products won: at batch 256, channels_last, conv3 29.2 against
45.5 ms, conv4 43.2 against 60.2, conv5 28.7 against 40.5 (conv2 on 7x7: 99.4 against 67.4),
so fp32 takes them on CPUs whose vector unit is AVX2, for channels_last inputs
(from NCHW the products' NHWC views need copies: a Baseline step at batch 64 ran 0.91x).
The forward pass and the input gradient stay with oneDNN everywhere (they are fast).

`Conv2d` is `nn.Conv2d` with the same parameters and state-dict keys; its forward pass takes
this path only where it was measured to pay: on the CPU, bf16 (autocast or a bf16 model),
or fp32 on channels_last inputs where the CPU's vector unit is AVX2 (`fp32_pays`), gradients
wanted, stride 1, no dilation or groups, an output map of at most `SMALL_MAP` positions.
`ALEXNET_SMALL_MAP_GRAD=0` keeps oneDNN's weight gradient everywhere.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

ENV = "ALEXNET_SMALL_MAP_GRAD"
SMALL_MAP = 36  # output positions (6x6) up to which the matrix products were faster


def weight_grad(x: torch.Tensor, grad_out: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """d loss / d weight of a stride-1 kxk convolution with zero padding `pad`.

    x: (N, C_in, H, W) input; grad_out: (N, C_out, H', W'). One (C_out x NHW) @ (NHW x C_in)
    product per kernel tap, over NHWC views (free for channels_last tensors)."""
    n, c_in, _, _ = x.shape
    c_out, h, w = grad_out.shape[1:]
    xp = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # N, H+2p, W+2p, C_in
    g = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, c_out).t()  # C_out, NHW
    taps = [g @ xp[:, i:i + h, j:j + w, :].reshape(n * h * w, c_in) for i in range(k) for j in range(k)]
    return torch.stack(taps, -1).view(c_out, c_in, k, k)


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pad: int):
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.has_bias = pad, bias is not None
        return F.conv2d(x, weight, bias, 1, pad)

    @staticmethod
    @once_differentiable  # no double backward: nothing here needs one
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        pad = ctx.pad
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, 1, pad)
        if ctx.needs_input_grad[1]:
            gw = weight_grad(x, grad_out, weight.shape[-1], pad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3))
        return gx, gw, gb, None


def conv2d_small_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride=1, padding=pad) with the weight gradient above."""
    return _SmallMapConv.apply(x, weight, bias, pad)


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


# Whether fp32 weight gradients on small maps take the products on this CPU: measured faster
# where PyTorch's vector unit is AVX2 (module doc), level with AVX512; other CPUs (ARM, no
# vector unit) have not been measured and keep oneDNN's. A constant, so that
# torch.compile guards on it instead of calling into PyTorch's CPU detection.
FP32_PAYS = torch.backends.cpu.get_cpu_capability() == "AVX2"


def fp32_pays() -> bool:
    return FP32_PAYS


@contextmanager
def switched(on: bool) -> Iterator[None]:
    """Sets the switch to `on` for the duration of the block (alexnet bench). It sets the
    environment variable: process-wide, not per thread."""
    old = os.environ.get(ENV)
    os.environ[ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


class Conv2d(nn.Conv2d):
    """nn.Conv2d that takes `conv2d_small_map` where it was measured to be faster (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._small_map(x):
            return super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        elif x.dtype == self.weight.dtype:  # a bf16 or fp32 model; mixed dtypes get nn.Conv2d's own error
            dtype = x.dtype
        else:
            return super().forward(x)
        fp32 = dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) and fp32_pays()
        if dtype != torch.bfloat16 and not fp32:
            return super().forward(x)
        # Autocast would cast inside F.conv2d; the backward needs the bf16 copies, so cast here
        # (the casts' own backward carries the gradients to the fp32 parameters).
        bias = None if self.bias is None else self.bias.to(dtype)
        return conv2d_small_map(x.to(dtype), self.weight.to(dtype), bias, self.padding[0])

    def _small_map(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return False
        if self.stride != (1, 1) or self.dilation != (1, 1) or self.groups != 1 or x.dim() != 4:
            return False
        k, p = self.kernel_size, self.padding
        if k[0] != k[1] or not isinstance(p, tuple) or p[0] != p[1] or self.padding_mode != "zeros":
            return False
        h, w = x.shape[-2] + 2 * p[0] - k[0] + 1, x.shape[-1] + 2 * p[1] - k[1] + 1
        return h > 0 and w > 0 and h * w <= SMALL_MAP and enabled()
