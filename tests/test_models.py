"""Every registered variant and every model file: shapes, gradients, one SGD step, parameter
counts; torchvision equivalence; the paper's LRN and initialisation."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision

from alexnet.errors import ConfigError, UserError
from alexnet.models import (VARIANTS, AlexNet, AlexNetConfig, GroupedLRN, count_parameters, create_model, paper_lrn,
                            settings_rebuild)
from alexnet.userfiles import load_model_file

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = sorted((ROOT / "models").glob("*.py"))



def documented_parameters() -> dict[str, int]:
    """The README's variants table (`alexnet summary`'s, 200 classes): variant -> parameters."""
    rows = re.findall(r"^\| `(\w+)` \| `models/\w+\.py` \|.*\| ([\d,]+) \| [\d.,]+ \|$",
                      (ROOT / "README.md").read_text(), re.M)
    return {name: int(n.replace(",", "")) for name, n in rows}


PARAMS = documented_parameters()


def test_registry_matches_documented_table():
    assert set(VARIANTS) == set(PARAMS)  # every variant documented, nothing documented that is gone


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_one_step(name):
    torch.manual_seed(0)
    model = create_model(name, 200)
    assert count_parameters(model) == PARAMS[name]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 64, 64)
    out = model(x)
    assert out.shape == (4, 200)
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {pname} got no gradient"
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # every tensor was updated
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# What each variant is, written out from the README's variants table rather than read from
# the registry, so that a registry row that loses its dropout or its BatchNorm is caught:
# dropout probabilities in the head, BatchNorm and LRN layers, linear layers, pooled map side.
STRUCTURE = {
    "baseline": ([0.0, 0.0], 0, 0, 3, 6),
    "dropout": ([0.5, 0.5], 0, 0, 3, 6),
    "batchnorm": ([0.0, 0.0], 5, 0, 3, 6),
    "combined": ([0.5, 0.5], 5, 0, 3, 6),
    "combined_small": ([0.5], 5, 0, 2, 6),
    "combined_gap": ([0.5], 5, 0, 1, 1),
    "paper": ([0.5, 0.5], 0, 2, 3, 6),
}


def test_structure_covers_every_variant():
    assert set(STRUCTURE) == set(VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_has_its_documented_layers(name):
    model = create_model(name, 200)
    dropout, bn, lrn, linear, pooled = STRUCTURE[name]
    mods = list(model.modules())
    assert [m.p for m in mods if isinstance(m, torch.nn.Dropout)] == dropout
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in mods) == bn
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in mods) == lrn
    assert sum(isinstance(m, torch.nn.Linear) for m in mods) == linear
    assert model.avgpool.output_size in (pooled, (pooled, pooled))
    # BatchNorm sits between each convolution (without bias) and its ReLU; LRN after the ReLU.
    f = list(model.features)
    for i, m in enumerate(f):
        if isinstance(m, torch.nn.BatchNorm2d):
            assert isinstance(f[i - 1], torch.nn.Conv2d) and f[i - 1].bias is None and isinstance(f[i + 1], torch.nn.ReLU)
        if isinstance(m, torch.nn.LocalResponseNorm):
            assert isinstance(f[i - 1], torch.nn.ReLU)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dropout_is_active_in_training_only(name):
    """Two training-mode passes over one batch differ exactly where the variant has dropout;
    evaluation is deterministic for all."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        for m in model.modules():  # BatchNorm's batch statistics are the same in both passes anyway;
            if isinstance(m, torch.nn.BatchNorm2d):  # its running ones would move between them
                m.momentum = 0.0
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        a, b = model.train()(x), model(x)
        assert torch.equal(model.eval()(x), model(x))
    assert (not torch.equal(a, b)) == any(p > 0 for p in STRUCTURE[name][0])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_at_224(name):
    model = create_model(name, 200).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 200)


# The paper's two towers (groups=2) halve the weights of conv2 (5x5, 96 -> 256), conv4 (3x3,
# 384 -> 384) and conv5 (3x3, 384 -> 256): each output channel sees half the input channels.
TOWERS_SAVE = sum(k * k * cin * cout // 2 for k, cin, cout in ((5, 96, 256), (3, 384, 384), (3, 384, 256)))


@pytest.mark.parametrize("path", MODEL_FILES, ids=[p.name for p in MODEL_FILES])
def test_model_files(path):
    model = load_model_file(path, 200)
    base = model.variant.split("+")[0]  # "combined_gap+dropout=0.0" modifies a registered variant
    assert base in VARIANTS
    towers = TOWERS_SAVE if "groups=2" in model.variant else 0
    assert count_parameters(model) == PARAMS[base] - towers
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    assert settings_rebuild(model, 200)  # its checkpoints evaluate without the file


def test_every_variant_has_a_model_file():
    built = {load_model_file(p, 10).variant for p in MODEL_FILES}
    assert set(VARIANTS) <= built


def test_baseline_equals_torchvision_alexnet():
    torch.manual_seed(0)
    ours = create_model("baseline", 1000).eval()
    tv = torchvision.models.alexnet(num_classes=1000).eval()
    assert count_parameters(ours) == count_parameters(tv)
    tv.load_state_dict(ours.state_dict())  # same keys and shapes, strict
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))
        x = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(ours(x), tv(x))


