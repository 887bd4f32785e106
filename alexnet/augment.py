"""Batched augmentation on the training device, over uint8 batches from the cache.

A `Recipe` is data: the strength of each augmentation. `BatchAugment` applies it to a whole
batch at once with independent random parameters per image: no per-image Python. Geometry
(scale, crop, flip) is one gather on uint8; photometric changes run in float on [0, 1];
normalisation comes last. Each op's formula matches torchvision's functional op of the same
name, so `tests/test_augment.py` can check pixels against a per-image reference. On the CPU,
the photometric ops and normalisation of a training batch run instead as one kernel compiled
from the same formulas (alexnet/fused.py), checked against the same reference.

Shapes: input (N, H, W, 3) uint8 (the cache's layout) or (N, 3, H, W) uint8;
output (N, 3, S, S) float32 normalised, S = the training size.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from alexnet import fused
from alexnet.errors import ConfigError

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Pixel noise is cut from one fixed table of standard normals (see BatchAugment.noise),
# held as int8 codes: a standard normal z is stored as round(z * NOISE_CODES / NOISE_CLIP),
# so the pixel noise is code * noise_std * NOISE_CLIP / NOISE_CODES.
NOISE_TABLE = 1 << 22  # room for the random offset, on top of one batch of noise
NOISE_SEED = 2012
NOISE_CODES = 127
NOISE_CLIP = 5.0  # standard deviations; |z| > 5 has probability 6e-7
# The paper resized to 256 and cropped 224: crops come from an image 256/224 times larger.
PAPER_SCALE = 256 / 224


@dataclass(frozen=True)
class Recipe:
    """Strengths of each augmentation; zero (or False / 1.0) turns one off exactly."""

    crop_pad: int = 0  # random crop back to size after reflect-padding by this many pixels
    scale: float = 1.0  # resize to round(size * scale), then crop `size` (random in training)
    flip: bool = False  # horizontal flip with probability 1/2
    brightness: float = 0.0  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    noise_std: float = 0.0  # Gaussian pixel noise, in units of the [0, 1] pixel range
    lighting_std: float = 0.0  # the paper's PCA colour lighting; alpha ~ N(0, std), paper: 0.1
    # The paper's input (its section 2): the pixels minus the training set's mean, in 0..255
    # units, not divided by the std. Its initialisation, N(0, 0.01) weights, was made for
    # inputs of that scale: fed unit-variance inputs, its conv5 features vary across images
    # by 0.1% of their level, and its loss stayed flat for epochs (docs/results.md).
    raw_pixels: bool = False

    def __post_init__(self) -> None:
        # Numbers of any numeric type (numpy's too: a transforms file may compute them, and a
        # checkpoint keeps them as they were) become plain ones; anything else is refused.
        for k in ("flip", "raw_pixels"):
            v = getattr(self, k)
            if isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Integral) and v in (0, 1)):
                object.__setattr__(self, k, bool(v))
            else:
                raise ConfigError(f"{k} must be True or False, got {v!r}")
        v = self.crop_pad
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 0:
            raise ConfigError(f"crop_pad must be a whole number of pixels >= 0, got {v!r}")
        object.__setattr__(self, "crop_pad", int(v))
        for k in ("scale", "brightness", "contrast", "saturation", "noise_std", "lighting_std"):
            v = getattr(self, k)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ConfigError(f"{k} must be a finite number, got {v!r}")
            object.__setattr__(self, k, float(v))
        if self.scale < 1.0:
            raise ConfigError(f"scale must be >= 1, got {self.scale}")
        for k in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"{k} must be in [0, 1), got {getattr(self, k)}")
        if self.noise_std < 0 or self.lighting_std < 0:
            raise ConfigError("noise_std and lighting_std must be >= 0")

    @property
    def photometric(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.noise_std, self.lighting_std))

    def to_dict(self) -> dict:
        return asdict(self)


# The built-in recipes, by name. utils/transforms_<name>.py return these; the variant table
# in models.py pairs each variant with one. Strengths follow common practice for 64x64
# images (pad 4 as in CIFAR-style crops; jitter 0.3 as in many ImageNet recipes).
RECIPES: dict[str, Recipe] = {
    "baseline": Recipe(),
    "randomcrop": Recipe(crop_pad=4, flip=True),
    "pixel": Recipe(brightness=0.3, contrast=0.3, saturation=0.3, noise_std=0.03),
    "combined": Recipe(crop_pad=4, flip=True, brightness=0.3, contrast=0.3, saturation=0.3, noise_std=0.03),
    # Section 4.1 of the paper: crops from a 256/224 enlargement, flips, PCA lighting 0.1.
    "paper": Recipe(scale=PAPER_SCALE, flip=True, lighting_std=0.1, raw_pixels=True),
}


@dataclass
class Params:
    """Random parameters for one batch, drawn once so that a reference can reuse them."""

    oy: torch.Tensor  # (N,) int64 crop offsets in the padded/scaled frame, in [0, span) (see `sample`)
    ox: torch.Tensor
    flip: torch.Tensor  # (N,) bool
    brightness: torch.Tensor  # (N,) float factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    noise: torch.Tensor | None  # (N, 3, S, S) int8 codes (row-planar strides, see `noise`) or None
    alpha: torch.Tensor | None  # (N, 3) lighting coefficients or None
    noise_unit: float = 0.0  # the pixel noise of code 1

    def pixel_noise(self) -> torch.Tensor | None:
        """The noise added to [0, 1] pixels, (N, 3, S, S) float32."""
        return None if self.noise is None else self.noise.float() * self.noise_unit


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in a reflect-padded frame back into [0, n) (torch 'reflect' padding)."""
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


