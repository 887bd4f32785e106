"""The small-map convolution (alexnet/smallconv.py): its gradients against autograd through
F.conv2d, and the layers where the models take it, for every registered variant."""

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from alexnet import smallconv
from alexnet.models import VARIANTS, create_model
from alexnet.smallconv import Conv2d, conv2d_small_map, weight_grad


@pytest.mark.parametrize("k,pad,size", [(3, 1, 3), (3, 1, 5), (5, 2, 4), (3, 0, 5), (1, 0, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(k, pad, size, bias):
    g = torch.Generator().manual_seed(k * 10 + size)
    x = torch.randn(3, 4, size, size, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda x, w, b=None: conv2d_small_map(x, w, b, pad), inputs)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_weight_grad_matches_onednn(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 3, 3, generator=g).to(memory_format=layout)
    w = torch.randn(24, 16, 3, 3, generator=g)
    go = torch.randn(8, 24, 3, 3, generator=g).to(memory_format=layout)
    ref = torch.ops.aten.convolution_backward(go, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                              [False, True, False])[1]
    torch.testing.assert_close(weight_grad(x, go, 3, 1), ref, rtol=1e-4, atol=1e-4)
    bf = weight_grad(x.bfloat16(), go.bfloat16(), 3, 1)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@contextmanager
def counted() -> Iterator[list[bool]]:
    """Records, for each call of the small-map path, whether the switch was on."""
    taken: list[bool] = []
    real = smallconv._SmallMapConv.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smallconv._SmallMapConv, "apply", lambda *a: (taken.append(smallconv.enabled()), real(*a))[1])
        yield taken


def _step_grads(model, x, y, on: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """One bf16-autocast forward/backward; (calls of the small-map path, gradients)."""
    model.zero_grad(set_to_none=True)
    with smallconv.switched(on), counted() as taken:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return len(taken), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_gradients_same_on_both_paths(name):
    """conv3-conv5 (3x3 maps at 64x64 input) take the small-map path under bf16; the
    gradients of every parameter agree with oneDNN's to bf16 rounding."""
    torch.manual_seed(0)
    model = create_model(name, 200).to(memory_format=torch.channels_last)
    model.eval()  # no dropout, BatchNorm on running statistics: both passes see the same function
    x = torch.randn(8, 3, 64, 64).to(memory_format=torch.channels_last)
    y = torch.arange(8)
    n_on, on = _step_grads(model, x, y, True)
    n_off, off = _step_grads(model, x, y, False)
    assert (n_on, n_off) == (3, 0)
    for pname in on:
        a, b = on[pname].flatten(), off[pname].flatten()
        cos = F.cosine_similarity(a, b, dim=0).item()
        assert cos > 0.999, f"{name}: {pname} gradient differs between paths (cosine {cos:.5f})"
        assert (a - b).norm() <= 2e-2 * b.norm(), f"{name}: {pname} gradient's scale differs between paths"


def test_where_the_path_is_not_taken():
    torch.manual_seed(0)
    model = create_model("combined_gap", 10)

    def calls(x, amp=True, grad=True):
        with counted() as taken, torch.set_grad_enabled(grad):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model(x)
        return len(taken)

    assert calls(torch.randn(2, 3, 64, 64)) == 3
    assert calls(torch.randn(2, 3, 64, 64), amp=False) == 0  # fp32 on an AVX512 CPU: oneDNN is as fast
    assert calls(torch.randn(2, 3, 64, 64), grad=False) == 0  # evaluation
    assert calls(torch.randn(2, 3, 224, 224)) == 0  # 13x13 maps: oneDNN is faster
    with smallconv.switched(False):
        assert calls(torch.randn(2, 3, 64, 64)) == 0


# (Conv2d keyword arguments, input side, whether the small-map path is taken); 8 -> 16 channels
CONFIGS = [
    (dict(kernel_size=3, padding=1), 3, True),
    (dict(kernel_size=3, padding=1), 6, True),  # 36 output positions, the limit
    (dict(kernel_size=3, padding=1), 7, False),  # 49
    (dict(kernel_size=5, padding=2), 4, True),
    (dict(kernel_size=3, padding=0), 5, True),
    (dict(kernel_size=3, padding=1, bias=False), 3, True),
    (dict(kernel_size=3, padding=1, stride=2), 3, False),
    (dict(kernel_size=3, padding=2, dilation=2), 3, False),
    (dict(kernel_size=3, padding=1, groups=2), 3, False),
    (dict(kernel_size=3, padding="same"), 3, False),
    (dict(kernel_size=3, padding=(1, 0)), 3, False),
    (dict(kernel_size=(3, 1), padding=1), 3, False),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), 3, False),
    (dict(kernel_size=3, padding=1, padding_mode="circular"), 3, False),
]


@pytest.mark.parametrize("kw,side,taken", CONFIGS, ids=[f"{i}" for i in range(len(CONFIGS))])
@pytest.mark.parametrize("mode", ["autocast", "bf16_model"])
def test_conv2d_dispatch_and_equivalence(kw, side, taken, mode):
    """Each configuration takes the path exactly where it should, and its output and
    gradients match nn.Conv2d's with the same parameters, to bf16 rounding."""
    torch.manual_seed(0)
    ours = Conv2d(8, 16, **kw)
    ref = torch.nn.Conv2d(8, 16, **kw)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 8, side, side)
    if mode == "bf16_model":
        ours, ref, x = ours.bfloat16(), ref.bfloat16(), x.bfloat16()
    results = []
    for conv, count in ((ours, True), (ref, False)):
        xi = x.clone().requires_grad_()
        with counted() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = conv(xi)
        out.float().square().sum().backward()
        if count:
            assert len(seen) == (1 if taken else 0)
        results.append([out.float(), xi.grad.float(), *(p.grad.float() for p in conv.parameters())])
    for a, b in zip(*results):
        assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6


