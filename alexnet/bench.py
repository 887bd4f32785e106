"""`alexnet bench`: training images/s of three ways to feed the same model, measured in one
process and interleaved so that drift of a shared machine cancels (see below).

  (1) model   : the training step alone on one synthetic batch already in memory;
  (2) project : the project's full training path: index gather from the in-memory uint8
                cache, batched augmentation with the variant's recipe, the same train_step;
  (3) typical : a per-image pipeline of the kind typical code uses: torchvision ImageFolder
                over JPEG files, PIL transforms, DataLoader with 2 workers, at the published
                defaults (batch 64, fp32) unless told otherwise.

(1) and (2) alternate step by step (A B, then B A, ..., the order carried on across rounds),
and (2)/(1) is the median of the per-pair ratios: on a shared machine, throughput drifts by
tens of percent within seconds, which blocks of steps did not cancel. On CUDA the unit that
alternates is 4 steps with one synchronisation at its end (a synchronised single step leaves
the GPU idle while the host launches the next one, which training never does). (3) runs in
blocks of `--steps` steps (its DataLoader workers prefetch, so single steps would not measure
it), one block per round after the pairs; (2)/(3) is the median over rounds of (2)'s median
in a round against (3)'s block in that round. Before each block, (3) trains untimed on the
batches its workers prefetched while the pairs ran (2 workers x 2 batches), which would
otherwise come free. Each mode's figure is the median of its images / wall seconds.
(2) does what a training step of `alexnet train` does besides the step itself: the seeds,
the batch, the loss read back for its finiteness check (every step on the CPU, every 25th on
CUDA), the loss and accuracy sums, the scheduler's step.

(3) is typical code at the published defaults (the issue's comparison: the project at its
recommended settings against that): batch `--reference-bs` (64), fp32, no channels_last,
PyTorch's default SGD, and FC1 over the 36 copies of the pooled vector (torchvision's
AlexNet); (1) and (2) fold them where training does (alexnet/models.py: variants without
dropout before FC1). Its PIL transforms are the recipe's: crops, flips, colour jitter, the
paper's enlargement and PCA lighting, pixel noise.

`--compare amp channels_last compile small_map_grad fold_fc1` measures instead what each of those
settings does to speed (small_map_grad: alexnet/smallconv.py's weight gradient, an
environment switch rather than a config key; fold_fc1: FC1 on summed weights, a model
attribute): the training step alone (as (1)) with the setting on and off, everything else as the
command says, alternating single steps the same way, and prints on/off as the median of the
per-pair ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from alexnet import smallconv
from alexnet.allocator import keep_freed_memory
from alexnet.augment import RECIPES, BatchAugment, Recipe
from alexnet.config import TrainConfig
from alexnet.data import Cache
from alexnet.distributed import Dist
from alexnet.errors import UserError
from alexnet.loader import FastBatches, epoch_order, releaser, seed_torch, step_seed, to_memory
from alexnet.memory import rss_bytes
from alexnet.models import FOLD_ENV, VARIANTS, create_model, fc1_folds
from alexnet.orphans import exit_with_parent
from alexnet.precision import resolve_amp
from alexnet.stepprofile import profile_line, step_profile, sync
from alexnet.train import build_optimizer, pick_device, residency, settle_device, train_step

PUBLISHED = dict(bs=64, amp=False, channels_last=False)
SETTINGS = ("amp", "channels_last", "compile", "small_map_grad", "fold_fc1")
# torch.compile's modes; those but the first two replay the model's steps as CUDA graphs on a GPU
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", nargs="+", default=["baseline"], help=f"variants, or 'all' ({', '.join(VARIANTS)}) (default: baseline)")
    p.add_argument("--bs", type=int, default=256, help="batch size of (1) and (2) (default: %(default)s)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast for (1) and (2) (default: on; fp32 where bf16 would be emulated, with a warning)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format for (1) and (2) (default: on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for (1) and (2) (compilation happens in the warm-up)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode, for --compile and for `--compare compile` (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5,
                   help="per round: alternating (1)/(2) pairs (of single steps; of 4 steps on CUDA), and the "
                        "steps of one block of (3) (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians over all of them are reported (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda (default: auto)")
    p.add_argument("--data", help="a prepared cache for (2) (default: where training reads one, $ALEXNET_DATA or "
                                  "./data, if it holds one; else a synthetic in-memory cache)")
    p.add_argument("--jpeg-zip", help="TinyImageNet zip whose train JPEGs feed (3) (default: synthetic JPEGs)")
    p.add_argument("--reference-bs", type=int, default=PUBLISHED["bs"], help="batch size of (3) (default: %(default)s, the published one)")
    p.add_argument("--no-reference", action="store_true", help="skip (3) (e.g. on a GPU machine)")
    p.add_argument("--memory-budget", type=float, default=TrainConfig.memory_budget,
                   help="as train's: GB within which (2) keeps the cache's training split in memory "
                        "(default: %(default)s); 0: release its pages as batches read them")
    p.add_argument("--recipe", choices=list(RECIPES), help="augmentation recipe for (2) and (3) (default: each variant's own)")
    p.add_argument("--profile", action="store_true",
                   help="also print, for (1) and (2), the ops each step launches, the host's time to issue a "
                        "step and (CUDA) the GPU's busy time per step (alexnet/stepprofile.py)")
    p.add_argument("--compare", nargs="+", choices=SETTINGS, metavar="SETTING",
                   help=f"instead of the table: the training step alone on a synthetic batch with each setting "
                        f"on and off ({', '.join(SETTINGS)}), the rest as given (--data, --jpeg-zip, --recipe "
                        f"and --reference-bs play no part)")


SYNTHETIC_IMAGES = 20_000  # the synthetic cache's training split


def _source(data: str | None, n: int = SYNTHETIC_IMAGES) -> tuple[torch.Tensor, torch.Tensor, dict, Cache | None]:
    """(train x NHWC uint8, labels, stats, the cache whose memory-mapped split is under x) from
    a cache, or a random stand-in of the same shape (in memory: nothing to release)."""
    if data:
        from alexnet.data import open_cache

        c = open_cache(Path(data))
        return to_memory(c.train.x, torch.device("cpu")), torch.from_numpy(np.array(c.train.y)), c.stats, c
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 200, (n,), generator=g)
    eig = {"eigval": [0.2, 0.02, 0.005], "eigvec": torch.linalg.qr(torch.randn(3, 3, generator=g))[0].tolist()}
    return x, y, {"mean": [0.48, 0.45, 0.40], "std": [0.27, 0.26, 0.27], **eig}, None


def _jpeg_folder(zip_path: str | None, root: Path, per_class: int = 20, classes: int = 200) -> Path:
    """An ImageFolder tree of JPEGs: the real train JPEGs (a per-class subset) extracted from the
    zip, or synthetic 64x64 JPEGs of the same size."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if zip_path:
        expected = "expected the TinyImageNet-200 zip (tiny-imagenet-200/train/<wnid>/images/*.JPEG)"
        try:
            z = zipfile.ZipFile(zip_path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"--jpeg-zip {zip_path}: cannot open it as a zip ({e.__class__.__name__}: {e}); "
                            f"{expected}") from None
        with z:
            names = sorted(n for n in z.namelist() if "/train/" in n and n.endswith(".JPEG"))
            if not names:
                raise UserError(f"--jpeg-zip {zip_path}: no train/ JPEGs in it; {expected}")
            by_class: dict[str, list[str]] = {}
            for n in names:
                by_class.setdefault(n.split("/train/")[1].split("/")[0], []).append(n)
            for wnid, files in list(by_class.items())[:classes]:
                (root / wnid).mkdir(exist_ok=True)
                for n in files[:per_class]:
                    (root / wnid / Path(n).name).write_bytes(z.read(n))
        return root
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c:03d}"
        d.mkdir(exist_ok=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{k}.JPEG", quality=90)
    return root


class _Lighting:
    """The paper's PCA colour lighting on one [0, 1] image tensor, as typical code writes it
    (fb.resnet.torch's): alpha ~ N(0, std) per eigenvector, the same shift on every pixel."""

    def __init__(self, std: float, eigval, eigvec) -> None:
        self.std, self.eigval, self.eigvec = std, torch.tensor(eigval), torch.tensor(eigvec)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        shift = self.eigvec @ (torch.randn(3) * self.std * self.eigval)
        return (img + shift[:, None, None]).clamp_(0, 1)


class _Noise:
    """Gaussian pixel noise on one [0, 1] image tensor."""

    def __init__(self, std: float) -> None:
        self.std = std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img + torch.randn_like(img) * self.std).clamp_(0, 1)