def as_nchw_uint8(x: torch.Tensor) -> torch.Tensor:
    """Accept (N,H,W,3) or (N,3,H,W) uint8 and return an (N,3,H,W) view (no copy)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"augmentation expects a uint8 batch, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"augmentation expects a 4-d batch (N,H,W,3) or (N,3,H,W), got {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        return x.permute(0, 3, 1, 2)
    if x.shape[1] == 3:
        return x
    raise ValueError(f"augmentation expects 3 colour channels, got shape {tuple(x.shape)}")


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to float, antialiased where it shrinks, as torchvision's and PIL's
    resizes are: plain bilinear reads only the 2x2 pixels nearest each output pixel, so an
    image made smaller (a cache larger than --img-size, a transform's 224-pixel output)
    would alias. Enlargements stay plain bilinear, the same pixels as before."""
    shrinks = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrinks)


class BatchAugment:
    """Applies a `Recipe` to uint8 batches, then normalises.

    size: the training resolution S (64 native, or 224/227 for the paper's geometry:
    the batch is upsampled on the device). mean/std: per-channel, [0, 1] scale.
    eigval/eigvec: the train set's RGB PCA for lighting. A recipe with `raw_pixels` divides
    by 1/255 instead of std: centred pixels in 0..255 units.
    """

    def __init__(self, recipe: Recipe, size: int, mean, std, eigval=None, eigvec=None,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> None:
        if recipe.crop_pad >= size:  # the ten-crop test reflect-pads, which mirrors at most size - 1 pixels
            raise ConfigError(f"crop_pad must be less than the image size {size}, got {recipe.crop_pad}")
        self.recipe = recipe
        self.size = size
        # indexed: a bare "cuda" would never equal the cache's device, and __call__ would
        # gather every batch before cropping instead of reading crops out of the cache
        self.device = indexed(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = [1 / 255] * 3 if recipe.raw_pixels else std
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.eigval = None if eigval is None else torch.as_tensor(eigval, dtype=torch.float32, device=self.device)
        self.eigvec = None if eigvec is None else torch.as_tensor(eigvec, dtype=torch.float32, device=self.device)
        if recipe.lighting_std > 0 and self.eigvec is None:
            raise ConfigError("PCA lighting needs the cache's eigval/eigvec statistics")
        self.generator = generator
        self.scale = 1 / self.std
        self.shift = -self.mean / self.std
        self.luma = torch.tensor(_LUMA, device=self.device)
        self.gray3 = self.luma.view(1, 3, 1, 1).expand(3, 3, 1, 1).contiguous()  # 1x1 conv: gray on each channel
        self._noise_table: torch.Tensor | None = None  # built on first use (see `noise`)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see `_crop_tables`
        self._constants: dict[tuple, torch.Tensor] = {}  # see `_constant`
        # On the CPU the colour ops and normalisation of a training batch run as one compiled
        # kernel where no resize is needed (alexnet/fused.py, `fuses`).
        self.fused = (fused.FusedPhotometric(_LUMA, self.mean, self.std, self.noise_unit)
                      if recipe.photometric and fused.enabled(self.device) else None)

    def fuses(self, h: int) -> bool:
        """Whether training batches of side h from the cache run the fused kernel: on the
        CPU, for a recipe with colour ops, when the crops come straight out of the uint8 cache
        (no resize) and the kernel could be compiled (or has not been tried yet)."""
        return self.fused is not None and self.fused.failed is None and self.frame(h)[0] == h

    # -- random parameters -------------------------------------------------------------
    def frame(self, h: int) -> tuple[int, int]:
        """(resized side, pad) of the frame crops are taken from."""
        r = self.recipe
        side = round(self.size * r.scale) if r.scale > 1 or h != self.size else self.size
        return side, r.crop_pad

    def sample(self, n: int, h: int) -> Params:
        r, g, dev = self.recipe, self.generator, self.device
        side, pad = self.frame(h)
        span = side + 2 * pad - self.size + 1

        def uniform(strength: float) -> torch.Tensor:
            if strength == 0:
                return self._constant(("ones", n), lambda: torch.ones(n, device=dev))
            return 1 - strength + 2 * strength * torch.rand(n, device=dev, generator=g)

        return Params(
            oy=torch.randint(0, span, (n,), device=dev, generator=g),
            ox=torch.randint(0, span, (n,), device=dev, generator=g),
            flip=((torch.rand(n, device=dev, generator=g) < 0.5) if r.flip
                  else self._constant(("no flip", n), lambda: torch.zeros(n, dtype=torch.bool, device=dev))),
            brightness=uniform(r.brightness),
            contrast=uniform(r.contrast),
            saturation=uniform(r.saturation),
            noise=self.noise(n, g) if r.noise_std > 0 else None,
            alpha=(torch.randn(n, 3, device=dev, generator=g) * r.lighting_std if r.lighting_std > 0 else None),
            noise_unit=self.noise_unit,
        )

    @property
    def noise_unit(self) -> float:
        """The pixel noise of the table's code 1 (see `noise`)."""
        return self.recipe.noise_std * NOISE_CLIP / NOISE_CODES

    def noise(self, n: int, g: torch.Generator | None) -> torch.Tensor:
        """(N,3,S,S) int8 codes of Gaussian noise (times `noise_unit`: std = the recipe's): a
        view of N consecutive windows of a fixed table of standard normals, at an offset drawn
        from `g`, in row-planar order (memory (N,S,3,S): each image row's red, green and blue
        rows in turn), the order of the fused kernel's planes (alexnet/fused.py), which then
        reads it with contiguous loads (read in channels_last order, 3-strided, the kernel took
        4.6 ms per 256-image batch against 3.1 on two cores). The eager ops' add now reads it
        across the batch's channels_last layout: 1.40 ms against 0.43 per 256 images on the
        CPU, where those ops are only the fallback (on CUDA, not measured).

        Drawing N*S*S*3 fresh normals cost ~17 ms per 256-image batch on two CPU cores, more
        than all the other augmentation together; a view of a table drawn once costs nothing,
        and the add reads it in place. Every pixel is still N(0, std^2), independent of the
        other pixels of its image and of the other images of its batch (disjoint windows);
        batches differ by their offsets: overlapping windows, shifted against each other (the
        "shared noise table" of Salimans et al., 2017, "Evolution Strategies as a Scalable
        Alternative to RL"). The table comes from a fixed CPU seed: the same on every device,
        run and resume. It holds one batch of noise plus 2**22 values of room for the offset.

        The table is int8: each normal rounded to a multiple of 1/25.4 standard deviation and
        clipped at 5 (the rounding adds 1e-4 to the variance; 0.04 std is 1/3 of a pixel's
        1/255 step at the recipes' 0.03). Read as float32, the noise was 12.6 MB a 256-image
        batch, the largest read of the fused kernel; as int8 it is 3.1 MB, and the kernel
        takes 0.93 of the time (docs/speed.md). The table: 7 MB for 256 images of 64 x 64,
        29 MB as float32.
        """
        s = self.size
        need = n * s * s * 3
        if self._noise_table is None or self._noise_table.numel() < need + NOISE_TABLE:
            z = torch.randn(need + NOISE_TABLE, generator=torch.Generator().manual_seed(NOISE_SEED))
            codes = z.mul_(NOISE_CODES / NOISE_CLIP).round_().clamp_(-NOISE_CODES, NOISE_CODES)
            self._noise_table = codes.to(torch.int8).to(self.device)
        start = torch.randint(0, self._noise_table.numel() - need + 1, (1,), generator=g, device=self.device)
        # Reading the offset on the host would make the CPU wait for the GPU: copy there.
        window = _window(self._noise_table, start, need, copy=start.is_cuda)
        return window.view(n, s, 3, s).permute(0, 2, 1, 3)

    # -- the ops -----------------------------------------------------------------------
    def geometry(self, x: torch.Tensor, p: Params, ids: torch.Tensor | None = None,
                 planar: bool = False) -> torch.Tensor:
        """Resize (if the recipe scales or the size differs), reflect-pad, crop and flip.

        x: (N,3,H,W) uint8, or with `ids` (N,) the whole cache (M,3,H,W) the N images are read
        from. Returns (N,3,S,S) with channels_last strides: uint8 when no resize was needed,
        else float in 0..255; with `planar`, (N,S,3,S) instead, each row's red, green and blue
        rows one after another (the fused kernel's input, alexnet/fused.py), also when the
        recipe neither crops nor flips. Two reads, no per-image Python: an `index_select` of whole
        source rows (W*3 contiguous values each) out of the NHWC memory, which image and the
        vertical reflection folded into the row ids; then a `gather` of each image's columns
        (horizontal reflection and flip folded into one index per image, shared by its rows)
        out of that small buffer. Neither the batch nor a padded copy is made, and the result
        is already in the layout the model reads. On two CPU cores, for 256 images from the
        real cache: 3.1 ms, against 4.0 ms for one `index_select` of single pixels out of
        the cache (1M 3-byte copies, each a cache miss) and more for per-element indexing.
        """
        h = x.shape[2]
        side, pad = self.frame(h)
        if ids is not None and side != h:
            x, ids = _take(x, ids), None
        n, c = (x.shape[0] if ids is None else len(ids)), x.shape[1]
        if side != h:
            x = resize(x, (side, side))
        if pad == 0 and side == self.size and not self.recipe.flip and not planar:
            return x if ids is None else _take(x, ids)
        s, dev = self.size, x.device
        rows_of, values_of = self._crop_tables(side, pad, c, dev, planar)
        image = self._constant(("arange", n, dev), lambda: torch.arange(n, device=dev)) if ids is None else ids
        # (N, S) rows of the batch (or cache); integer ops written to launch 2 kernels, not 3
        rows = rows_of.index_select(0, p.oy).add_(image[:, None], alpha=side)
        nhwc = x.permute(0, 2, 3, 1).contiguous()  # a view for the cache's NHWC batches
        picked = nhwc.view(-1, side * c).index_select(0, rows.flatten()).view(n, s, side * c)
        values = values_of.index_select(0, p.ox.add(p.flip, alpha=len(values_of) // 2)).view(n, 1, s * c)
        out = torch.gather(picked, 2, values.expand(n, s, s * c))
        return out.view(n, s, c, s) if planar else out.view(n, s, s, c).permute(0, 3, 1, 2)

    def _crop_tables(self, side: int, pad: int, c: int, dev: torch.device,
                     planar: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every crop's source indices, one row per offset, made once per frame: (span, S)
        source rows of the frame for each vertical offset, and (2 * span, S * C) values of a
        source row for each horizontal offset, then for each offset mirrored (reflection
        folded in, span = side + 2 * pad - S + 1). A batch's indices are then two row lookups
        instead of a dozen small ops over (N, S) (0.6 ms per 256-image batch on two cores).
        `planar` orders each row's values channel by channel: (2 * span, C * S)."""
        key = (side, pad, c, dev, planar)
        if key not in self._tables:
            s = self.size
            span = side + 2 * pad - s + 1
            pos = torch.arange(span, device=dev)[:, None] + torch.arange(s, device=dev) - pad  # (span, S), padded frame
            rows = _reflect(pos, side)
            cols = torch.cat([rows, _reflect(pos.flip(1), side)])  # forward, then mirrored
            channel = torch.arange(c, device=dev)
            values = (cols[:, None, :] * c + channel[:, None]) if planar else (cols[:, :, None] * c + channel)
            values = values.reshape(2 * span, s * c)
            self._tables[key] = (rows, values)
        return self._tables[key]

    def photometric(self, x: torch.Tensor, p: Params) -> tuple[torch.Tensor, bool]:
        """x: (N,3,S,S) channels_last, uint8 or float in 0..255 -> (float, clamp): torchvision's
        formulas in a fixed order, brightness, contrast, saturation (torchvision's ColorJitter
        draws a new order per image), clamped to [0, 1] after each op as torchvision does,
        except that the last op's clamp is left to `normalize` (clamp=True), where it costs no
        extra pass.

        As few passes over memory as the formulas allow, in place on one float copy (saturation
        writes a new one): the batch is ~12 MB of float32 at 256 x 64 x 64, each pass ~0.4 ms
        on two cores."""
        r = self.recipe
        # A plain uint8 -> float copy, then an in-place multiply: a mixed-dtype multiply
        # (uint8 * float) runs the slow casting loop, 1.5 ms against 0.9 ms for both.
        x = x.float() if x.dtype == torch.uint8 else x
        unit = p.brightness.view(-1, 1, 1, 1) / 255 if r.brightness > 0 else 1 / 255
        x.mul_(unit)
        pending = r.brightness > 0  # an op ran whose output still needs clamping to [0, 1]
        if r.contrast > 0:
            if pending:
                x.clamp_(0, 1)
            c = p.contrast.view(-1, 1, 1, 1)
            # mean of the grayscale image = the NHWC memory . luma weights repeated per pixel
            # / pixels: one matrix-vector product over the batch (the reduction was 2x slower).
            mean = (_rows(x).flatten(1) @ self._luma_pattern(x)).view(-1, 1, 1, 1)
            x.mul_(c).add_((1 - c) * mean)
            pending = True
        if r.saturation > 0:
            if pending:
                x.clamp_(0, 1)
            x = self.saturate(x, p.saturation)
            pending = True
        if p.alpha is not None:
            if pending:
                x.clamp_(0, 1)
            _rows(x).add_(self.lighting(p.alpha).repeat(1, x.shape[3]).unsqueeze(1))
            pending = True
        if p.noise is not None:
            if pending:
                x.clamp_(0, 1)
            x.add_(p.noise, alpha=p.noise_unit)
            pending = True
        return x, pending

    def lighting(self, alpha: torch.Tensor) -> torch.Tensor:
        """(N, 3) RGB shift of the paper's PCA lighting (section 4.1), eigvec @ (alpha * eigval)
        for (N, 3) alpha, added to every pixel; in float32 whatever the caller's context."""
        with torch.autocast(alpha.device.type, enabled=False):
            return (alpha * self.eigval) @ self.eigvec.T

    def saturate(self, x: torch.Tensor, s: torch.Tensor, per_image_matrix: bool | None = None) -> torch.Tensor:
        """s * x + (1 - s) * gray(x) for a channels_last float batch x and (N,) factors s, as
        torchvision's adjust_saturation before its clamp; returns a new channels_last tensor.

        Two ways to the same numbers. Per pixel it is the row vector x times the image's 3x3
        matrix s*I + (1-s)*luma 1^T: one batched matmul over the NHWC pixels (`per_image_matrix`,
        the default off the CPU, where it is one small kernel). On the CPU a (4096 x 3) @ (3 x 3)
        matmul per image is the BLAS's worst case: 7.6 ms per 256 images on the AMD machine,
        over a third of the combined recipe's whole augmentation. There the gray image on all
        three channels, the same 3x3 matrix for every image, is one 1x1 convolution that oneDNN
        runs straight over the NHWC memory, and the per-image blend one `lerp`: 2.6-2.8 ms in
        all (docs/speed.md). Not on CUDA, where cuDNN may run fp32 convolutions in TF32
        (10-bit mantissa) and the gray image would lose precision."""
        if per_image_matrix is None:
            per_image_matrix = x.device.type != "cpu"
        with torch.autocast(x.device.type, enabled=False):  # bmm and conv2d would run in bf16 under autocast
            if per_image_matrix:
                # luma 1^T + s (I - luma 1^T): one kernel for the N matrices, not five
                gray, away = self._constant(("saturation", x.device), lambda: _saturation_terms(self.luma, x.device))
                m = torch.addcmul(gray, s.view(-1, 1, 1), away)
                return _from_pixels(torch.bmm(_pixels(x), m), x.shape)
            gray3 = F.conv2d(x, self.gray3)  # (N,3,S,S), x's layout
        gray3 = gray3.contiguous(memory_format=torch.channels_last)  # a no-op for channels_last x
        return gray3.lerp_(x, s.view(-1, 1, 1, 1))  # gray + s * (x - gray), one pass

    def _constant(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor that depends only on the batch's shape, made once: on a GPU, where a step
        is bound by kernel launches, each one made per batch costs a launch. Read-only for the
        callers (none writes to its inputs in place)."""
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def _luma_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """(H*W*3,) luma weights repeated per pixel, / pixels: a dot product with an image's NHWC
        memory gives the mean of its grayscale."""
        hw = x.shape[2] * x.shape[3]
        return self._constant(("luma", hw), lambda: self.luma.repeat(hw) / hw)

    def normalize(self, x: torch.Tensor, unit: float = 1.0, inplace: bool = False,
                  clamp: bool = False) -> torch.Tensor:
        """(x * unit - mean) / std (x: uint8 or float, x * unit in [0, 1]); `inplace` reuses a
        float x the caller owns. `clamp` first clips x * unit to [0, 1]; done after the affine
        map, as a clip to the per-channel images of 0 and 1, it is the same numbers in one pass.

        On channels_last memory the per-channel constants broadcast over (N, H, W*3) rows as a
        repeating pattern, and the affine map is one fused multiply-add; uint8 is converted to
        float first (a fast plain copy; the mixed-dtype multiply-add was slower than both)."""
        scale = self._constant(("scale", unit), lambda: self.scale * unit)
        if x.dim() == 4 and x.shape[1] == 3 and x.is_contiguous(memory_format=torch.channels_last):
            w = x.shape[3]
            rows = _rows(x)
            if rows.dtype != torch.float32:
                rows, inplace = rows.float(), True
            shift = self._constant(("shift row", w), lambda: self.shift.view(3).repeat(w))
            scale_row = self._constant(("scale row", unit, w), lambda: scale.view(3).repeat(w))
            out = torch.addcmul(shift, rows, scale_row, out=rows if inplace else None)
            if clamp:
                top = self._constant(("top row", w), lambda: (self.scale + self.shift).view(3).repeat(w))
                torch.clamp(out, shift, top, out=out)
            return _from_pixels(out, x.shape)
        out = torch.addcmul(self.shift, x.float(), scale)
        return out.clamp_(self.shift, self.scale + self.shift) if clamp else out

    def __call__(self, x: torch.Tensor, train: bool = True, params: Params | None = None,
                 ids: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 batch -> normalised float (N,3,S,S), channels_last. With `ids`, x is the whole
        cache (on this device) and the batch is x[ids], read without a separate gather.
        `train=False` gives the evaluation view: resize to the frame and take the centre crop,
        no randomness."""
        x = as_nchw_uint8(x)
        if ids is not None:
            ids = ids.to(x.device)
            if not train or x.device != self.device:  # geometry reads training crops by ids
                x, ids = _take(x, ids), None
        x = x.to(self.device, non_blocking=True)
        if train:
            p = params or self.sample(x.shape[0] if ids is None else len(ids), x.shape[2])
            if self.fuses(x.shape[2]):
                rows = self.geometry(x, p, ids, planar=True)
                shift = None if p.alpha is None else self.lighting(p.alpha)
                noise = None if p.noise is None else p.noise.permute(0, 2, 1, 3)
                out = self.fused(rows, p.brightness, p.contrast, p.saturation, shift, noise)
                if out is not None:
                    return out
            x = self.geometry(x, p, ids)
        else:
            p = None
            x = self.centre(x)
        x = x.contiguous(memory_format=torch.channels_last)  # 0..255, uint8 unless resized
        if p is None or not self.recipe.photometric:
            return self.normalize(x, 1 / 255)
        x, clamp = self.photometric(x, p)
        return self.normalize(x, inplace=True, clamp=clamp)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8 -> (N,3,S,S) in 0..255: resize to the frame, centre crop."""
        side, _ = self.frame(x.shape[2])
        if side != x.shape[2]:
            x = resize(x, (side, side))
        o = (side - self.size) // 2
        return x[:, :, o:o + self.size, o:o + self.size]

    def ten_crop(self, x: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        """The paper's test-time views: 4 corners + centre, and their mirror images.

        Crops come from the frame the training crops came from (`frame`): for the paper's
        recipe the image enlarged by 256/224, as in the paper; for a recipe of padded crops
        (randomcrop, combined) the image reflect-padded as in training; for a recipe without
        crops the image itself, whose five crops are one (the views are then the image and its
        mirror). Views from any other frame show the model a scale or a border it never saw
        in training (Combined-Small: 29.68% top-1 from the image enlarged by 256/224 against
        42.16% from its centre). Returns (10, N, 3, S, S) normalised; with `distinct`, where the
        five crops are one, only the image and its mirror (2, N, 3, S, S): the same mean over
        views for a fifth of the model's work.
        """
        x = as_nchw_uint8(x).to(self.device)
        side, pad = self.frame(x.shape[2])
        big = x.float()
        if side != x.shape[2]:
            big = resize(big, (side, side))
        if pad:
            big = F.pad(big, (pad, pad, pad, pad), mode="reflect")
        big, side = big.div_(255), side + 2 * pad
        s, e = self.size, side - self.size
        offs = [(0, 0)] if distinct and e == 0 else [(0, 0), (0, e), (e, 0), (e, e), (e // 2, e // 2)]
        crops = [big[:, :, oy:oy + s, ox:ox + s] for oy, ox in offs]
        crops += [c.flip(-1) for c in crops]
        return self.normalize(torch.stack(crops))


def indexed(device: torch.device | str) -> torch.device:
    """The device as tensors on it report it: a bare "cuda" becomes "cuda:N", the current GPU."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None else device


def _take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[ids] for an (M,3,H,W) batch, keeping its memory layout (the cache's is channels_last:
    a gather through the NCHW view would write NCHW and need a transposing copy after)."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(0, ids).permute(0, 3, 1, 2)
    return x.index_select(0, ids)


def _window(table: torch.Tensor, start: torch.Tensor, n: int, copy: bool) -> torch.Tensor:
    """table[start:start + n] for a one-element tensor `start`: a view (reads `start` on the
    host), or with `copy` a copy that stays on the device without a host sync."""
    if copy:
        return table.unfold(0, n, 1).index_select(0, start).view(n)
    return table.narrow(0, int(start), n)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) channels_last -> its memory as (N, H, W*3) rows (a view). Per-channel
    constants broadcast over these as a repeating (W*3,) pattern: a (1,3,1,1) broadcast over
    channels_last memory runs 5x slower on the CPU."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).view(n, h, w * c)


def _saturation_terms(luma: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,3,3) luma 1^T (every column the luma weights) and I - luma 1^T, for `saturate`."""
    gray = luma.to(device).view(1, 3, 1).expand(1, 3, 3).contiguous()
    return gray, torch.eye(3, device=device) - gray


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> its (N, H*W, 3) pixel rows (a view when x is channels_last)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _from_pixels(v: torch.Tensor, shape) -> torch.Tensor:
    """NHWC memory (pixel rows or (N, H, W*3) rows) -> (N,3,H,W) with channels_last strides (a view)."""
    n, c, h, w = shape
    return v.view(n, h, w, c).permute(0, 3, 1, 2)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,1,H,W) luma, torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)
