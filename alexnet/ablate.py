"""`alexnet ablate`: the nine rows of the study, trained under one budget, S seeds each.

Every run is an ordinary `fit` into RUNS/<row>/seed<k>/ with identical settings apart from
what its row changes (the model variant and the augmentation recipe) and the seed. The
study is resumable at any moment:

  * a finished run has `done.json` (the fit summary, wall time, parameters, config),
    written atomically after `fit` returns: it is skipped;
  * an interrupted run has `last.pth` but no `done.json`: it continues exactly with
    resume="auto";
  * a run that failed on a non-finite loss has `failed.json` (the error): it is skipped, as
    resuming it would fail the same way; deleting its folder trains it again;
  * anything else starts from scratch.

So re-running the same command after a crash, a kill or Ctrl-C finishes the study without
redoing finished work. A folder that already holds runs made with other settings is refused
rather than mixed into one table. After the last run the results table and pictures are
(re)built by `alexnet.report.build_report`, which `alexnet report RUNS` also calls.

This module is imported by the CLI parser for every subcommand, so its top level stays light
(no torch); training is imported inside `run_ablation`.
"""

from __future__ import annotations

import argparse
import gc
import os
import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from alexnet.config import DEVICES, SCHEDULES, TrainConfig, defaults
from alexnet.atomic import not_a_folder, same_file, write_text_atomic
from alexnet.errors import CheckpointError, UserError


@dataclass(frozen=True)
class StudyRow:
    """One row of the study: which variant is trained with which recipe."""

    key: str  # folder name under RUNS/ and the --variants spelling
    title: str  # the name in the published table
    variant: str  # a name in alexnet.models.VARIANTS
    recipe: str  # a name in alexnet.augment.RECIPES
    published_top1: float | None = None  # the originally published val top-1 (%), if any


STUDY: tuple[StudyRow, ...] = (
    StudyRow("baseline", "Baseline", "baseline", "baseline", 30.32),
    StudyRow("randomcrop", "RandomCrop", "baseline", "randomcrop", 35.49),
    StudyRow("pixel", "Pixel", "baseline", "pixel", 33.31),
    StudyRow("dropout", "Dropout", "dropout", "baseline", 33.57),
    StudyRow("batchnorm", "BatchNorm", "batchnorm", "baseline", 31.40),
    StudyRow("combined", "Combined-Large", "combined", "combined", None),
    StudyRow("combined_small", "Combined-Small", "combined_small", "combined", 44.09),
    StudyRow("combined_gap", "Combined-GAP", "combined_gap", "combined", None),
    StudyRow("paper", "Paper (2012)", "paper", "paper", None),
)
ROWS: dict[str, StudyRow] = {r.key: r for r in STUDY}

DONE = "done.json"
FAILED = "failed.json"
# Config keys that may differ between the runs of one study (and between a run and its
# resumption) without changing what is measured.
NOT_COMPARED = frozenset({"out", "resume", "progress", "workers", "device", "memory_budget"})


def add_ablate_args(p: argparse.ArgumentParser) -> None:
    """The `alexnet ablate` options. Training options default to TrainConfig's defaults."""
    d = defaults()
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs per run (default {d['epochs']})")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per row, 0..S-1 (default 3: a mean and a sample std per row; 1 leaves the std blank)")
    p.add_argument("--variants", nargs="+", default=["all"], metavar="ROW",
                   help=f"rows to run, in study order whatever the order given, or 'all' (default): {', '.join(ROWS)}")
    p.add_argument("--out", default="runs",
                   help="study folder: RUNS/<row>/seed<k>/ per run, results.* and plots at the top (default runs)")
    p.add_argument("--data", default=d["data"], help="cache directory (default ./data or $ALEXNET_DATA)")
    p.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=None,
                   help="number of classes (default: read from the cache, which every run must match anyway)")
    p.add_argument("--bs", type=int, default=d["bs"], help=f"batch size (default {d['bs']})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
    p.add_argument("--momentum", type=float, default=d["momentum"], help=f"SGD momentum (default {d['momentum']})")
    p.add_argument("--wd", type=float, default=d["wd"], help=f"weight decay (default {d['wd']})")
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                   help=f"learning-rate schedule (default {d['schedule']})")
    p.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=float,
                   default=d["warmup_epochs"], help=f"linear warm-up in epochs (default {d['warmup_epochs']})")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d["nesterov"],
                   help="Nesterov momentum (default off)")
    p.add_argument("--label-smoothing", "--label_smoothing", dest="label_smoothing", type=float,
                   default=d["label_smoothing"], help=f"label smoothing (default {d['label_smoothing']})")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d["amp"],
                   help="bf16 autocast (default off)")
    p.add_argument("--channels-last", "--channels_last", dest="channels_last", action=argparse.BooleanOptionalAction,
                   default=d["channels_last"], help="channels_last memory format (default: on with --amp, off in fp32)")
    p.add_argument("--device", choices=DEVICES, default=d["device"], help=f"auto, cpu or cuda (default {d['device']})")
    p.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=d["img_size"],
                   help=f"training resolution (default {d['img_size']})")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=d["max_steps"],
                   help="stop each epoch after N steps (0: full epochs); for smoke tests")
    p.add_argument("--workers", type=int, default=d["workers"],
                   help=f"DataLoader workers (per-image transforms only; default {d['workers']})")


