"""FC1 on summed weights (alexnet/models.py): the same outputs, gradients and SGD trajectory
as FC1 over the pooled vector's 36 copies, for every registered variant; taken exactly where
the copies are identical; switched off by the environment and by the model attribute."""

import copy

import pytest
import torch

from alexnet.bench import add_bench_args, run_bench
from alexnet.cli import main
from alexnet.models import FOLD_ENV, VARIANTS, create_model, fc1_folds


def pair(name: str, num_classes: int = 200):
    """Two copies of one model (seed 0): folded, and over the copies."""
    torch.manual_seed(0)
    folded = create_model(name, num_classes)
    folded.fold_fc1 = True  # whatever ALEXNET_FOLD_FC1 the suite runs under
    plain = copy.deepcopy(folded)
    plain.fold_fc1 = False
    return folded, plain


def run(model, x, seed=1):
    """Logits of one pass, and whether the pooled grid ran: FC1 was not folded. (Counted on
    the folded path: a hook on the pooling would itself keep the copies.)"""
    calls = []
    folded = model._classify_folded
    model._classify_folded = lambda f: calls.append(1) or folded(f)
    torch.manual_seed(seed)  # the same dropout masks for both models
    try:
        return model(x), not calls
    finally:
        del model._classify_folded


def expected_fold(name: str, training: bool) -> bool:
    cfg = VARIANTS[name].model  # dropout after FC1 (the paper's model) does not touch the copies
    return cfg.head != "gap" and not (training and cfg.dropout > 0 and not cfg.dropout_after_fc)


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
        fc1 = next(m for m in folded.classifier if isinstance(m, torch.nn.Linear))
        g = fc1.weight.grad.view(fc1.out_features, -1, 36)
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


def test_summary_prints_nominal_and_computed_flops(capsys, monkeypatch):
    monkeypatch.delenv(FOLD_ENV, raising=False)
    main(["summary", "baseline"])
    out = capsys.readouterr().out
    assert "forward 189.7 MFLOPs per image (116.3 computed here: FC1 on summed weights)" in out
    assert "avgpool" in out and "classifier.1" in out  # every layer listed, as torchvision runs them
    assert "Dropout(p=0) " in out  # torchvision's layers kept, shown doing nothing
    main(["summary", "combined_gap"])
    assert "computed here" not in capsys.readouterr().out  # nothing to fold


def test_train_step_flops_count_forward_and_weight_gradient():
    """A training step's FLOPs: the forward product and the weight gradient's, no input
    gradient (the batch needs none); FC1 folded where training folds it, not under dropout."""
    from alexnet.summary import forward_mflops, train_step_mflops

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    assert train_step_mflops(linear, 8) == pytest.approx(2 * (2 * 192 * 10) / 1e6)
    assert all(p.grad is None for p in linear.parameters())  # the count leaves no gradients behind
    baseline = create_model("baseline", 200)
    baseline.fold_fc1 = True
    fc1 = 2 * 9216 * 4096 / 1e6  # FC1 over the copies, forward, per image
    # Dropout makes the copies differ in training: FC1 over them, and so its three products
    # (forward, input gradient, weight gradient) over 9216 inputs instead of 256.
    dropout = create_model("dropout", 200)
    dropout.fold_fc1 = True
    gap = train_step_mflops(dropout, 64) - train_step_mflops(baseline, 64)
    assert gap == pytest.approx(3 * (fc1 - 2 * 256 * 4096 / 1e6), rel=1e-6)
    assert forward_mflops(dropout, 64, folded=True) == pytest.approx(forward_mflops(baseline, 64, folded=True))


def test_bench_compares_the_fold(monkeypatch, capsys):
    """--compare fold_fc1 times a folded model against one over the copies, and says where
    training would not fold anyway."""
    import argparse

    import alexnet.bench as bench

    built = []
    trainable = bench._trainable

    def spy(cfg, dev, fold_fc1=True, **kw):
        model, opt = trainable(cfg, dev, fold_fc1, **kw)
        built.append((cfg.variant, model.fold_fc1))
        return model, opt

    monkeypatch.setattr(bench, "_trainable", spy)
    monkeypatch.delenv(FOLD_ENV, raising=False)
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--compare", "fold_fc1", "--variants", "baseline", "dropout", "--bs", "4", "--steps", "1",
                      "--rounds", "1", "--no-amp", "--device", "cpu"])
    rows = run_bench(a, log=print)
    assert [r["setting"] for r in rows] == ["fold_fc1"] * 2 and all(r["on"] > 0 and r["off"] > 0 for r in rows)
    assert built == [("baseline", True), ("baseline", False), ("dropout", True), ("dropout", False)]
    assert "note: dropout keep FC1's 36 copies in training" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fc1_folds_reports_each_mode(name):
    model = create_model(name, 200)
    model.fold_fc1 = True
    assert fc1_folds(model.train()) == expected_fold(name, True)
    assert model.training and all(m.training for m in model.modules())  # modes left as they were
    assert fc1_folds(model.eval()) == expected_fold(name, False)
    assert not fc1_folds(model, img_size=224)


def test_channels_last_model_folds_the_same():
    folded, plain = pair("baseline")
    folded, plain = (m.to(memory_format=torch.channels_last) for m in (folded, plain))
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    (out_f, pooled_f), (out_p, _) = run(folded, x), run(plain, x)
    assert not pooled_f
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)


def test_hooked_or_replaced_head_keeps_the_copies():
    """The fold reads FC1's weights without calling its modules: a hook on one of them, a
    replaced classifier and test-time dropout all get the head as built, as before."""
    model = pair("dropout")[0].eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hook = model.classifier[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    _, pooled = run(model, x)
    hook.remove()
    assert pooled and seen == [(2, 9216)]
    model.classifier[0].train()  # Monte Carlo dropout on an evaluating model
    (a, pooled), (b, _) = run(model, x, seed=1), run(model, x, seed=2)
    assert pooled and not torch.equal(a, b)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(9216, 7))  # the fine-tuning idiom
    out, pooled = run(model, x)
    assert pooled and out.shape == (2, 7)
