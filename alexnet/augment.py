"""Batched augmentation on the training device, over uint8 batches from the cache.

A `Recipe` is data: the strength of each augmentation. `BatchAugment` applies it to a whole
batch at once with independent random parameters per image: no per-image Python. Geometry
(scale, crop, flip) is one gather on uint8; photometric changes run in float on [0, 1];
normalisation comes last. Each op's formula matches torchvision's functional op of the same
name, so `tests/test_augment.py` can check pixels against a per-image reference.

Shapes: input (N, H, W, 3) uint8 (the cache's layout) or (N, 3, H, W) uint8;
output (N, 3, S, S) float32 normalised, S = the training size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from alexnet.errors import ConfigError

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
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

    def __post_init__(self) -> None:
        if self.crop_pad < 0:
            raise ConfigError(f"crop_pad must be >= 0, got {self.crop_pad}")
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
    "paper": Recipe(scale=PAPER_SCALE, flip=True, lighting_std=0.1),
}


@dataclass
class Params:
    """Random parameters for one batch, drawn once so that a reference can reuse them."""

    oy: torch.Tensor  # (N,) int64 crop offsets in the padded/scaled frame
    ox: torch.Tensor
    flip: torch.Tensor  # (N,) bool
    brightness: torch.Tensor  # (N,) float factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    noise: torch.Tensor | None  # (N, 3, S, S) float (channels_last strides) or None
    alpha: torch.Tensor | None  # (N, 3) lighting coefficients or None


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


class BatchAugment:
    """Applies a `Recipe` to uint8 batches, then normalises.

    size: the training resolution S (64 native, or 224/227 for the paper's geometry:
    the batch is upsampled on the device). mean/std: per-channel, [0, 1] scale.
    eigval/eigvec: the train set's RGB PCA for lighting.
    """

    def __init__(self, recipe: Recipe, size: int, mean, std, eigval=None, eigvec=None,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> None:
        self.recipe = recipe
        self.size = size
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.eigval = None if eigval is None else torch.as_tensor(eigval, dtype=torch.float32, device=self.device)
        self.eigvec = None if eigvec is None else torch.as_tensor(eigvec, dtype=torch.float32, device=self.device)
        if recipe.lighting_std > 0 and self.eigvec is None:
            raise ConfigError("PCA lighting needs the cache's eigval/eigvec statistics")
        self.generator = generator
        self.scale = 1 / self.std
        self.shift = -self.mean / self.std
        self.luma = torch.tensor(_LUMA, device=self.device)

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
                return torch.ones(n, device=dev)
            return 1 - strength + 2 * strength * torch.rand(n, device=dev, generator=g)

        return Params(
            oy=torch.randint(0, span, (n,), device=dev, generator=g),
            ox=torch.randint(0, span, (n,), device=dev, generator=g),
            flip=(torch.rand(n, device=dev, generator=g) < 0.5) if r.flip else torch.zeros(n, dtype=torch.bool, device=dev),
            brightness=uniform(r.brightness),
            contrast=uniform(r.contrast),
            saturation=uniform(r.saturation),
            # drawn as (N,S,S,3) so that it lines up with the channels_last batch it is added to
            noise=(torch.randn(n, self.size, self.size, 3, device=dev, generator=g).mul_(r.noise_std).permute(0, 3, 1, 2)
                   if r.noise_std > 0 else None),
            alpha=(torch.randn(n, 3, device=dev, generator=g) * r.lighting_std if r.lighting_std > 0 else None),
        )

    # -- the ops -----------------------------------------------------------------------
    def geometry(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """Resize (if the recipe scales or the size differs), reflect-pad, crop and flip.

        x: (N,3,H,W) uint8. Returns (N,3,S,S): uint8 when no resize was needed, else float
        in 0..255. The crop is two `index_select`s over whole pixel rows, rows first, then
        columns of the transposed batch; the reflection and the flip live in the indices, so no
        padded copy is made and no per-image Python runs. (Advanced indexing of every pixel
        was 5x slower on the CPU.)
        """
        n, _, h, _ = x.shape
        side, pad = self.frame(h)
        if side != h:
            x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
        if pad == 0 and side == self.size and not self.recipe.flip:
            return x
        s = self.size
        ar = torch.arange(s, device=x.device)
        base = torch.arange(n, device=x.device)[:, None] * side
        rows = base + _reflect(p.oy[:, None] + ar - pad, side)  # (N, S) global row ids
        cols_fwd = p.ox[:, None] + ar
        cols = base + _reflect(torch.where(p.flip[:, None], cols_fwd.flip(1), cols_fwd) - pad, side)
        nhwc = x.permute(0, 2, 3, 1)  # a view for the cache's NHWC batches
        c = nhwc.shape[-1]
        out = nhwc.reshape(n * side, side * c).index_select(0, rows.flatten())  # (N*S, side*C)
        out = out.view(n, s, side, c).transpose(1, 2).reshape(n * side, s * c)  # columns become rows
        out = out.index_select(0, cols.flatten()).view(n, s, s, c)  # (N, S_col, S_row, C)
        return out.permute(0, 3, 2, 1)  # (N, C, S_row, S_col)

    def photometric(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        """x: (N,3,S,S) float in [0,1], modified in place. torchvision's order and formulas,
        clamped after each op as torchvision does."""
        r = self.recipe
        if r.brightness > 0:
            x.mul_(p.brightness.view(-1, 1, 1, 1)).clamp_(0, 1)
        if r.contrast > 0:
            c = p.contrast.view(-1, 1, 1, 1)
            # mean of the grayscale image = luma weights . per-channel means (one reduction)
            mean = (x.mean(dim=(2, 3)) @ self.luma).view(-1, 1, 1, 1)
            x.mul_(c).add_((1 - c) * mean).clamp_(0, 1)
        if r.saturation > 0:
            s = p.saturation.view(-1, 1, 1, 1)
            gray = F.conv2d(x, self.luma.view(1, 3, 1, 1))  # (N,1,S,S); 3x faster than a channel sum
            x.mul_(s).add_((1 - s) * gray).clamp_(0, 1)
        if p.alpha is not None:
            # Paper section 4.1: add eigvec @ (alpha * eigval) to every pixel.
            shift = (p.alpha * self.eigval) @ self.eigvec.T  # (N, 3)
            x.add_(shift.view(-1, 3, 1, 1)).clamp_(0, 1)
        if p.noise is not None:
            x.add_(p.noise).clamp_(0, 1)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std as one fused multiply-add (x: float in [0, 1])."""
        return torch.addcmul(self.shift, x, self.scale)

    def __call__(self, x: torch.Tensor, train: bool = True, params: Params | None = None) -> torch.Tensor:
        """uint8 batch -> normalised float (N,3,S,S), channels_last. `train=False` gives the
        evaluation view: resize to the frame and take the centre crop, no randomness."""
        x = as_nchw_uint8(x).to(self.device, non_blocking=True)
        if train:
            p = params or self.sample(x.shape[0], x.shape[2])
            x = self.geometry(x, p)
        else:
            p = None
            x = self.centre(x)
        x = x.to(torch.float32, memory_format=torch.channels_last)  # 0..255
        if p is None or not self.recipe.photometric:
            return torch.addcmul(self.shift, x, self.scale / 255)
        return self.normalize(self.photometric(x.div_(255), p))

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) uint8 -> (N,3,S,S) in 0..255: resize to the frame, centre crop."""
        side, _ = self.frame(x.shape[2])
        if side != x.shape[2]:
            x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
        o = (side - self.size) // 2
        return x[:, :, o:o + self.size, o:o + self.size]

    def ten_crop(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's test-time views: 4 corners + centre, and their mirror images.

        Crops come from the image resized to round(S * scale), scale the recipe's or the
        paper's 256/224 when the recipe does not scale. Returns (10, N, 3, S, S) normalised.
        """
        x = as_nchw_uint8(x).to(self.device)
        side = round(self.size * max(self.recipe.scale, PAPER_SCALE))
        big = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False).div_(255)
        s, e = self.size, side - self.size
        offs = [(0, 0), (0, e), (e, 0), (e, e), (e // 2, e // 2)]
        crops = [big[:, :, oy:oy + s, ox:ox + s] for oy, ox in offs]
        crops += [c.flip(-1) for c in crops]
        return self.normalize(torch.stack(crops))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,1,H,W) luma, torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)