def test_mixed_dtypes_fail_as_nn_conv2d_does():
    conv = Conv2d(4, 6, 3, 1, 1)
    with pytest.raises(RuntimeError, match="should be the same"):
        conv(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True))


def test_module_keeps_conv2d_parameters():
    conv = Conv2d(4, 6, 3, 1, 1)
    assert isinstance(conv, torch.nn.Conv2d)
    assert list(conv.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 1, 1))


def test_bench_compares_the_switch(capsys):
    import argparse

    from alexnet.bench import add_bench_args, run_bench

    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--compare", "small_map_grad", "--variants", "combined_gap", "--bs", "4", "--steps", "2",
                      "--rounds", "1", "--device", "cpu"])
    with counted() as taken:  # whether each call came from a step with the switch on
        rows = run_bench(a, log=print)
    assert rows[0]["setting"] == "small_map_grad" and rows[0]["on"] > 0 and rows[0]["off"] > 0
    # 2 warm-up and 2 timed steps with it on, 3 convolutions each; none with it off
    assert taken == [True] * 12
    assert "on/off" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["baseline", "combined_gap"])
def test_fp32_products_on_avx2_cpus(name, monkeypatch):
    """Where the CPU's vector unit is AVX2 (FP32_PAYS), fp32 steps on channels_last inputs take the
    products for conv3-conv5, NCHW inputs and AVX512 CPUs keep oneDNN's gradient, and the
    gradients of every parameter agree with oneDNN's to fp32 rounding."""
    torch.manual_seed(0)
    model = create_model(name, 200).eval()  # no dropout; BatchNorm on running statistics
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8)

    def grads(m, inp, pays):
        monkeypatch.setattr(smallconv, "FP32_PAYS", pays)
        m.zero_grad(set_to_none=True)
        with counted() as taken:
            F.cross_entropy(m(inp), y).backward()
        return len(taken), {n: p.grad.clone() for n, p in m.named_parameters()}

    cl = model.to(memory_format=torch.channels_last)
    n_on, on = grads(cl, x.contiguous(memory_format=torch.channels_last), True)
    n_off, off = grads(cl, x.contiguous(memory_format=torch.channels_last), False)
    assert (n_on, n_off) == (3, 0)
    assert grads(model.to(memory_format=torch.contiguous_format), x, True)[0] == 0  # NCHW: copies, slower
    for pname in on:
        torch.testing.assert_close(on[pname], off[pname], rtol=1e-4, atol=1e-6, msg=pname)
