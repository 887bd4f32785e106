"""The results of an ablation study, rebuilt from its finished runs without training.

`build_report(RUNS)` reads RUNS/<row>/seed<k>/done.json (and config.json) of every finished
run and writes, atomically:

  RUNS/results.md     the table (the published table's columns plus top-1, top-5, parameters,
                      wall time and images/s, and the published top-1 beside them), the budget
                      and the total wall time;
  RUNS/results.csv    the same numbers at full precision, one line per row;
  RUNS/results.json   the same plus the budget, per-seed figures and mean val top-1 curves;
  RUNS/val_top1.png   val top-1 against epoch, every row on one plot (mean over seeds);
  RUNS/best_top1.png  best val top-1 per row with error bars (sample std over seeds).

Per seed, "best" is the epoch of highest val top-1 (the run's best.pth); top-5 is taken at
that epoch. Rows are averaged over seeds; the std is the sample std (blank with one seed).
The output depends only on the run folders, so `alexnet report` reproduces the table the
study printed.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from alexnet.atomic import write_atomic, write_text_atomic
from alexnet.ablate import DONE, FAILED, STUDY, StudyRow, check_report_files, read_json, write_json_atomic
from alexnet.errors import UserError

CSV_COLUMNS = ["row", "variant", "model", "recipe", "seeds", "train_loss_best", "val_error", "epoch_of_best",
               "change_from_baseline", "top1_mean", "top1_std", "top5_mean", "top5_std", "params",
               "wall_seconds", "images_per_s", "published_top1"]
MD_COLUMNS = ["Variant", "Train loss best", "Val error (%)", "Epoch of best", "Change from Baseline (points)",
              "Top-1 (%)", "Top-5 (%)", "Params", "Wall time (s)", "Images/s", "Published top-1 (%)", "Seeds"]


# -- reading -----------------------------------------------------------------------------

def seed_of(folder: Path) -> int | None:
    name = folder.name
    return int(name[4:]) if name.startswith("seed") and name[4:].isdigit() else None


def load_runs(runs_dir: Path) -> list[tuple[StudyRow, list[dict]]]:
    """(row, finished runs sorted by seed) for every row with at least one finished run,
    in study order. Each run dict is its done.json plus `config_file` (its config.json)."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: is a file, not a study folder (what `alexnet ablate --out` makes)")
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no such study folder; run `alexnet ablate --out {runs_dir}` first")
    found = []
    for row in STUDY:
        runs = []
        folders = sorted((p for p in (runs_dir / row.key).glob("seed*") if seed_of(p) is not None), key=seed_of)
        for folder in folders:
            if not (folder / DONE).is_file():
                continue  # unfinished: not in the table until the study completes it
            d = read_json(folder / DONE)
            if not d.get("history"):
                raise UserError(f"{folder / DONE}: holds no epochs; delete it to redo that run")
            cfg_path = folder / "config.json"
            d["config_file"] = read_json(cfg_path) if cfg_path.is_file() else d.get("config", {})
            runs.append(d)
        if runs:
            found.append((row, runs))
    if not found:
        raise UserError(f"{runs_dir}: no finished runs (no */seed*/{DONE}); "
                        f"run `alexnet ablate --out {runs_dir}` first")
    return found


def unfinished_runs(runs_dir: Path, failed: bool = False) -> list[str]:
    """row/seedN of every run folder without done.json: interrupted or not started yet, or
    with `failed`, those that failed on a non-finite loss (failed.json)."""
    return [f"{row.key}/{p.name}" for row in STUDY
            for p in sorted((Path(runs_dir) / row.key).glob("seed*"), key=lambda p: seed_of(p) or 0)
            if seed_of(p) is not None and not (p / DONE).is_file() and (p / FAILED).is_file() == failed]


# -- numbers -----------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def seed_figures(run: dict) -> dict:
    """One finished run reduced to the figures the table averages."""
    hist = run["history"]
    best = max(hist, key=lambda r: r["val_top1"])  # the first epoch reaching the maximum, as fit picks it
    return {"seed": run["seed"], "best_top1": best["val_top1"], "top5_at_best": best["val_top5"],
            "best_epoch": best["epoch"], "train_loss_best": min(r["train_loss"] for r in hist),
            "wall_seconds": run["wall_seconds"], "images_per_s": _mean([r["images_per_s"] for r in hist]),
            "epochs": len(hist)}


