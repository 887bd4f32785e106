"""Per-epoch metrics written beside the checkpoints: metrics.csv and curves.png.

The history lives in the checkpoint; these files are rewritten from it after every epoch,
so a resumed run never duplicates or loses a row. The plot is redrawn at most every
PLOT_EVERY_S seconds and at the end: drawing it takes a few tenths of a second, nothing beside
a CPU epoch of minutes, but on a GPU an epoch lasts seconds.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

from alexnet.atomic import write_atomic
from alexnet.sources import printable

COLUMNS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_n", "lr",
           "epoch_seconds", "train_seconds", "images_per_s", "peak_rss_mib", "peak_gpu_mib"]


def write_csv(path: Path, history: list[dict]) -> None:
    def write(f) -> None:
        # rows from a checkpoint of an older version may lack a column: its cells stay empty
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)

    write_atomic(path, write, binary=False)


def read_csv(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [{k: (int(v) if k in ("epoch", "val_n") else float(v)) for k, v in row.items() if v}
                for row in csv.DictReader(f)]


def recorded_epochs(out: Path) -> int:
    """The epochs a metrics.csv in `out` records (0 if there is none, or it cannot be read)."""
    try:
        return len(read_csv(Path(out) / "metrics.csv"))
    except (OSError, ValueError, TypeError, csv.Error):  # TypeError: a row with more cells than the header
        return 0


def plot_curves(path: Path, history: list[dict], title: str = "", label_smoothing: float = 0.0) -> None:
    """Loss and accuracy against epochs, train and val, one PNG. With label smoothing the
    train loss is the smoothed one, the val loss plain cross-entropy: the legend says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in history], "o-",
           label=f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train")
    a.plot(ep, [r["val_loss"] for r in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    b.plot(ep, [r["train_top1"] for r in history], "o-", label="train top-1")
    b.plot(ep, [r["val_top1"] for r in history], "o-", label="val top-1")
    b.plot(ep, [r["val_top5"] for r in history], "o--", label="val top-5")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class MetricsLog:
    """Writes metrics.csv and curves.png under `out` (rank 0 only: `enabled`)."""

    PLOT_EVERY_S = 30.0

    def __init__(self, out: Path, enabled: bool = True, label_smoothing: float = 0.0) -> None:
        self.out, self.enabled, self.label_smoothing = Path(out), enabled, label_smoothing
        self._plotted_at = -float("inf")
        self._unplotted: list[dict] | None = None

    def write(self, history: list[dict], final: bool = False) -> None:
        """metrics.csv every time; curves.png when `final` or PLOT_EVERY_S since its last draw."""
        if not self.enabled or not history:
            return
        write_csv(self.out / "metrics.csv", history)
        if final or time.monotonic() - self._plotted_at >= self.PLOT_EVERY_S:
            self._plot(history)
        else:
            self._unplotted = list(history)

    def flush(self) -> None:
        """Draw what write() left for later (a run that stops before its last epoch)."""
        if self._unplotted is not None:
            self._plot(self._unplotted)

    def _plot(self, history: list[dict]) -> None:
        # A folder name that is not UTF-8 (bytes Python keeps as surrogates): matplotlib refuses
        # such a string, and the run would fail at every epoch's plot.
        plot_curves(self.out / "curves.png", history, title=printable(str(self.out)),
                    label_smoothing=self.label_smoothing)
        self._plotted_at, self._unplotted = time.monotonic(), None
