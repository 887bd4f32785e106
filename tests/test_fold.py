"""FC1 on summed weights (alexnet/models.py): the same outputs, gradients and SGD trajectory
as FC1 over the pooled vector's 36 copies, for every registered variant; taken exactly where
the copies are identical; switched off by the environment and by the model attribute."""

import copy

import pytest
import torch

from alexnet.bench import add_bench_args, run_bench
from alexnet.cli import main
from alexnet.models import FOLD_ENV, VARIANTS, create_model


def pair(name: str, num_classes: int = 200):
    """Two copies of one model (seed 0): folded, and over the copies."""
    torch.manual_seed(0)
    folded = create_model(name, num_classes)
    plain = copy.deepcopy(folded)
    plain.fold_fc1 = False
    return folded, plain


def run(model, x, seed=1):
    """Logits of one pass, and whether the pooled grid ran (it does not when FC1 is folded)."""
    calls = []
    hook = model.avgpool.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(seed)  # the same dropout masks for both models
    try:
        return model(x), bool(calls)
    finally:
        hook.remove()


def expected_fold(name: str, training: bool) -> bool:
    cfg = VARIANTS[name].model
    return cfg.head != "gap" and not (training and cfg.dropout > 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_fold_matches_copies(name, training):
    folded, plain = pair(name)
    folded.train(training), plain.train(training)
    x = torch.randn(6, 3, 64, 64)
    y = torch.randint(0, 200, (6,))
    out_f, pooled_f = run(folded, x)
    out_p, pooled_p = run(plain, x)
    assert pooled_p and pooled_f == (not expected_fold(name, training))
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.nn.functional.cross_entropy(out_f, y).backward()
    torch.nn.functional.cross_entropy(out_p, y).backward()
    grads_p = dict(plain.named_parameters())
    for k, p in folded.named_parameters():
        torch.testing.assert_close(p.grad, grads_p[k].grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
    if expected_fold(name, training):  # each of a channel's 36 columns gets the same gradient
        g = folded.classifier[1].weight.grad.view(folded.classifier[1].out_features, -1, 36)
        assert torch.equal(g, g[..., :1].expand_as(g))


def test_sgd_trajectory_is_the_same():
    """Momentum and weight decay act on each column; five fused SGD steps keep the two
    models' parameters together (the weights are not tied: only their sums are used)."""
    folded, plain = pair("batchnorm")
    # The published lr: at 0.05 on these 8-image random batches the run is chaotic, and the
    # rounding differences between the two grow to 20% in five steps (any two summation
    # orders would); at 0.01 they stay near 1e-6.
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
            for m in (folded, plain)]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 200, (8,), generator=g)
        for m, opt in zip((folded, plain), opts):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    w_f, w_p = folded.classifier[1].weight, plain.classifier[1].weight
    assert not torch.equal(w_f[:, 0], w_f[:, 1])  # the copies' columns stay distinct parameters
    for (k, p), q in zip(folded.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["baseline", "paper"])
def test_no_fold_where_the_map_is_larger(name):
    """At 224 pixels the last map is 6x6: nothing is copied, nothing folds."""
    model = create_model(name, 10).eval()
    with torch.no_grad():
        _, pooled = run(model, torch.randn(1, 3, 224, 224))
    assert pooled


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(FOLD_ENV, "0")
    model = create_model("baseline", 10)
    assert model.fold_fc1 is False
    _, pooled = run(model, torch.randn(2, 3, 64, 64))
    assert pooled
    monkeypatch.delenv(FOLD_ENV)
    assert create_model("baseline", 10).fold_fc1 is True


def test_summary_prints_nominal_and_computed_flops(capsys):
    main(["summary", "baseline"])
    out = capsys.readouterr().out
    assert "forward 189.7 MFLOPs per image (116.3 computed here: FC1 on summed weights)" in out
    assert "avgpool" in out and "classifier.1" in out  # every layer listed, as torchvision runs them
    main(["summary", "combined_gap"])
    assert "computed here" not in capsys.readouterr().out  # nothing to fold


def test_bench_compares_the_fold():
    import argparse

    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--compare", "fold_fc1", "--variants", "baseline", "--bs", "4", "--steps", "2",
                      "--rounds", "1", "--no-amp", "--device", "cpu"])
    rows = run_bench(a, log=lambda *_: None)
    assert rows[0]["setting"] == "fold_fc1" and rows[0]["on"] > 0 and rows[0]["off"] > 0