def _reference_transforms(recipe: Recipe, stats: dict):
    """The recipe as per-image transforms, in the batched path's order: geometry, flip, colour
    jitter, lighting, noise, normalisation (classes, not lambdas: spawned workers pickle them)."""
    from torchvision import transforms as T

    tf: list = []
    if recipe.scale > 1.0:  # the paper's: the image enlarged, a random 64x64 crop of it
        tf += [T.Resize(round(64 * recipe.scale)), T.RandomCrop(64)]
    if recipe.crop_pad:
        tf.append(T.RandomCrop(64, padding=recipe.crop_pad, padding_mode="reflect"))
    if recipe.flip:
        tf.append(T.RandomHorizontalFlip())
    if recipe.brightness or recipe.contrast or recipe.saturation:
        tf.append(T.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation))
    tf.append(T.ToTensor())
    if recipe.lighting_std:
        tf.append(_Lighting(recipe.lighting_std, stats["eigval"], stats["eigvec"]))
    if recipe.noise_std:
        tf.append(_Noise(recipe.noise_std))
    # raw_pixels: the paper's input, pixels minus the mean in 0..255 units
    tf.append(T.Normalize(stats["mean"], [1 / 255] * 3 if recipe.raw_pixels else stats["std"]))
    return T.Compose(tf)