def summarise(found: list[tuple[StudyRow, list[dict]]]) -> list[dict]:
    rows = []
    for row, runs in found:
        seeds = [seed_figures(r) for r in runs]
        top1 = [s["best_top1"] for s in seeds]
        top5 = [s["top5_at_best"] for s in seeds]
        epochs = sorted({r["epoch"] for run in runs for r in run["history"]})
        curve = [_mean([r["val_top1"] for run in runs for r in run["history"] if r["epoch"] == e]) for e in epochs]
        rows.append({
            "row": row.key, "variant": row.title, "model": row.variant, "recipe": row.recipe,
            "seeds": len(seeds),
            "train_loss_best": _mean([s["train_loss_best"] for s in seeds]),
            "top1_mean": _mean(top1), "top1_std": _std(top1),
            "top5_mean": _mean(top5), "top5_std": _std(top5),
            "val_error": 100.0 - _mean(top1),
            "epoch_of_best": _mean([s["best_epoch"] for s in seeds]),
            "change_from_baseline": None,
            "params": runs[0]["params"],
            "wall_seconds": _mean([s["wall_seconds"] for s in seeds]),
            "images_per_s": _mean([s["images_per_s"] for s in seeds]),
            "published_top1": row.published_top1,
            "per_seed": seeds,
            "curve": {"epoch": epochs, "val_top1": curve},
        })
    base = next((r for r in rows if r["row"] == "baseline"), None)
    if base is not None:
        for r in rows:
            r["change_from_baseline"] = r["top1_mean"] - base["top1_mean"]
    return rows


def _values(runs: list[dict], key: str) -> list:
    seen: list = []
    for r in runs:
        v = r["config_file"].get(key, r.get("config", {}).get(key))
        if v not in seen:
            seen.append(v)
    return seen


def budget(found: list[tuple[StudyRow, list[dict]]]) -> dict:
    """The settings every run shares, read from the runs' config.json (lists where they differ)."""
    runs = [r for _, rs in found for r in rs]
    b: dict[str, Any] = {}
    for key in ("epochs", "bs", "lr", "momentum", "wd", "schedule", "label_smoothing", "amp", "img_size",
                "max_steps", "device"):
        vals = _values(runs, key)
        b[key] = vals[0] if len(vals) == 1 else vals
    seeds = sorted({r["seed"] for r in runs})
    b["seeds"] = len(seeds)
    b["seed_values"] = seeds
    resolved = []
    for r in runs:
        if r.get("device") and r["device"] not in resolved:
            resolved.append(r["device"])
    b["device_resolved"] = resolved
    b["runs"] = len(runs)
    b["total_wall_seconds"] = sum(r["wall_seconds"] for r in runs)
    return b


# -- writing -----------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h {m:02d}m {s % 60:02d}s" if h else f"{m}m {s % 60:02d}s" if m else f"{seconds:.1f} s"


def _one(v: Any) -> str:
    return " / ".join(str(x) for x in v) if isinstance(v, list) else str(v)


