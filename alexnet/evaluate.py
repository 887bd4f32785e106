"""Evaluation: top-1, top-5 and loss over the validation split, batched on the device, with
optional test-time augmentation (flip, or the paper's ten crops), per-class accuracy and
the most-confused class pairs. Used by training every epoch and by `evaluate.py`.
"""

from __future__ import annotations

import csv
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from alexnet.atomic import write_atomic
from alexnet.augment import BatchAugment
from alexnet.distributed import Dist, all_reduce_sum
from alexnet.loader import eval_batches

TTA = ("none", "flip", "10crop")


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


@torch.no_grad()
def logits_for(model, xb: torch.Tensor, augment: BatchAugment, tta: str, amp: bool, channels_last: bool) -> torch.Tensor:
    """Class scores for one uint8 batch: the logits of its one view, or for several (TTA) the
    log of the views' averaged softmax, as the paper averaged its ten crops' predictions.
    (Averaging logits instead weighs a view by how confident it is, not by its vote.) Either
    way softmax, top-k and cross-entropy read them as they read logits."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # One image (an evaluation's last batch, a file to predict) is run as two copies of it: a
    # model need not take a batch of one (a `.squeeze()` that drops the batch dimension),
    # which training never gives it either.
    one = len(xb) == 1
    if one:
        xb = torch.cat([xb, xb])
    if tta == "10crop":
        views = augment.ten_crop(xb, distinct=True)  # (10 or 2, N, 3, S, S)
    else:
        views = augment(xb, train=False).unsqueeze(0)
        if tta == "flip":
            views = torch.cat([views, views.flip(-1)])
    with autocast(augment.device, amp):
        out = torch.stack([model(v.contiguous(memory_format=fmt)) for v in views]).float()
    if one:
        out = out[:, :1]
    if len(out) == 1:
        return out[0]
    return out.log_softmax(-1).logsumexp(0) - math.log(len(out))  # log(mean softmax), without underflow


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, augment: BatchAugment, d: Dist = Dist(),
             bs: int = 500, tta: str = "none", amp: bool = False, channels_last: bool = False,
             num_classes: int | None = None, stop: Callable[[], bool] | None = None) -> dict | None:
    """Returns {'loss', 'top1', 'top5', 'n'} (accuracies in percent) and, when num_classes is
    given, a confusion matrix under 'confusion' (rows: true class).

    `stop`, asked before each batch: once it says so the evaluation is given up, and None is
    returned, on every rank if any gave up (they learn it from the one all-reduce the counts
    take anyway). Training passes its stop request: launchers kill a job that has not left a
    while after their signal (torchrun, Slurm 30 s, docker 10 s), and an evaluation at 224
    pixels on a CPU takes longer than that."""
    was_training = model.training
    model.eval()
    dev = augment.device
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # loss, top1, top5, count, ranks that gave up
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dev) if num_classes else None
    for xb, yb in eval_batches(x, y, bs, d):
        if stop is not None and stop():
            sums[4] = 1
            break
        yb = yb.to(dev)
        logits = logits_for(model, xb, augment, tta, amp, channels_last)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == yb[:, None]
        sums[:3] += torch.stack([F.cross_entropy(logits, yb, reduction="sum").double(),
                                 hit[:, 0].sum().double(), hit.any(1).sum().double()])
        sums[3] += len(yb)  # a host number added in place: no copy that waits for the GPU
        if conf is not None:
            conf.index_put_((yb, top[:, 0]), torch.ones_like(yb), accumulate=True)
    all_reduce_sum(sums, d)
    if conf is not None:
        all_reduce_sum(conf, d)
    model.train(was_training)
    loss, c1, c5, n, gave_up = sums.tolist()
    if gave_up:
        return None
    res = {"loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n, "n": int(n)}
    if conf is not None:
        res["confusion"] = conf.cpu()
    return res


# The first row of each table: an existing file is replaced only if it starts with it (inference.py).
PER_CLASS_HEADER = ["class", "wnid", "name", "top1", "n"]
CONFUSED_HEADER = ["true_wnid", "true_name", "predicted_wnid", "predicted_name", "count"]


def confused_path(path: str | Path) -> Path:
    """Where `write_per_class` puts the most-confused pairs, next to the per-class table."""
    path = Path(path)
    return path.with_name(f"{path.stem}_confused{path.suffix or '.csv'}")


def write_per_class(path: str | Path, confusion: torch.Tensor, wnids: list[str], names: list[str],
                    top_pairs: int = 20) -> Path:
    """Per-class accuracy as a CSV at `path` (worst class first), and the most-confused (true,
    predicted) pairs as a second CSV (`confused_path`): two tables, two files, so that any CSV
    reader takes each as it is. Returns the second file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    totals = confusion.sum(1)
    # A class without val images (possible in an image folder) has no accuracy: blank, listed last.
    acc = confusion.diag().double() / totals.clamp(min=1) * 100
    acc[totals == 0] = float("inf")
    off = confusion.clone()
    off.fill_diagonal_(0)
    flat = off.flatten().topk(min(top_pairs, off.numel())).indices.tolist()
    c = confusion.shape[0]
    rows = [PER_CLASS_HEADER]
    rows += [[i, wnids[i], names[i], f"{acc[i]:.2f}" if totals[i] else "", int(totals[i])]
             for i in acc.argsort().tolist()]
    pairs = confused_path(path)
    pair_rows = [CONFUSED_HEADER]
    pair_rows += [[wnids[t], names[t], wnids[p], names[p], int(off[t, p])]
                  for t, p in (divmod(k, c) for k in flat) if off[t, p] > 0]
    # Replaced by rename, never written in place: a file that is a hard link to another stays as it was.
    for target, table in ((path, rows), (pairs, pair_rows)):
        write_atomic(target, lambda f, table=table: csv.writer(f, lineterminator="\n").writerows(table), binary=False)
    return pairs