def selected_rows(names: list[str]) -> list[StudyRow]:
    if not names or "all" in names:
        return list(STUDY)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise UserError(f"--variants: unknown row(s) {', '.join(unknown)}; known rows: {', '.join(ROWS)} (or all)")
    return [r for r in STUDY if r.key in names]


def run_dir(out: Path, row: StudyRow, seed: int) -> Path:
    return Path(out) / row.key / f"seed{seed}"


def run_config(a: argparse.Namespace, row: StudyRow, seed: int, num_classes: int) -> TrainConfig:
    """The one place where a row's run is configured: only variant, recipe, seed and out vary."""
    return TrainConfig(variant=row.variant, recipe=row.recipe, data=a.data, out=str(run_dir(a.out, row, seed)),
                       epochs=a.epochs, bs=a.bs, lr=a.lr, momentum=a.momentum, wd=a.wd, schedule=a.schedule,
                       warmup_epochs=a.warmup_epochs, nesterov=a.nesterov,
                       label_smoothing=a.label_smoothing, amp=a.amp, channels_last=a.channels_last, device=a.device,
                       img_size=a.img_size, max_steps=a.max_steps, workers=a.workers, num_classes=num_classes, seed=seed,
                       progress=False).validate()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Readers see the old file or the new one (see alexnet.atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e.__class__.__name__}); delete it to redo that run") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON object; delete it to redo that run")
    return obj


def _state(folder: Path) -> str:
    if (folder / DONE).is_file():
        return "done"
    if (folder / FAILED).is_file():
        return "failed"
    if (folder / "last.pth").is_file():
        return "interrupted"
    return "new"


def check_same_settings(cfg: TrainConfig, folder: Path, amp_fell_back: bool = False) -> None:
    """Refuse to skip or continue a run that was made with other settings than this study's
    (but a run made in bf16 continues in fp32 where --amp fell back: train.py's resume)."""
    state = _state(folder)
    if state == "new":
        return
    if state == "done":
        old = read_json(folder / DONE).get("config", {})
    else:
        path = folder / "config.json"
        if not path.is_file():
            return  # nothing to compare with; resuming checks the checkpoint's variant and classes
        old = read_json(path)
    new = cfg.to_dict()
    diff = [k for k in sorted(new) if k not in NOT_COMPARED and k in old and old[k] != new[k]
            and not (k == "amp" and amp_fell_back and old[k] is True)
            and not (k == "data" and same_file(old[k], new[k]))]  # another path to the same cache
    if diff:
        shown = ", ".join(f"{k} {old[k]!r} there, {new[k]!r} now" for k in diff)
        raise UserError(f"{folder} was trained with other settings ({shown}); give the same options to "
                        f"continue that study, or another --out for a new one")
    # The model too: a registered variant's definition may have changed since (Combined-GAP's
    # head, d5ce0f9), and a table must not mix its seeds of the two models.
    from alexnet.models import VARIANTS  # here: `alexnet prepare` imports this module, and must not import torch

    saved = _trained_model(folder / ("best.pth" if state == "done" else "last.pth"))
    if saved is not None and cfg.variant in VARIANTS and saved != VARIANTS[cfg.variant].model:
        now = VARIANTS[cfg.variant].model
        shown = ", ".join(f"{k} {getattr(saved, k)!r} there, {getattr(now, k)!r} now"
                          for k in now.__dict__ if getattr(saved, k) != getattr(now, k))
        raise UserError(f"{folder} was trained as another model than {cfg.variant!r} is now ({shown}); delete "
                        f"{folder} to train it again, or give another --out for a new study")


