"""The numbers training and evaluation compute, each against an independent calculation:
evaluation's loss, top-1 and top-5 and its centre crop, the learning-rate schedules, label
smoothing, and the order of the training images from epoch to epoch."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from alexnet.augment import PAPER_SCALE, RECIPES, BatchAugment
from alexnet.config import TrainConfig
from alexnet.distributed import Dist
from alexnet.evaluate import evaluate
from alexnet.loader import epoch_order
from alexnet.train import build_scheduler, train_step

MEAN, STD = [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_evaluate_loss_top1_top5_against_a_hand_count():
    """8 classes, so that top-5 is not trivially 100%; batches of 7 so that the last is short."""
    torch.manual_seed(2)  # a case with labels ranked 4th, 5th and 6th: top-5 is neither top-4 nor top-6
    x, y = _images(30), torch.randint(0, 8, (30,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 8))
    res = evaluate(model, x, y, BatchAugment(RECIPES["baseline"], 64, MEAN, STD), bs=7)

    pixels = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(pixels)
    ranked = logits.argsort(1, descending=True)
    top1 = sum(int(ranked[i, 0] == y[i]) for i in range(30))
    top4, top5, top6 = (sum(int(y[i] in ranked[i, :k]) for i in range(30)) for k in (4, 5, 6))
    loss = -sum(float(logits[i].log_softmax(0)[y[i]]) for i in range(30)) / 30
    assert 0 < top1 < top4 < top5 < top6 < 30  # the case is not degenerate
    assert res["n"] == 30
    assert res["top1"] == pytest.approx(100 * top1 / 30) and res["top5"] == pytest.approx(100 * top5 / 30)
    assert res["loss"] == pytest.approx(loss, rel=1e-4)


def test_evaluation_view_is_torchvision_resize_and_centre_crop():
    """The paper's recipe evaluates the centre of the image enlarged by 256/224, in the
    paper's input units: pixels minus the mean in 0..255 units (raw_pixels)."""
    x = _images(3, seed=1)
    aug = BatchAugment(RECIPES["paper"], 64, MEAN, STD, eigval=[0.2, 0.02, 0.005], eigvec=torch.eye(3).tolist())
    side = round(64 * PAPER_SCALE)
    ref = TF.resize(x.permute(0, 3, 1, 2).float(), [side, side], antialias=False)
    ref = TF.center_crop(ref, [64, 64]) / 255
    ref = (ref - torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    assert side - 64 >= 8  # an off-centre crop would differ
    torch.testing.assert_close(aug(x, train=False), ref, atol=1e-3, rtol=1e-5)


def _lrs(schedule: str, warmup: float = 0.0, epochs: int = 4, steps: int = 10) -> list[float]:
    cfg = TrainConfig(variant="baseline", epochs=epochs, lr=0.1, schedule=schedule, warmup_epochs=warmup).validate()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, per_step = build_scheduler(cfg, opt, steps)
    assert per_step
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_give_the_documented_learning_rates():
    cos = _lrs("cosine")
    assert cos[0] == pytest.approx(0.1) and cos[20] == pytest.approx(0.05) and cos[-1] < 0.001
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    step = _lrs("step")  # / 10 at half the run, / 10 again at three quarters
    assert step[:20] == pytest.approx([0.1] * 20) and step[20:30] == pytest.approx([0.01] * 10)
    assert step[30:] == pytest.approx([0.001] * 10)
    assert _lrs("constant") == pytest.approx([0.1] * 40)
    warm = _lrs("constant", warmup=1.0)  # linear over the first epoch's 10 steps
    assert warm[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)]) and warm[10:] == pytest.approx([0.1] * 30)
    one = _lrs("onecycle")
    assert max(one) == pytest.approx(0.1) and one.index(max(one)) in (9, 10) and one[0] < 0.01 and one[-1] < 1e-4


def test_plateau_divides_by_ten_when_top1_stops_improving():
    cfg = TrainConfig(variant="baseline", lr=0.1).validate()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, per_step = build_scheduler(cfg, opt, 10)
    assert not per_step
    seen = []
    for top1 in (1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, *[2.0] * 12):
        sched.step(top1)
        seen.append(opt.param_groups[0]["lr"])
    assert seen[:4] == pytest.approx([0.1] * 4) and seen[4] == pytest.approx(0.01)  # patience 2
    assert seen[7] == pytest.approx(0.001) and seen[-1] == pytest.approx(1e-4)  # three cuts at most, as the paper


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_train_step_uses_label_smoothing(smoothing):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 5, (6,))
    cfg = TrainConfig(variant="baseline", label_smoothing=smoothing).validate()
    with torch.no_grad():
        logp = model(x).log_softmax(1)
    # (1 - eps) * NLL of the label + eps * the mean NLL over all classes
    expected = float(((1 - smoothing) * -logp[range(6), y] + smoothing * -logp.mean(1)).mean())
    _, loss = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, cfg, torch.device("cpu"))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_each_epoch_reads_every_image_once_in_a_new_order():
    n, bs = 103, 10
    orders = [epoch_order(n, seed=3, epoch=e, d=Dist(), bs=bs) for e in range(3)]
    for o in orders:
        assert len(o) == 100 and len(set(o.tolist())) == 100 and 0 <= int(o.min()) and int(o.max()) < n
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert torch.equal(orders[0], epoch_order(n, seed=3, epoch=0, d=Dist(), bs=bs))  # resume re-derives it
    assert not torch.equal(orders[0], epoch_order(n, seed=4, epoch=0, d=Dist(), bs=bs))
    two = [epoch_order(n, seed=3, epoch=0, d=Dist(rank=r, world=2), bs=bs) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 50 and not set(two[0].tolist()) & set(two[1].tolist())


def test_each_step_and_rank_draws_its_own_augmentation():
    """step_seed gives every (rank, step) its own stream, the same on every run and resume:
    the crops, flips and colour factors of two steps differ, those of one step repeat."""
    from alexnet.loader import step_seed

    # 8 ranks over 100,000 steps (about 60 epochs at batch 64 on 2 ranks): no rank repeats another's
    seeds = {step_seed(0, rank, step) for rank in range(8) for step in range(100_000)}
    assert len(seeds) == 800_000 and step_seed(0, 1, 5) != step_seed(1, 1, 5)  # the run seed counts too
    assert [step_seed(3, 0, step) for step in (0, 7)] == [3_000_009, 3_000_016]  # rank 0: a one-process run's seeds
    aug = BatchAugment(RECIPES["combined"], 64, MEAN, STD, generator=torch.Generator())

    def params(step: int):
        aug.generator.manual_seed(step_seed(0, 0, step))
        p = aug.sample(16, 64)
        return torch.cat([p.oy.float(), p.ox.float(), p.flip.float(), p.brightness, p.contrast, p.saturation])

    assert torch.equal(params(3), params(3)) and not torch.equal(params(3), params(4))