# Batches (3)'s DataLoader holds ready: its workers fill this queue while (1) and (2) run.
REFERENCE_WORKERS, REFERENCE_PREFETCH = 2, 2


def _reference_loader(folder: Path, recipe: Recipe, bs: int, stats: dict):
    """torchvision's classic pipeline with the recipe's augmentations as PIL transforms. One
    sampler over many permutations of the folder: its few thousand images would otherwise end
    an epoch every few dozen batches, each end a stall that a 100,000-image epoch has rarely."""
    from torchvision import datasets

    ds = datasets.ImageFolder(str(folder), transform=_reference_transforms(recipe, stats))
    sampler = torch.utils.data.RandomSampler(ds, num_samples=len(ds) * 10_000)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=REFERENCE_WORKERS,
                                     prefetch_factor=REFERENCE_PREFETCH, drop_last=True, persistent_workers=True)
    return iter(dl)


def _per_unit(dev: torch.device) -> int:
    """Steps in one timed unit. On CUDA a unit ends with a synchronisation, after which the GPU
    idles until the next launches arrive; one unit of several steps lets the host run ahead
    as it does in training, where nothing waits for the GPU. On the CPU every step is
    synchronous anyway, and single steps pair most finely against drift."""
    return 4 if dev.type == "cuda" else 1


def _timed(step, steps: int, bs: int, dev: torch.device) -> float:
    """Images per second over `steps` calls of `step`, the device's work included (and no
    work queued before it: (3)'s untimed steps run just before its timed block)."""
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return steps * bs / (time.perf_counter() - t)


def _paired(a, b, pairs: int, bs: int, dev: torch.device, first: int = 0) -> tuple[list[float], list[float]]:
    """Images/s of a and b per timed unit, alternating which runs first so neither always
    follows the same thing; pair i of a round counts as pair `first` + i of the whole run, so
    that with an odd number of pairs per round a does not go first in most of them."""
    fa, fb = [], []
    per = _per_unit(dev)
    for i in range(first, first + pairs):
        for fn, out in ((a, fa), (b, fb)) if i % 2 == 0 else ((b, fb), (a, fa)):
            out.append(_timed(fn, per, bs, dev))
    return fa, fb