def _trained_model(path: Path):
    """The AlexNetConfig a run's checkpoint records, or None where it has none or cannot be
    read (the resume then says why). Mapped, not read: a checkpoint may be 700 MB."""
    import torch

    from alexnet.checkpoint import trained_config

    if not path.is_file():
        return None
    try:
        c = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return trained_config(c, path) if isinstance(c, dict) and c.get("model_cfg") is not None else None
    except Exception:  # noqa: BLE001 - a damaged checkpoint is the resume's to report
        return None


def _device_name(device: str) -> str:
    import torch

    from alexnet.train import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


def _file_log(path: Path) -> Callable[..., None]:
    """A `log` for fit that appends to the run's train.log instead of the terminal."""

    def log(*args: object, **_: object) -> None:
        with path.open("a") as f:
            f.write(" ".join(str(a) for a in args) + "\n")

    return log


def _seconds_before(folder: Path) -> float:
    """Training seconds of the epochs an interrupted run already finished (metrics.csv)."""
    from alexnet.metrics import read_csv

    try:
        return sum(r["epoch_seconds"] for r in read_csv(folder / "metrics.csv"))
    except (OSError, ValueError, KeyError):
        return 0.0


def _free_memory() -> None:
    gc.collect()
    import torch

    from alexnet.allocator import release_free_memory

    release_free_memory()  # the finished run's free heap would otherwise stay resident
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# What `alexnet report` writes at the top of a study folder (report.build_report).
REPORT_FILES = ("results.md", "results.csv", "results.json", "val_top1.png", "best_top1.png")


def check_report_files(out: Path, flag: str = "--out") -> None:
    """A folder standing where the report writes one of its files is refused by name: the
    write would fail after the study (or the reading of every run) with a traceback."""
    for name in REPORT_FILES:
        if (out / name).is_dir():
            raise UserError(f"{flag} {out}: {out / name} is a folder, where the report writes its file {name}; "
                            "move it")


def _check_out(out: Path) -> None:
    """The study folder, or the nearest folder above it that exists, before the data is
    prepared and any run starts: a file there is refused, not found out an hour in."""
    if why := not_a_folder(out):
        raise UserError(f"--out {out}: {why}")
    check_report_files(out)
    above = next((p for p in (out, *out.parents) if p.exists()), None)
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {above} is not writable")