def test_lrn_matches_paper_formula():
    torch.manual_seed(0)
    a = torch.randn(2, 12, 5, 5).relu() * 3
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    ref = torch.empty_like(a)
    C = a.shape[1]
    for i in range(C):
        lo, hi = max(0, i - n // 2), min(C - 1, i + n // 2)
        ref[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    torch.testing.assert_close(paper_lrn()(a), ref)


def test_paper_model_structure_and_init():
    torch.manual_seed(0)
    m = create_model("paper", 200)
    convs = [l for l in m.features if isinstance(l, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert (convs[0].kernel_size, convs[0].stride) == ((11, 11), (4, 4))
    lrn_after = [i for i, l in enumerate(m.features) if isinstance(l, torch.nn.LocalResponseNorm)]
    assert len(lrn_after) == 2 and all(isinstance(m.features[i + 1], torch.nn.MaxPool2d) for i in lrn_after)
    pools = [l for l in m.features if isinstance(l, torch.nn.MaxPool2d)]
    assert all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping pooling
    # dropout 0.5 on the outputs of the two hidden FC layers, after their ReLU (the paper's
    # "first two fully-connected layers", Caffe's bvlc_alexnet), not on FC1's input
    layers = [(type(l).__name__, getattr(l, "p", None)) for l in m.classifier]
    assert layers == [("Linear", None), ("ReLU", None), ("Dropout", 0.5), ("Linear", None), ("ReLU", None),
                      ("Dropout", 0.5), ("Linear", None)]
    linears = [l for l in m.classifier if isinstance(l, torch.nn.Linear)]
    assert [l.out_features for l in linears] == [4096, 4096, 200]
    for layer in convs + linears:
        assert abs(layer.weight.mean().item()) < 1e-3
        assert abs(layer.weight.std().item() - 0.01) < 1e-3
    # conv2, conv4, conv5 and the hidden FC layers start with a constant bias: Caffe's 0.1 by
    # default, the paper's 1 when asked for; the others with 0
    constant = [False, True, False, True, True, True, True, False]
    for bias, model in ((0.1, m), (1.0, create_model("paper", 200, init_bias=1.0))):
        layers = [l for l in [*model.features, *model.classifier] if isinstance(l, (torch.nn.Conv2d, torch.nn.Linear))]
        for layer, on in zip(layers, constant):
            assert torch.equal(layer.bias, torch.full_like(layer.bias, bias if on else 0.0))
    with pytest.raises(ConfigError, match="init_bias"):
        AlexNetConfig(init="paper", init_bias=float("nan"))


def test_paper_two_towers():
    """groups=2: the paper's two GPUs. conv2, conv4 and conv5 see half the channels each, and
    LRN normalises within each half, so the first tower after conv2 does not depend on the
    second tower's conv1 kernels at all; conv3 and the FC layers connect both."""
    one, two = create_model("paper", 200), create_model("paper", 200, groups=2)
    assert count_parameters(one) - count_parameters(two) == TOWERS_SAVE
    assert [c.groups for c in two.features if isinstance(c, torch.nn.Conv2d)] == [1, 2, 1, 2, 2]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    upto_conv2 = two.features[:7]  # conv1, ReLU, LRN, pool, conv2, ReLU, LRN
    assert isinstance(upto_conv2[-1], GroupedLRN)
    with torch.no_grad():
        before = upto_conv2(x)
        two.features[0].weight[48:] = torch.randn_like(two.features[0].weight[48:])  # tower 2's conv1 kernels
        after = upto_conv2(x)
    torch.testing.assert_close(after[:, :128], before[:, :128], rtol=0, atol=0)
    assert not torch.allclose(after[:, 128:], before[:, 128:])
    a = torch.randn(2, 12, 5, 5).relu() * 3
    torch.testing.assert_close(GroupedLRN(2)(a), torch.cat([paper_lrn()(a[:, :6]), paper_lrn()(a[:, 6:])], 1))
    assert two(x).shape == (2, 200)
    with pytest.raises(ConfigError, match="groups must be a positive integer dividing every width"):
        create_model("paper", 200, groups=5)
    with pytest.raises(ConfigError, match="groups"):
        AlexNetConfig(groups=0)


def test_unknown_variant_lists_known_names():
    with pytest.raises(ConfigError, match="known variants: baseline, dropout"):
        create_model("resnet50")


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="dropout"):
        AlexNetConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="head"):
        AlexNetConfig(head="huge")
    with pytest.raises(ConfigError, match="dropout_after_fc needs a hidden FC layer"):
        AlexNetConfig(head="gap", dropout=0.5, dropout_after_fc=True)


def test_dropout_after_fc_in_the_small_head():
    m = AlexNet(AlexNetConfig(head="small", hidden=100, dropout=0.5, dropout_after_fc=True), 10)
    assert [type(l).__name__ for l in m.classifier] == ["Linear", "ReLU", "Dropout", "Linear"]


def test_small_stem_keeps_resolution():
    m = AlexNet(AlexNetConfig(stem="small", norm="batchnorm", head="gap", gap_input="pool5"), 10)
    assert m.features(torch.randn(1, 3, 64, 64)).shape[-1] == 3
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    m = AlexNet(AlexNetConfig(stem="small", norm="batchnorm", head="gap"), 10)  # the GAP of conv5's 7x7 map
    assert m.features(torch.randn(1, 3, 64, 64)).shape[-1] == 7


@pytest.mark.parametrize("img_size,side", [(64, 3), (96, 5), (224, 13)])
def test_the_gap_head_averages_conv5(img_size, side):
    """Combined-GAP is global average pooling of conv5's map, as the variant is defined. With
    pool5 before it (gap_input="pool5", the head before that setting existed), at 64x64 the
    pool's one window covers conv5's 3x3 map: the head saw its maximum, not its mean."""
    torch.manual_seed(0)
    m = create_model("combined_gap", 10).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        conv5 = m.features(x)
        assert conv5.shape[-2:] == (side, side) and isinstance(m.features[-1], torch.nn.ReLU)
        torch.testing.assert_close(m(x), m.classifier(conv5.mean((2, 3))))
        old = AlexNet(replace(m.cfg, gap_input="pool5"), 10).eval()
        old.load_state_dict(m.state_dict())  # the same weights fit both
        if img_size == 64:
            torch.testing.assert_close(old(x), m.classifier(conv5.amax((2, 3))))
        assert not torch.allclose(old(x), m(x))


def test_a_config_given_lists_holds_tuples():
    """A model file may write widths=[...]: the config must equal the one its checkpoint
    records (tuples), or its own checkpoint would be refused as another model's."""
    cfg = AlexNetConfig(widths=[64, 192, 384, 256, 256], norm_layers=[0, 1, 2, 3, 4])
    assert cfg == AlexNetConfig() and isinstance(cfg.widths, tuple) and isinstance(cfg.norm_layers, tuple)


def test_gap_input_is_a_setting_of_the_gap_head():
    with pytest.raises(ConfigError, match="gap_input pool5 is a setting of the gap head"):
        AlexNetConfig(gap_input="pool5")
    with pytest.raises(ConfigError, match="gap_input must be conv5 or pool5, got 'avg'"):
        AlexNetConfig(head="gap", gap_input="avg")


def _write(tmp_path, text, name="m.py"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,match", [
    (None, "file not found"),
    ("def build_model(:\n", "syntax error at line 1"),
    ("x = 1\n", "no build_model found"),
    ("def build_model(num_classes):\n    return 42\n", "returned int, not a torch.nn.Module"),
    ("def build_model(num_classes):\n    raise ValueError('boom')\n", r"raised ValueError \(line 2\): boom"),
    ("import no_such_module_xyz\n", "raised ModuleNotFoundError"),
])
def test_model_file_errors(tmp_path, text, match):
    p = tmp_path / "missing.py" if text is None else _write(tmp_path, text)
    with pytest.raises(UserError, match=match) as e:
        load_model_file(p, 200)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_a_file_that_is_not_python_is_named_so(tmp_path):
    p = _write(tmp_path, "# AlexNet\n\nThe README, given by mistake.\n", name="README.md")
    with pytest.raises(UserError, match=r"syntax error at line 3: .*; not a Python file\? it must define build_model"):
        load_model_file(p, 200)
    with pytest.raises(UserError) as e:
        load_model_file(_write(tmp_path, "def build_model(:\n"), 200)
    assert "not a Python file" not in str(e.value)  # a .py file's syntax error is just that


def test_weights_of_another_model_are_one_line_naming_the_keys(tmp_path):
    from alexnet.checkpoint import load_weights
    from alexnet.errors import CheckpointError

    state = create_model("combined_gap", 10).state_dict()
    with pytest.raises(CheckpointError) as e:
        load_weights(create_model("baseline", 10), state, tmp_path / "ck.pth")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'ck.pth'}: weights do not fit this model (") and "\n" not in msg
    assert re.search(r"\(\d+ missing: [\w.]+, [\w.]+, [\w.]+ and \d+ more; \d+ unexpected: ", msg)
    state = create_model("baseline", 10).state_dict()
    with pytest.raises(CheckpointError, match="size mismatch for classifier"):  # same keys, other shapes
        load_weights(create_model("baseline", 20), state, tmp_path / "ck.pth")