def _epochs(mean: float) -> str:
    """An epoch number, or the mean of several seeds' (which may fall between epochs)."""
    return f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: list[dict], b: dict) -> str:
    device = _one(b["device_resolved"]) if b["device_resolved"] else _one(b["device"])
    amps = b["amp"] if isinstance(b["amp"], list) else [b["amp"]]
    total = b["total_wall_seconds"]
    ms = b["max_steps"]
    steps = "" if ms in (0, [0]) else f", at most {_one(ms)} step{'' if ms == 1 else 's'} per epoch"
    lines = [
        "# Ablation results",
        "",
        f"Budget: {_one(b['epochs'])} epoch{'' if b['epochs'] == 1 else 's'}{steps}, "
        f"{b['seeds']} seed{'s' if b['seeds'] != 1 else ''} ({', '.join(map(str, b['seed_values']))}), "
        f"batch {_one(b['bs'])}, lr {_one(b['lr'])}, "
        f"schedule {_one(b['schedule'])}, momentum {_one(b['momentum'])}, weight decay {_one(b['wd'])}, "
        f"label smoothing {_one(b['label_smoothing'])}, image size {_one(b['img_size'])}, "
        f"amp {_one(['bf16' if v else 'off' for v in amps])}, device {device}.  ",
        f"Total wall time: {_duration(total)}{'' if total < 60 else f' ({total:.0f} s)'} over {b['runs']} "
        f"run{'s' if b['runs'] != 1 else ''}."
        + (f"  \nNot in the table, unfinished (no {DONE}): {', '.join(b['unfinished'])}; the same "
           "`alexnet ablate` command completes them." if b.get("unfinished") else "")
        + (f"  \nNot in the table, failed on a non-finite loss ({FAILED}): {', '.join(b['failed'])}; delete "
           "their folders to train them again." if b.get("failed") else ""),
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(MD_COLUMNS) - 1)) + "|",
    ]
    for r in rows:
        change = "—" if r["change_from_baseline"] is None else f"{r['change_from_baseline']:+.2f}"
        pub = "—" if r["published_top1"] is None else f"{r['published_top1']:.2f}"
        cells = [r["variant"], f"{r['train_loss_best']:.4f}", f"{r['val_error']:.2f}", _epochs(r["epoch_of_best"]),
                 change, _pm(r["top1_mean"], r["top1_std"]), _pm(r["top5_mean"], r["top5_std"]),
                 f"{r['params']:,}", f"{r['wall_seconds']:.1f}", f"{r['images_per_s']:.0f}", pub, str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed, the best epoch is the one with the highest val top-1 (the run's best.pth); top-5 is taken "
        "at that epoch. Figures are means over seeds, ± the sample standard deviation (none with one seed). "
        "Train loss best: lowest epoch-mean training loss. Val error = 100 − top-1. Change from Baseline: "
        "top-1 points against this study's Baseline (— when Baseline did not run). Wall time: per seed. "
        "Images/s: training images per second, mean over epochs. Published top-1: the originally "
        "published numbers, under their own budget, for orientation (— not reported).",
        "",
        "![val top-1 against epoch](val_top1.png)",
        "",
        "![best val top-1](best_top1.png)",
        "",
    ]
    return "\n".join(lines)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:  # atomically, with the permissions of any other new file (mkstemp's are 0600)
        write_atomic(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot(rows: list[dict], runs_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.plot(r["curve"]["epoch"], r["curve"]["val_top1"], "o-", ms=3, label=r["variant"])
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="val top-1 against epoch (mean over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, runs_dir / "val_top1.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 5))
    x = list(range(len(rows)))
    ax.bar(x, [r["top1_mean"] for r in rows], yerr=[r["top1_std"] or 0.0 for r in rows], capsize=4,
           color="tab:blue", label="this study (mean ± std over seeds)")
    pub = [(i, r["published_top1"]) for i, r in enumerate(rows) if r["published_top1"] is not None]
    if pub:
        ax.plot([i for i, _ in pub], [v for _, v in pub], "kx", ms=8, label="published")
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="best val top-1 (%)", title="best val top-1 per row")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, runs_dir / "best_top1.png")


def _finite(obj: Any) -> Any:
    """JSON has no NaN: non-finite numbers become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def build_report(runs_dir: Path, log=print) -> dict:
    """Write results.md/.csv/.json and the two plots under runs_dir; print the table."""
    runs_dir = Path(runs_dir)
    check_report_files(runs_dir, "report")
    found = load_runs(runs_dir)
    rows = summarise(found)
    b = budget(found)
    b["unfinished"] = unfinished_runs(runs_dir)
    b["failed"] = unfinished_runs(runs_dir, failed=True)
    md = markdown(rows, b)
    write_text_atomic(runs_dir / "results.md", md)
    write_text_atomic(runs_dir / "results.csv", _csv_text(rows))
    result = _finite({"budget": b, "rows": rows})
    write_json_atomic(runs_dir / "results.json", result)
    plot(rows, runs_dir)
    log(md.split("\n\n![")[0])
    log(f"wrote {runs_dir / 'results.md'}, results.csv, results.json, val_top1.png, best_top1.png")
    return result