def _trainable(cfg: TrainConfig, dev: torch.device, fold_fc1: bool = True,
               compile_mode: str = "default") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The variant's model (seed 0) and fused SGD, laid out and compiled as `cfg` says (in
    torch.compile's `compile_mode`: the bench measures modes training does not offer yet)."""
    torch.manual_seed(0)
    model = create_model(cfg.variant, 200).to(dev)
    model.fold_fc1 = model.fold_fc1 and fold_fc1
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model, fused=True)
    if cfg.compile:
        model = torch.compile(model, mode=compile_mode)  # shares the parameters the optimizer already holds
    return model, opt


def _step_marker(compiled: bool, mode: str, dev: torch.device):
    """What to call before each training step: with a mode that replays CUDA graphs, marking
    the step lets the graphs reuse the last step's output memory (read by then)."""
    if compiled and dev.type == "cuda" and mode in COMPILE_MODES[2:]:
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def bench_variant(name: str, a: argparse.Namespace, x, y, stats, folder: Path | None, log=print,
                  cache: Cache | None = None) -> dict:
    """One row of the table. `cache`: the cache whose memory-mapped training split x is, whose
    pages (2) keeps or releases as training does (`SplitResidency`), from the memory of this
    process: one that holds nothing but this row, where there is a cache (`run_bench`)."""
    dev = settle_device(pick_device(a.device))
    recipe = RECIPES[a.recipe or VARIANTS[name].recipe]
    cfg = TrainConfig(variant=name, bs=a.bs, amp=a.amp, channels_last=a.channels_last, compile=a.compile,
                      memory_budget=a.memory_budget).validate()
    ref_cfg = replace(cfg, **{**PUBLISHED, "bs": a.reference_bs})
    model, opt = _trainable(cfg, dev, compile_mode=a.compile_mode)
    mark = _step_marker(cfg.compile, a.compile_mode, dev)
    gen = torch.Generator(device=dev)
    aug = BatchAugment(recipe, 64, stats["mean"], stats["std"], stats.get("eigval"), stats.get("eigvec"), device=dev, generator=gen)
    xs = aug(x[:a.bs], train=True)
    ys = y[:a.bs].to(dev)
    release = None if cache is None else releaser(cache.train.x, dev, **residency(cfg, cache))
    batches = FastBatches(x.to(dev) if dev.type == "cuda" else x, y.to(dev), aug, a.bs, release=release)
    state = {"it": batches(epoch_order(len(x), 0, 0, Dist(), a.bs), 0), "step": 0, "epoch": 0}
    # What a training run's step does besides train_step (train._train_batches): the scheduler,
    # the loss read back every `every` steps, the loss and accuracy sums on the device.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    every = 1 if dev.type == "cpu" else 25
    sums = torch.zeros(2, dtype=torch.float64, device=dev)

    def model_only():
        mark()
        train_step(model, opt, xs, ys, cfg, dev)

    def project():
        s = step_seed(0, 0, state["step"])
        gen.manual_seed(s)
        try:
            xb, yb = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = batches(epoch_order(len(x), 0, state["epoch"], Dist(), a.bs), 0)
            xb, yb = next(state["it"])
        seed_torch(s, dev)
        mark()
        logits, loss = train_step(model, opt, xb, yb, cfg, dev,
                                  (lambda loss: loss.item()) if state["step"] % every == 0 else None)
        sched.step()
        state["step"] += 1
        sums[0].add_(loss.detach(), alpha=len(yb))
        sums[1].add_((logits.argmax(1) == yb).sum())

    modes = {"model": (model_only, a.bs), "project": (project, a.bs)}
    for fn, _ in modes.values():  # warm-up: allocator, kernels (CUDA graphs record on the 2nd)
        for _ in range(3 if cfg.compile else 2):
            fn()
    held = None
    if release is not None:
        # The decision a training run takes at its first release point, taken now, with
        # the heap as warm as that run's and before (3) adds a model that a run does not hold.
        release()
        held = rss_bytes()
    if folder is not None:
        ref_model = create_model(name, 200).to(dev)
        # Typical code: the default SGD (a loop over the parameters on the CPU), no
        # channels_last, no autocast, and FC1 over the pooled vector's 36 copies, as
        # torchvision's AlexNet computes it.
        ref_model.fold_fc1 = False
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        it = _reference_loader(folder, recipe, a.reference_bs, stats)

        def reference():
            xb, yb = next(it)
            train_step(ref_model, ref_opt, xb.to(dev), yb.to(dev), ref_cfg, dev)

        def reference_block() -> float:
            for _ in range(REFERENCE_WORKERS * REFERENCE_PREFETCH):  # the batches prefetched meanwhile
                reference()
            return _timed(reference, a.steps, a.reference_bs, dev)

        modes["typical"] = (reference, a.reference_bs)
        reference(), reference()  # warm-up: its DataLoader workers too
        now = rss_bytes()
        if release is not None and held is not None and now is not None:
            release.budget += max(0, now - held)  # (3)'s memory is the bench's, not the run's
    figures: dict[str, list[float]] = {k: [] for k in modes}
    per_round = []  # (2)/(3) of each round
    sync(dev)
    for r in range(a.rounds):
        fm, fp = _paired(model_only, project, a.steps, a.bs, dev, first=r * a.steps)
        figures["model"] += fm
        figures["project"] += fp
        if "typical" in modes:
            figures["typical"].append(reference_block())
            per_round.append(statistics.median(fp) / figures["typical"][-1])
    med = {k: statistics.median(v) for k, v in figures.items()}
    row = {"variant": name, **{k: round(v, 1) for k, v in med.items()},
           "project/model": statistics.median(p / m for p, m in zip(figures["project"], figures["model"]))}
    if per_round:
        row["project/typical"] = statistics.median(per_round)
        # (3)'s workers stop now, not whenever the process's exit gets to them: one still
        # running then left its queue's semaphore to the resource tracker's "leaked" warning.
        getattr(it, "_shutdown_workers", lambda: None)()
    if release is not None:  # what (2) did with the cache's pages (SplitResidency)
        row["split"] = release.state
    log(row_line(row))
    if a.profile:
        row["profile"] = {"(1)": step_profile(model_only, 2, dev), "(2)": step_profile(project, 2, dev)}
        for mode, key in (("(1)", "model"), ("(2)", "project")):
            row["profile"][mode]["wall_ms"] = a.bs / med[key] * 1e3
        log(profile_line(name, row["profile"], dev.type == "cuda"))
    return row


