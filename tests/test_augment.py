"""Batched augmentation: the same pixels as a per-image torchvision reference given the same
random parameters; identity at zero strength; independent parameters per image."""

import warnings

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from alexnet import fused
from alexnet.augment import NOISE_CLIP, NOISE_CODES, RECIPES, BatchAugment, Recipe, _window, as_nchw_uint8
from alexnet.errors import ConfigError
from tests.conftest import needs_compiler

MEAN, STD = [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]
EIGVAL = [0.2, 0.02, 0.004]
EIGVEC = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0].tolist()


def batch(n=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)  # NHWC, like the cache


def make(recipe, size=64, seed=0):
    return BatchAugment(recipe, size, MEAN, STD, EIGVAL, EIGVEC, generator=torch.Generator().manual_seed(seed))


def reference(img, recipe, p, i, size, aug):
    """One image through torchvision's functional ops with the batch's parameters."""
    x = img.permute(2, 0, 1).float()  # (3,H,W) 0..255
    # the frame crops come from, from the recipe (the paper's: 256/224 times the training size)
    h, pad = x.shape[1], recipe.crop_pad
    side = round(size * recipe.scale) if recipe.scale > 1 or h != size else size
    if side != x.shape[1]:
        x = TF.resize(x[None], [side, side], antialias=True)[0]  # torchvision's default
    if pad:
        x = torch.nn.functional.pad(x[None], [pad] * 4, mode="reflect")[0]
    x = TF.crop(x, int(p.oy[i]), int(p.ox[i]), size, size)
    if p.flip[i]:
        x = TF.horizontal_flip(x)
    x = x / 255
    if recipe.brightness:
        x = TF.adjust_brightness(x, float(p.brightness[i]))
    if recipe.contrast:
        x = TF.adjust_contrast(x, float(p.contrast[i]))
    if recipe.saturation:
        x = TF.adjust_saturation(x, float(p.saturation[i]))
    if p.alpha is not None:
        shift = torch.tensor(EIGVEC) @ (p.alpha[i] * torch.tensor(EIGVAL))
        x = (x + shift.view(3, 1, 1)).clamp(0, 1)
    if p.noise is not None:
        x = (x + p.pixel_noise()[i]).clamp(0, 1)
    return TF.normalize(x, MEAN, [1 / 255] * 3 if recipe.raw_pixels else STD)


# Colour recipes at the cache's size on the CPU run as one compiled kernel (alexnet/fused.py);
# the eager ops are their path elsewhere (CUDA, other sizes, or where there is no kernel).
WITH_COLOUR = {**RECIPES, "lighting64": Recipe(crop_pad=2, flip=True, lighting_std=0.1, noise_std=0.05),
               "brightness": Recipe(brightness=0.4)}
FUSING = [name for name, r in WITH_COLOUR.items() if r.photometric and r.scale == 1]

# "default": as BatchAugment decides (the kernel at size 64 for a colour recipe, else the
# eager ops); "eager": the eager ops where the kernel would run.
PATHS = [pytest.param(name, size, "default", marks=[needs_compiler] if name in FUSING and size == 64 else [])
         for name in WITH_COLOUR for size in (48, 64, 72, 224)] + [(name, 64, "eager") for name in FUSING]