def run_ablation(a: argparse.Namespace, log: Callable[[str], object] = print) -> dict:
    """Train every (row, seed) not finished yet, then write the results; returns the report."""
    from alexnet.data import cache_for
    from alexnet.models import create_model, count_parameters
    from alexnet.report import seed_of, build_report
    from alexnet.precision import resolve_amp
    from alexnet.train import NonFiniteLoss, fit, pick_device

    if a.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {a.seeds}")
    rows = selected_rows(a.variants)
    # Each run would fall back from bf16 alike; resolved once here, the rows' configs (which a
    # continued study compares) and the report say what ran. channels_last, left unset, follows
    # the --amp asked for, as in `alexnet train`.
    amp = resolve_amp(a.amp, pick_device(a.device), log)
    fell_back = a.amp and not amp
    a = argparse.Namespace(**{**vars(a), "amp": amp,
                              "channels_last": a.amp if a.channels_last is None else a.channels_last})
    if not str(a.out).strip() or (a.data is not None and not str(a.data).strip()):
        # before the data is prepared: an empty path (an unset shell variable) means the working
        # directory or the default cache, which no one meant
        raise UserError(f"--{'out' if not str(a.out).strip() else 'data'} must name a folder, got an empty path")
    out = Path(a.out)
    _check_out(out)
    # Prepared (if needed) and checked once, before any run; the class count comes from it.
    cache = cache_for(a.data, log=log)
    num_classes = a.num_classes if a.num_classes is not None else cache.num_classes
    del cache

    plan = [(row, seed, run_config(a, row, seed, num_classes)) for row in rows for seed in range(a.seeds)]
    for _, _, cfg in plan:  # every refusal before the first hour of training, not after it
        check_same_settings(cfg, Path(cfg.out), amp_fell_back=fell_back)
    # The folder's other runs (rows or seeds this command leaves out) share its one table too.
    planned = {Path(cfg.out) for _, _, cfg in plan}
    for row in STUDY:
        for folder in sorted((out / row.key).glob("seed*")):
            if seed_of(folder) is not None and folder not in planned:
                check_same_settings(run_config(a, row, seed_of(folder), num_classes), folder, amp_fell_back=fell_back)
    device = _device_name(a.device)
    log(f"ablation: {len(rows)} rows x {a.seeds} seeds = {len(plan)} runs of {a.epochs} "
        f"epoch{'' if a.epochs == 1 else 's'}, batch {a.bs}, lr {a.lr:g}, schedule {a.schedule}, "
        f"amp {'bf16' if a.amp else 'off'}, {device} -> {out}/")

    params: dict[str, int] = {}
    failed: list[str] = []
    total = len(plan)
    for i, (row, seed, cfg) in enumerate(plan, 1):
        folder = Path(cfg.out)
        head = f"[{i}/{total}] {row.title} seed {seed}"
        state = _state(folder)
        if state == "done":
            d = read_json(folder / DONE)
            log(f"{head}: skipped (done): best top-1 {d['best_top1']:.2f}% at epoch {d['best_epoch']}")
            continue
        if state == "failed":
            failed.append(f"{row.key}/seed{seed}")
            log(f"{head}: skipped (failed: {read_json(folder / FAILED).get('error', '?')}); delete {folder} to "
                "train it again")
            continue
        if row.variant not in params:
            params[row.variant] = count_parameters(create_model(row.variant, num_classes))
        resumed = state == "interrupted"
        before = _seconds_before(folder) if resumed else 0.0
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot make the run's folder {folder} ({e.strerror or e})") from None
        log(f"{head}: {'resumed from last.pth' if resumed else 'started'} ({folder}; log in train.log)")
        t0 = time.perf_counter()
        try:
            summary = fit(replace(cfg, resume="auto" if resumed else None), log=_file_log(folder / "train.log"))
        except NonFiniteLoss as e:
            failed.append(f"{row.key}/seed{seed}")
            write_json_atomic(folder / FAILED, {"error": str(e), "config": cfg.to_dict(),
                                                "failed": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            log(f"{head}: failed: {e}")
            _free_memory()
            continue
        except SystemExit:
            log(f"{head}: interrupted; run the same command again to continue the study")
            raise
        except CheckpointError as e:  # an unreadable last.pth, or a best.pth left without one
            raise CheckpointError(f"{e} (the study's run {row.key}/seed{seed}: delete {folder} to train it again "
                                  "from the start)") from None
        wall = before + time.perf_counter() - t0
        done = {"row": row.key, "title": row.title, "variant": row.variant, "recipe": row.recipe, "seed": seed,
                "best_top1": summary["best_top1"], "best_epoch": summary["best_epoch"], "best": summary["best"],
                "history": summary["history"], "wall_seconds": wall, "resumed": resumed,
                "params": params[row.variant], "device": device, "config": cfg.to_dict(),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json_atomic(folder / DONE, done)
        log(f"{head}: finished: best top-1 {summary['best_top1']:.2f}% at epoch {summary['best_epoch']}, "
            f"{wall:.1f} s")
        del summary
        _free_memory()

    def failures(others: str) -> UserError:
        return UserError(f"{len(failed)} run(s) failed with a non-finite loss ({', '.join(failed)}); {others}. "
                         f"Their folders keep train.log and {FAILED}; delete them to train them again (with a lower "
                         "--lr: in a new --out, as a study's runs share their settings)")

    try:
        result = build_report(out)
    except UserError:
        if failed:  # no run finished: that is why there is no table
            raise failures("no run finished, so there is no table") from None
        raise
    if failed:
        raise failures("the table holds the others")
    return result


def main(argv: list[str] | None = None) -> int:  # `python -m alexnet.ablate`, same as `alexnet ablate`
    p = argparse.ArgumentParser(prog="alexnet ablate")
    add_ablate_args(p)
    try:
        run_ablation(p.parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