def row_line(row: dict) -> str:
    figures = [f"({i}) {k} {row[k]:8.1f}" for i, k in enumerate(("model", "project", "typical"), 1) if k in row]
    return (f"{row['variant']:<15} " + "  ".join(figures) + f"  | (2)/(1) {row['project/model']:.3f}"
            + (f"  (2)/(3) {row['project/typical']:.2f}" if "project/typical" in row else "")
            + (f"  | split {row['split']}" if "split" in row else ""))


def _row_in_child(name: str, a: argparse.Namespace, folder: Path | None, threads: int, conn, parent: int) -> None:
    """A fresh process's row (`run_bench`), sent back through `conn`."""
    exit_with_parent(parent)  # a bench killed outright does not leave its row training on
    keep_freed_memory()  # as `alexnet` itself does at start
    torch.set_num_threads(threads)
    try:
        x, y, stats, cache = _source(a.data)
        conn.send(("row", bench_variant(name, a, x, y, stats, folder, lambda *_: None, cache)))
    except Exception as e:  # the parent reports it; a traceback here would interleave with its output
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _row_in_fresh_process(name: str, a: argparse.Namespace, folder: Path | None) -> dict:
    ctx = multiprocessing.get_context("spawn")  # a new interpreter, not a fork of this one's memory
    parent, child = ctx.Pipe(duplex=False)
    # Not a Pool: its daemonic workers could not start (3)'s DataLoader workers.
    proc = ctx.Process(target=_row_in_child, args=(name, a, folder, torch.get_num_threads(), child, os.getpid()))
    proc.start()
    child.close()
    kind, payload = "died", None
    try:
        # (3)'s DataLoader workers hold the pipe's other end too: a child that died is seen
        # by its exit, not by the pipe closing.
        while not parent.poll(1.0) and proc.is_alive():
            pass
        if parent.poll():
            try:
                kind, payload = parent.recv()
            except EOFError:
                pass
    except BaseException:  # interrupted here: the child goes too
        proc.terminate()
        raise
    finally:
        proc.join()
    if kind == "died":
        kind, payload = "error", f"the process died (exit code {proc.exitcode})"
    if kind == "error":
        raise UserError(f"bench of {name}: {payload}")
    return payload