@pytest.mark.parametrize("name,size,path", PATHS)
def test_batched_equals_per_image_reference(name, size, path):
    recipe = WITH_COLOUR[name]
    aug = make(recipe, size)
    if path == "eager":
        aug.fused = None
    x = batch()
    p = aug.sample(len(x), 64)
    out = aug(x, train=True, params=p)
    assert out.shape == (len(x), 3, size, size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    kernel_batches = 1 if path == "default" and name in FUSING and size == 64 else 0
    assert (aug.fused.calls if aug.fused else 0) == kernel_batches  # the kernel made the batch, or not
    assert aug.fused is None or aug.fused.failed is None
    for i in range(len(x)):
        torch.testing.assert_close(out[i], reference(x[i], recipe, p, i, size, aug), atol=2e-4, rtol=1e-4)


@needs_compiler
@pytest.mark.parametrize("name", FUSING)
def test_fused_kernel_equals_eager_ops(name):
    # The same batches both ways, read by ids out of a cache as training does, also under
    # autocast (the kernel computes in float32 whatever the caller's context).
    aug = make(WITH_COLOUR[name])
    cache, ids = batch(40), torch.tensor([3, 17, 3, 39, 0, 22, 8, 9])
    p = aug.sample(len(ids), 64)
    out = aug(cache, train=True, params=p, ids=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(aug(cache, train=True, params=p, ids=ids), out, atol=0, rtol=0)
    assert aug.fused.calls == 2
    aug.fused = None
    torch.testing.assert_close(out, aug(cache, train=True, params=p, ids=ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value,on_cpu,on_cuda", [(None, True, False), ("1", True, False), ("0", False, False),
                                                 ("all", True, True)])
def test_which_devices_fuse(monkeypatch, value, on_cpu, on_cuda):
    # The kernel is the CPU's default; CUDA takes it only when asked (ALEXNET_FUSED_AUGMENT=all).
    if value is None:
        monkeypatch.delenv(fused.ENV, raising=False)
    else:
        monkeypatch.setenv(fused.ENV, value)
    assert (fused.enabled(torch.device("cpu")), fused.enabled(torch.device("cuda"))) == (on_cpu, on_cuda)
    assert (make(RECIPES["combined"]).fused is not None) == on_cpu


def test_an_unknown_fused_setting_is_refused(monkeypatch):
    monkeypatch.setenv(fused.ENV, "yes")
    with pytest.raises(ConfigError, match=r"ALEXNET_FUSED_AUGMENT='yes': expected 0 .*, 1 .* or all"):
        make(RECIPES["combined"])


@pytest.mark.parametrize("name", ["randomcrop", "pixel", "paper"])
def test_planar_crops_are_the_same_pixels(name):
    # The kernel's (N, S, 3, S) rows hold exactly the crops of the channels_last layout.
    aug = make(RECIPES[name])
    cache, ids = batch(20), torch.tensor([5, 1, 19, 5])
    p = aug.sample(len(ids), 64)
    nchw = as_nchw_uint8(cache)
    planar = aug.geometry(nchw, p, ids, planar=True)
    assert planar.shape == (4, 64, 3, 64) and planar.is_contiguous()
    torch.testing.assert_close(planar.permute(0, 2, 1, 3), aug.geometry(nchw, p, ids), atol=0, rtol=0)


def test_fused_kernel_falls_back_to_eager_once(monkeypatch):
    def no_compiler(fn, **kw):
        def raises(*a):
            calls.append(1)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore text")
        return raises

    calls, layouts = [], []
    monkeypatch.setattr(torch, "compile", no_compiler)
    aug = make(RECIPES["combined"])
    geometry = aug.geometry

    def recorded(*a, planar=False):
        layouts.append(planar)
        return geometry(*a, planar=planar)

    monkeypatch.setattr(aug, "geometry", recorded)
    x = batch()
    p = aug.sample(len(x), 64)
    with pytest.warns(RuntimeWarning, match=r"no compiled augmentation kernel \(RuntimeError: .*no working C"):
        out = aug(x, train=True, params=p)
    assert aug.fused.failed == "RuntimeError: InvalidCxxCompiler: no working C++ compiler found"
    assert layouts == [True, False]  # the kernel's crops, then the eager ops' own
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt, no planar crops
        assert torch.equal(aug(x, train=True, params=p), out)
    assert len(calls) == 1 and layouts == [True, False, False] and not aug.fuses(64)
    aug.fused = None
    assert torch.equal(aug(x, train=True, params=p), out)  # the eager ops made the batch


def test_fused_kernel_only_on_the_cpu_and_not_when_turned_off(monkeypatch):
    assert fused.enabled(torch.device("cpu")) and not fused.enabled(torch.device("cuda", 0))
    assert make(RECIPES["combined"]).fused is not None and make(RECIPES["randomcrop"]).fused is None
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")
    assert make(RECIPES["combined"]).fused is None


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("train", [True, False])
def test_reading_from_the_cache_by_ids_equals_gathering_first(name, train):
    aug = make(RECIPES[name])
    cache = batch(40)
    ids = torch.tensor([3, 17, 3, 39, 0, 22])
    p = aug.sample(len(ids), 64)
    torch.testing.assert_close(aug(cache, train=train, params=p, ids=ids), aug(cache[ids], train=train, params=p),
                               atol=0, rtol=0)


def test_zero_strength_is_identity():
    aug = make(Recipe())
    x = batch()
    out = aug(x, train=True)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    # Every op at strength zero leaves the pixels unchanged, also when others are on.
    on = make(Recipe(crop_pad=0, brightness=0.0, contrast=0.0, saturation=0.0, noise_std=0.0, lighting_std=0.0))
    torch.testing.assert_close(on(x, train=True), expected)


def test_eval_view_is_plain_normalisation():
    aug = make(RECIPES["combined"])
    x = batch()
    torch.testing.assert_close(aug(x, train=False), make(Recipe())(x, train=True))


def test_parameters_independent_per_image():
    aug = make(RECIPES["combined"])
    x = batch(1).expand(32, -1, -1, -1).contiguous()  # 32 copies of one image
    out = aug(x, train=True)
    distinct = {tuple(out[i].flatten()[:50].tolist()) for i in range(len(out))}
    assert len(distinct) > 16
    p = aug.sample(256, 64)
    assert len(set(zip(p.oy.tolist(), p.ox.tolist()))) > 20
    assert 0.3 < p.flip.float().mean() < 0.7
    for name in ("brightness", "contrast", "saturation"):  # jitter 0.3: factors in [0.7, 1.3], one per image
        f = getattr(p, name)
        assert f.shape == (256,) and f.min() >= 0.7 and f.max() <= 1.3 and f.std() > 0.1, name
    assert p.noise.shape[0] == 256 and len({tuple(n.flatten()[:64].tolist()) for n in p.noise}) == 256
    q = make(RECIPES["paper"]).sample(256, 64)  # the paper's lighting: alpha ~ N(0, 0.1) per image and channel
    assert q.alpha.shape == (256, 3) and 0.07 < q.alpha.std() < 0.13 and len(set(q.alpha[:, 0].tolist())) == 256


def test_same_generator_seed_same_batch():
    x = batch()
    assert torch.equal(make(RECIPES["combined"], seed=3)(x), make(RECIPES["combined"], seed=3)(x))


def test_ten_crop_views():
    aug = make(RECIPES["paper"])
    x = batch(2)
    v = aug.ten_crop(x)
    assert v.shape == (10, 2, 3, 64, 64)
    # torchvision's ten_crop (corners, centre, then their mirrors) of the image enlarged by 256/224
    big = TF.resize(as_nchw_uint8(x).float(), [73, 73], antialias=False) / 255
    # the paper's recipe: centred pixels in 0..255 units (raw_pixels)
    want = torch.stack([(c - torch.tensor(MEAN).view(3, 1, 1)) * 255 for c in TF.ten_crop(big, [64, 64])])
    # The same views: torchvision names the mirrored ones by their corner in the mirrored image
    # (its top-left is the mirror of the top-right crop), the paper by the crop mirrored. The
    # centre differs: torchvision's is the centre of the mirrored image, one pixel over when
    # the margin is odd (73 - 64); the paper's is the centre crop's mirror image.
    torch.testing.assert_close(v[[0, 1, 2, 3, 4, 6, 5, 8, 7]], want[:9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[9], v[4].flip(-1), atol=0, rtol=0)


@pytest.mark.parametrize("recipe", [name for name, r in RECIPES.items() if r.scale == 1])
def test_ten_crop_views_come_from_the_training_frame(recipe):
    """Corners and centre of the frame training crops came from: the image reflect-padded by
    the recipe's pad (no enlargement: the model never saw one), or the image itself."""
    aug = make(RECIPES[recipe])
    x = batch(2)
    v = aug.ten_crop(x)
    pad = RECIPES[recipe].crop_pad
    frame = as_nchw_uint8(x).float() / 255
    if pad:
        frame = torch.nn.functional.pad(frame, (pad,) * 4, mode="reflect")
    want = torch.stack([(c - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
                        for c in TF.ten_crop(frame, [64, 64])])
    assert v.shape == (10, 2, 3, 64, 64)
    torch.testing.assert_close(v[[0, 1, 2, 3, 4, 6, 5, 8, 7]], want[:9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[9], v[4].flip(-1), atol=0, rtol=0)
    torch.testing.assert_close(v[4], aug(x, train=False), atol=1e-5, rtol=1e-5)  # the centre: the eval view
    # What evaluation runs: the distinct views only, with the same mean of the model's softmax.
    d = aug.ten_crop(x, distinct=True)
    assert torch.equal(d, v) if pad else torch.equal(d, v[[0, 5]])
    from alexnet.evaluate import logits_for
    from alexnet.models import create_model

    model = create_model("combined_gap", 200).eval()
    with torch.no_grad():
        want = torch.stack([model(view).softmax(-1) for view in v]).mean(0)  # the paper's averaged predictions
        got = logits_for(model, x, aug, "10crop", amp=False, channels_last=False)
    torch.testing.assert_close(got.exp(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.softmax(-1), want, atol=1e-6, rtol=1e-5)  # what predict shows


def test_upsampled_geometry():
    aug = make(RECIPES["paper"], size=224)
    assert aug(batch(2), train=True).shape == (2, 3, 224, 224)
    assert aug(batch(2), train=False).shape == (2, 3, 224, 224)


def test_bad_input_is_explained():
    aug = make(Recipe())
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="4-d"):
        aug(torch.zeros(64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 colour channels"):
        as_nchw_uint8(torch.zeros(2, 64, 64, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="brightness"):
        Recipe(brightness=1.5)
    with pytest.raises(ConfigError, match="eigval"):
        BatchAugment(Recipe(lighting_std=0.1), 64, MEAN, STD)


@pytest.mark.parametrize("field,value,said", [
    ("scale", float("nan"), "scale must be a finite number, got nan"),
    ("scale", float("inf"), "scale must be a finite number, got inf"),
    ("scale", 0.5, "scale must be >= 1, got 0.5"),
    ("noise_std", float("nan"), "noise_std must be a finite number, got nan"),
    ("lighting_std", "0.1", "lighting_std must be a finite number, got '0.1'"),
    ("crop_pad", 2.5, "crop_pad must be a whole number of pixels >= 0, got 2.5"),
    ("crop_pad", True, "crop_pad must be a whole number of pixels >= 0, got True"),
    ("flip", 2, "flip must be True or False, got 2"),
    ("flip", "yes", "flip must be True or False, got 'yes'"),
])
def test_a_recipe_of_values_that_are_no_strength_is_refused(field, value, said):
    # NaN noise would turn the noise off without a word; inf, a huge scale or a fractional
    # pad would fail deep inside torch.
    with pytest.raises(ConfigError) as e:
        Recipe(**{field: value})
    assert str(e.value) == said


def test_a_recipe_of_numpy_numbers_is_the_same_recipe():
    # Computed in a transforms file, and kept so in its checkpoints: they load as they trained.
    import numpy as np

    r = Recipe(crop_pad=np.int64(2), flip=1, brightness=np.float32(0.25), scale=np.float64(1.5), raw_pixels=np.bool_(0))
    assert r == Recipe(crop_pad=2, flip=True, brightness=0.25, scale=1.5)
    assert [type(v) for v in r.to_dict().values()] == [int, float, bool, float, float, float, float, float, bool]


def test_noise_is_gaussian_independent_and_seeded():
    recipe = Recipe(noise_std=0.05)
    aug = make(recipe)
    p = aug.sample(64, 64)
    # int8 codes in row-planar memory, the fused kernel's order: (N, S, 3, S) contiguous
    assert p.noise.dtype == torch.int8 and p.noise.shape == (64, 3, 64, 64)
    assert p.noise.permute(0, 2, 1, 3).is_contiguous()
    assert p.noise.abs().max() <= NOISE_CODES
    n = p.pixel_noise()
    assert p.noise_unit == pytest.approx(0.05 * NOISE_CLIP / NOISE_CODES)
    torch.testing.assert_close(n, p.noise.float() * p.noise_unit)
    # The codes resolve the normal finely: 25.4 codes per standard deviation, so 786k
    # draws, which reach beyond +-3.9 standard deviations, use more than 200 of them.
    assert len(p.noise.unique()) > 200
    # Each image's noise has the recipe's std and no mean, and images get different noise.
    assert torch.allclose(n.std(dim=(1, 2, 3)), torch.full((64,), 0.05), rtol=0.05)
    assert n.mean(dim=(1, 2, 3)).abs().max() < 0.005
    flat = n.permute(0, 2, 1, 3).reshape(64, -1)
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(64)).abs().max() < 0.1
    # Neighbouring pixels of one image are uncorrelated (no smoothing, no repeats).
    assert torch.corrcoef(torch.stack([flat[:, :-3].flatten(), flat[:, 3:].flatten()]))[0, 1].abs() < 0.02
    # The draw is a function of the generator's seed only.
    torch.testing.assert_close(make(recipe, seed=5).sample(8, 64).noise, make(recipe, seed=5).sample(8, 64).noise)
    assert not torch.equal(make(recipe, seed=5).sample(8, 64).noise, make(recipe, seed=6).sample(8, 64).noise)


def test_noise_window_copy_equals_view():
    # CUDA reads the noise window by a device-side copy (no host sync), the CPU by a view.
    table, start = torch.randn(1000), torch.tensor([123])
    view = _window(table, start, 300, copy=False)
    assert view.data_ptr() == table[123:].data_ptr()
    assert torch.equal(_window(table, start, 300, copy=True), view)


@pytest.mark.parametrize("per_image_matrix", [False, True])
def test_saturation_both_ways_match_torchvision(per_image_matrix):
    # The CPU's 1x1 convolution + lerp and the GPUs' per-image 3x3 matmul give torchvision's numbers.
    aug = make(RECIPES["combined"])
    g = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    s = torch.tensor([0.0, 0.5, 0.7, 0.99, 1.0, 1.01, 1.3, 2.0])
    out = aug.saturate(x, s, per_image_matrix=per_image_matrix)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(len(x)):
        torch.testing.assert_close(out[i].clamp(0, 1), TF.adjust_saturation(x[i], float(s[i])), atol=1e-6, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a batch made inside autocast stays float32
        torch.testing.assert_close(aug.saturate(x, s, per_image_matrix=per_image_matrix), out, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["randomcrop", "paper"])
def test_every_crop_offset_and_mirror(name):
    # The crop tables hold one row per offset and mirror: read every one of them once.
    recipe = RECIPES[name]
    aug = make(recipe)
    side, pad = aug.frame(64)
    span = side + 2 * pad - 64 + 1
    x = batch(2 * span)
    p = aug.sample(2 * span, 64)
    p.oy = torch.arange(2 * span).flip(0) % span
    p.ox = torch.arange(2 * span) % span
    p.flip = torch.arange(2 * span) >= span
    out = aug(x, train=True, params=p)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], reference(x[i], recipe, p, i, 64, aug), atol=2e-4, rtol=1e-4)



def test_a_transform_output_larger_than_the_size_is_shrunk_antialiased():
    # A torchvision transform file's 256-pixel output trained at 64 is shrunk as torchvision
    # (and PIL) shrink: each output pixel a weighted sum of a neighbourhood, not of the 2x2
    # pixels plain bilinear reads out of each 4x4 block (aliasing).
    from alexnet.loader import PerImageBatches
    aug = make(RECIPES["baseline"])
    batches = PerImageBatches(None, None, None, aug, bs=2, workers=0, seed=0, source="t.py")
    big = batch(2, size=256).permute(0, 3, 1, 2)
    want = TF.normalize(TF.resize(big.float(), [64, 64], antialias=True) / 255, MEAN, STD)
    torch.testing.assert_close(batches.finish(big), want, atol=2e-4, rtol=1e-4)