def compare_setting(name: str, setting: str, a: argparse.Namespace, log=print) -> dict:
    """Images/s of the training step alone on one synthetic batch, with `setting` on and off
    and the rest as `a` says: two models from the same seed, single steps alternating (on
    first, then off first, ...), figures the medians, on/off the median of the per-pair ratios."""
    dev = settle_device(pick_device(a.device))
    g = torch.Generator().manual_seed(0)
    # channels_last whatever the setting, as the augmentation hands batches over: with it off,
    # the step's own conversion is part of what is measured.
    x = torch.randn(a.bs, 3, 64, 64, generator=g).to(dev, memory_format=torch.channels_last)
    y = torch.randint(0, 200, (a.bs,), generator=g).to(dev)
    steps = []
    for on in (True, False):
        s = {"amp": a.amp, "channels_last": a.channels_last, "compile": a.compile}
        if setting in s:
            s[setting] = on
        cfg = TrainConfig(variant=name, bs=a.bs, **s)
        model, opt = _trainable(cfg, dev, fold_fc1=on if setting == "fold_fc1" else True,
                                compile_mode=a.compile_mode)
        mark = _step_marker(cfg.compile, a.compile_mode, dev)
        small_map = on if setting == "small_map_grad" else smallconv.enabled()

        def step(model=model, opt=opt, cfg=cfg, small_map=small_map, mark=mark):
            mark()
            with smallconv.switched(small_map):
                train_step(model, opt, x, y, cfg, dev)
        for _ in range(3 if cfg.compile else 2):  # warm-up: allocator, kernels, compilation
            step()  # (CUDA graphs record on the 2nd)
        steps.append(step)
    f_on, f_off = _paired(steps[0], steps[1], a.steps * a.rounds, a.bs, dev)
    row = {"variant": name, "setting": setting, "on": round(statistics.median(f_on), 1),
           "off": round(statistics.median(f_off), 1),
           "on/off": statistics.median(p / q for p, q in zip(f_on, f_off))}
    log(f"{name:<15} {setting:<14} on {row['on']:8.1f}  off {row['off']:8.1f} images/s  | on/off {row['on/off']:.3f}")
    return row


def run_bench(a: argparse.Namespace, log=print) -> list[dict]:
    for n in a.variants:
        if n != "all" and n not in VARIANTS:
            raise UserError(f"unknown variant {n!r}; known variants: all, {', '.join(VARIANTS)}")
    names = list(VARIANTS) if "all" in a.variants else list(dict.fromkeys(a.variants))
    if a.bs < 1 or a.steps < 1 or a.rounds < 1 or a.reference_bs < 1:
        raise UserError(f"--bs, --steps, --rounds and --reference-bs must be at least 1, got {a.bs}, {a.steps}, "
                        f"{a.rounds} and {a.reference_bs}")
    if not a.compare:
        from alexnet.data import default_data_dir, open_cache

        if not a.data and (default_data_dir() / "manifest.json").is_file():
            a = argparse.Namespace(**{**vars(a), "data": str(default_data_dir())})  # where training reads it
        # Bad settings are one error now, before the table's header, not one from each row's process later.
        n = len(open_cache(Path(a.data)).train.y) if a.data else SYNTHETIC_IMAGES
        if a.bs > n:
            raise UserError(f"--bs {a.bs} is larger than the {n:,} training images of "
                            f"{a.data or 'the synthetic cache'}: (2) would have no batch")
        for name in names:
            TrainConfig(variant=name, bs=a.bs, amp=a.amp, channels_last=a.channels_last, compile=a.compile,
                        memory_budget=a.memory_budget).validate()
    dev = settle_device(pick_device(a.device))
    # (1) and (2) in the precision a training run here would use; `--compare amp` still
    # measures bf16 against fp32, as asked.
    a = argparse.Namespace(**{**vars(a), "amp": resolve_amp(a.amp, dev, log)})
    if a.compare:
        log(f"the training step alone on {dev.type} ({torch.get_num_threads()} threads, torch {torch.__version__}), "
            f"batch {a.bs}, each setting on and off with the others at amp={'bf16' if a.amp else 'off'}, "
            f"channels_last={a.channels_last}, compile={a.compile}"
            f"{f' (mode {a.compile_mode})' if a.compile or 'compile' in a.compare else ''}; "
            f"{a.rounds * a.steps} alternating pairs")
        if "small_map_grad" in a.compare and (dev.type != "cpu" or not (a.amp or (a.channels_last and smallconv.fp32_pays()))):
            log("note: small_map_grad is taken only on the CPU, in bf16 steps, or in fp32 channels_last steps on "
                "an AVX2 CPU; here both sides run oneDNN's gradient, so its on/off measures the bench's "
                "own noise")
        if "fold_fc1" in a.compare:
            plain = [n for n in names if not fc1_folds(create_model(n, 200).train())]
            if plain:
                log(f"note: {', '.join(plain)} keep FC1's 36 copies in training (dropout on FC1's input, no copies, "
                    f"or {FOLD_ENV}=0), so their fold_fc1 on/off measures the bench's own noise")
        return [compare_setting(n, s, a, log) for n in names for s in a.compare]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = None if a.no_reference else _jpeg_folder(a.jpeg_zip, Path(tmp) / "jpeg")
        images = 0 if folder is None else sum(1 for _ in folder.glob("*/*.JPEG"))
        if folder is not None and images < a.reference_bs:  # (3) drops the last partial batch: none would come
            raise UserError(f"(3) has {images} JPEGs{f' from --jpeg-zip {a.jpeg_zip}' if a.jpeg_zip else ''} "
                            f"(up to 20 per class), fewer than one batch of --reference-bs {a.reference_bs}; "
                            f"lower --reference-bs or leave (3) out with --no-reference")
        unit = f"units of {_per_unit(dev)} steps" if _per_unit(dev) > 1 else "steps"
        log(f"training images/s on {dev.type} ({torch.get_num_threads()} threads, torch {torch.__version__}); "
            f"(1),(2): batch {a.bs}, amp={'bf16' if a.amp else 'off'}, channels_last={a.channels_last}, "
            f"compile={a.compile}{f' (mode {a.compile_mode})' if a.compile else ''}; "
            + ("" if a.no_reference else
               f"(3): batch {a.reference_bs}, fp32, default SGD, FC1 over its copies, ImageFolder+PIL+DataLoader"
               f"(2 workers) over {images:,} {'JPEGs from ' + a.jpeg_zip if a.jpeg_zip else 'synthetic JPEGs'}; ")
            + f"data: {a.data or 'synthetic'}; {a.rounds} rounds of {a.steps} alternating (1)/(2) {unit}"
            + ("" if a.no_reference else f" and {a.steps} steps of (3)")
            + "; the ratios are medians: of each pair's (2) against (1)"
            + ("" if a.no_reference else ", of each round's (2) against (3)"))
        if len(names) == 1 and not a.data:  # a synthetic cache in memory: nothing to keep or release
            x, y, stats, _ = _source(None)
            return [bench_variant(names[0], a, x, y, stats, folder, log)]
        for n in names:
            # Each row in a fresh process: what this one holds (the rows before it, the zip's
            # reads for (3)) would otherwise count in its memory, which decides whether (2)
            # keeps the split in memory as a training run of it would.
            rows.append(_row_in_fresh_process(n, a, folder))
            log(row_line(rows[-1]))
            if "profile" in rows[-1]:
                log(profile_line(n, rows[-1]["profile"], dev.type == "cuda"))
    return rows
