"""Training: small `build_*` helpers, `train_one_epoch`, and `fit` that ties them together.

Device, precision and distribution are decided once in `build_run` and are no-ops when off
(a disabled autocast, an unwrapped model). Files are written by rank 0 only. A run can be
stopped at any step (Ctrl-C, SIGTERM, or a kill) and resumed exactly from `last.pth`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from alexnet import checkpoint as ckpt_io
from alexnet import distributed
from alexnet.allocator import release_free_memory
from alexnet.atomic import (lock_folder, not_a_folder, remove_stale_temporaries, same_file, unlock_folder,
                            write_text_atomic)
from alexnet.augment import RECIPES, BatchAugment, Recipe, indexed
from alexnet.config import TrainConfig
from alexnet.data import Cache, cache_for
from alexnet.errors import CheckpointError, ConfigError, UserError
from alexnet.evaluate import autocast, evaluate
from alexnet.loader import (FastBatches, PerImageBatches, SplitResidency, drop_resident, epoch_order, releaser,
                            seed_torch, step_seed, to_memory)
from alexnet.memory import peak_memory_mib, reset_peak
from alexnet.metrics import MetricsLog, recorded_epochs
from alexnet.models import Variant, create_model, registered, settings_rebuild
from alexnet.precision import resolve_amp
from alexnet.userfiles import check_model_output, load_model_file, load_transforms_file


class NonFiniteLoss(UserError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}); "
                        "use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def settle_device(device: torch.device, deterministic: bool = False) -> torch.device:
    """The device with its index, once the process's GPU is chosen (after distributed setup):
    tensors report "cuda:N", and a bare "cuda" compares unequal to it. On CUDA, cuDNN may also
    time its convolution algorithms on the first batch of each shape and keep the fastest
    (the shapes here are fixed), unless the run must be deterministic."""
    if device.type != "cuda":
        return device
    torch.backends.cudnn.benchmark = not deterministic
    return indexed(device)


def build_model(cfg: TrainConfig) -> tuple[nn.Module, str | None]:
    """The model and its variant name (None for a custom module from a user's file)."""
    if cfg.variant is not None:
        return create_model(cfg.variant, cfg.num_classes), cfg.variant
    model = load_model_file(cfg.model, cfg.num_classes)
    return model, getattr(model, "variant", None)


def build_transforms(cfg: TrainConfig, variant: str | None) -> tuple[Recipe | Callable, str]:
    """(recipe or torchvision transform, where it came from). The seed interface defaults to
    the baseline recipe (the paper's model excepted, `_needs_own_recipe`); --variant defaults
    to the variant's own recipe."""
    if cfg.transforms is not None:
        return load_transforms_file(cfg.transforms), cfg.transforms
    row = registered(variant)
    name = cfg.recipe or (row.recipe if cfg.variant is not None or _needs_own_recipe(row) else "baseline")
    return RECIPES[name], f"recipe:{name}"


def _needs_own_recipe(row: Variant | None) -> bool:
    """Whether a model file's variant (also one it modified: `create_model("paper",
    init_bias=1.0)`) trains with its own recipe even in the seed interface: one whose recipe
    sets the input's scale (the paper's model: its augmentation, and centred pixels in 0..255
    units, the scale of its initialisation; on the Baseline's unit-variance input its loss
    stays flat, docs/results.md). A modified one keeps the recipe of the model it modifies."""
    return row is not None and RECIPES[row.recipe].raw_pixels


def build_optimizer(cfg: TrainConfig, model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    kw: dict[str, Any] = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov)
    # The fused kernel updates all 58M parameters in one pass: about 5x faster than the
    # foreach path on the CPU for the 4096-4096 head, where the update is memory-bound.
    try:
        opt = torch.optim.SGD(model.parameters(), fused=fused, **kw)
    except (RuntimeError, TypeError):  # an older torch without the fused kernel here
        opt = torch.optim.SGD(model.parameters(), **kw)
    if cfg.momentum > 0:
        # Made now, next to the weights, instead of by the first step: on the CPU the heap
        # then keeps its long-lived blocks together below each step's short-lived ones, and
        # fragments less (docs/speed.md, Memory). Without dampening, a zero buffer gives the first
        # step exactly the gradient, as the lazily made one does.
        for p in model.parameters():
            if p.requires_grad:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


# Schedules whose lr curve spans the run's --epochs: a resumed run must keep that number.
CURVE_SCHEDULES = ("cosine", "onecycle", "step")


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler, per_step). 'plateau' divides the lr by 10 when val top-1 stops improving
    (the paper's rule), at most three times, as the paper did ("reduced three times prior to
    termination"), stepped per epoch; the others are per step."""
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=2,
                                                          min_lr=cfg.lr * 1e-3), False
    if cfg.schedule == "onecycle":
        # The lr rises over the first quarter of the steps, then falls. A run of under 5 steps
        # (a smoke test) has no step in that quarter, and OneCycleLR divides by its length,
        # pct_start * total - 1 steps, 0 at 4 steps: -0.5 keeps such runs on the fall alone.
        pct = 0.25 if total >= 5 else 0.5 / total
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct,
                                                   cycle_momentum=False), True

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.schedule == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), True


@dataclass
class Run:
    """Everything `train_one_epoch` needs, built once."""

    cfg: TrainConfig
    device: torch.device
    dist: distributed.Dist
    model: nn.Module  # possibly DDP- and compile-wrapped: use for forward
    raw: nn.Module  # the plain module: use for state dicts
    variant: str | None
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool
    batches: Any
    augment: BatchAugment
    aug_gen: torch.Generator
    train_n: int
    val_x: torch.Tensor
    val_y: torch.Tensor
    cache: Cache
    recipe: dict | None
    transforms_source: str
    steps_per_epoch: int
    out: Path
    amp_fell_back: bool = False  # --amp asked, fp32 used: bf16 would be emulated here (precision.py)
    model_cfg: dict | None = None  # the AlexNetConfig that rebuilds the model, where one does (models.settings_rebuild)
    stop_signal: list = field(default_factory=list)
    writer: ckpt_io.CheckpointWriter = field(default_factory=ckpt_io.CheckpointWriter)

    def order(self, epoch: int) -> torch.Tensor:
        return epoch_order(self.train_n, self.cfg.seed, epoch, self.dist, self.cfg.bs)


def build_run(cfg: TrainConfig, log=print) -> Run:
    device = pick_device(cfg.device)
    d = distributed.setup(device.type)
    device = settle_device(device, cfg.deterministic)
    # Before anything is written: config.json and the checkpoints record the precision used.
    asked_amp = cfg.amp
    cfg = replace(cfg, amp=resolve_amp(cfg.amp, device, log if d.main else None))
    if d.main:
        for warning in cfg.warnings():
            log(f"warning: {warning}")
    out = Path(cfg.out)
    if d.main:
        if why := not_a_folder(out):
            raise UserError(f"--out {out}: {why}")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--out {out}: not a writable directory ({e.strerror})") from None
        if not lock_folder(out):  # held until fit returns, or the process ends
            raise UserError(f"--out {out}: in use by another training run (it holds the folder's lock); "
                            "wait for it to end, or choose another --out (nothing was overwritten)")
        if stale := remove_stale_temporaries(out):
            log(f"removed {len(stale)} temporary file(s) that a killed run left in {out}")
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; a few CUDA backward kernels
        # (adaptive average pooling) have no deterministic version: PyTorch warns about them.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.manual_seed(cfg.seed % 2**63)  # the CPU generator's own reduction: any integer is a seed
    model, variant = build_model(cfg)
    model_cfg = dict(model.cfg.__dict__) if settings_rebuild(model, cfg.num_classes) else None  # before SyncBatchNorm
    transform, source = build_transforms(cfg, variant)
    if cfg.resume not in (None, "auto") and Path(cfg.resume).is_dir():
        raise CheckpointError(f"--resume {cfg.resume}: is a directory; give the checkpoint in it ("
                              f"{Path(cfg.resume) / 'last.pth'}), or --resume alone for {out / 'last.pth'}")
    if not cfg.resume and (out / "last.pth").exists():
        raise UserError(f"--out {out}: holds a previous run (last.pth); continue it with --resume, "
                        "or choose another --out (nothing was overwritten)")
    if (cfg.resume not in (None, "auto") and (out / "last.pth").exists()
            and not same_file(Path(cfg.resume).parent, out)):  # its own folder (from best.pth, say) is its own run
        raise UserError(f"--out {out}: holds another run's last.pth, which continuing {cfg.resume} there would "
                        f"replace; give that run's own folder as --out, or an empty one (nothing was overwritten)")
    fresh = not cfg.resume or (cfg.resume == "auto" and not (out / "last.pth").exists())
    if fresh and cfg.resume == "auto" and (out / "best.pth").exists():
        raise CheckpointError(f"--out {out}: holds best.pth but no last.pth to continue from; continue from "
                              f"best.pth with --resume {out / 'best.pth'}, or choose another --out (nothing was "
                              "overwritten)")
    if fresh and (out / "best.pth").exists():  # a checkpoint kept or copied there on its own
        raise CheckpointError(f"--out {out}: holds a checkpoint (best.pth) that a new run would replace; move it "
                              "or choose another --out (nothing was overwritten)")
    if fresh and (done := recorded_epochs(out)):  # its checkpoints deleted, its record kept
        raise CheckpointError(f"--out {out}: holds a previous run's metrics.csv ({done} epoch{'s' if done > 1 else ''}) "
                              "that a new run would replace; move it or choose another --out (nothing was overwritten)")
    cache = cache_for(cfg.data, log=log if d.main else (lambda *a: None))
    if cache.num_classes != cfg.num_classes:
        raise ConfigError(f"--num_classes {cfg.num_classes} does not match the data in {cache.root} "
                          f"({cache.num_classes} classes): train with --num-classes {cache.num_classes}")
    if cfg.sync_bn and device.type != "cuda":  # in one process as under torchrun: the same command, the same answer
        raise ConfigError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; "
                          "leave it out on CPU (each process then keeps its own BatchNorm statistics)")
    if cfg.sync_bn and d.enabled:  # one process has no statistics to share: its BatchNorm stays as it is
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model is not None:  # a user's file; the registered variants are tested
        check_model_output(cfg.model, model, cfg.num_classes, cfg.img_size, device, cfg.amp, cfg.channels_last,
                           training=True)
    raw = model
    aug_gen = torch.Generator(device=device)
    st = cache.stats
    recipe = transform if isinstance(transform, Recipe) else Recipe()
    try:
        augment = BatchAugment(recipe, cfg.img_size, st["mean"], st["std"], st.get("eigval"), st.get("eigvec"),
                               device=device, generator=aug_gen)
    except ConfigError as e:  # the recipe does not fit this run's images: say whose recipe
        raise ConfigError(f"{source}: {e}") from None
    if isinstance(transform, Recipe):
        def every_process_keeps(want: bool) -> bool:  # one that released would set the pace of all
            return not distributed.any_ranks([not want], d, device)[0]

        train_x = to_memory(cache.train.x, device, log=log if d.main else None, what="training split",
                            agree=lambda host: distributed.any_ranks([host], d, device)[0])
        release = releaser(cache.train.x, train_x.device, **residency(cfg, cache), agree=every_process_keeps)
        batches = FastBatches(train_x, torch.from_numpy(np.array(cache.train.y)).to(device), augment, cfg.bs,
                              release=release)
    else:
        batches = PerImageBatches(cache.train.x, cache.train.y, transform, augment, cfg.bs, cfg.workers, cfg.seed, source,
                                  transform_file=cfg.transforms)
        batches.probe()
    train_n = len(cache.train.y)
    steps = (train_n // d.world) // cfg.bs
    if steps == 0:
        raise ConfigError(f"--bs {cfg.bs} is larger than the {train_n // d.world} training images per process")
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    opt = build_optimizer(cfg, model, fused=device.type in ("cpu", "cuda"))
    sched, per_step = build_scheduler(cfg, opt, steps)
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return Run(cfg, device, d, model, raw, variant, opt, sched, per_step, batches, augment, aug_gen, train_n,
               to_memory(cache.val.x, device, log=log if d.main else None, what="validation split",
                         agree=lambda host: distributed.any_ranks([host], d, device)[0]),
               torch.from_numpy(np.array(cache.val.y)).to(device), cache,
               recipe.to_dict() if isinstance(transform, Recipe) else None, source, steps, out,
               amp_fell_back=asked_amp and not cfg.amp, model_cfg=model_cfg, writer=ckpt_io.CheckpointWriter(background_writes(device)))


def background_writes(device: torch.device) -> bool:
    """Whether checkpoints are written in a thread (`CheckpointWriter`): on a GPU, where an
    epoch trains in seconds and a write would add half as much again. On the CPU an epoch
    takes a minute or more, the write a second, and the host copy a thread needs would add
    the checkpoint's size (460 MB for the Baseline) to the run's peak memory."""
    return device.type == "cuda"


def checkpoint_state(run: Run, epoch: int, batch: int, state: dict) -> dict:
    """The dict saved as last.pth / best.pth (see checkpoint.py for what each part is for)."""
    c = run.cache
    raw = run.raw
    return {
        "format": ckpt_io.FORMAT,
        "model": raw.state_dict(),
        "model_cfg": run.model_cfg,
        # the transforms file as the run found it: a resume may name it from another folder
        "transforms_file": str(Path(run.cfg.transforms).resolve()) if run.cfg.transforms else None,
        "variant": run.variant,
        "num_classes": run.cfg.num_classes,
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "epoch": epoch,
        "batch": batch,
        "step": state["step"],
        "best_top1": state["best_top1"],
        "best_epoch": state["best_epoch"],
        "meters": dict(state["meters"]),
        "history": list(state["history"]),
        "rng": ckpt_io.rng_state(run.aug_gen),
        "world": run.dist.world,
        "config": run.cfg.to_dict(),
        "recipe": run.recipe,
        "transforms": run.transforms_source,
        "img_size": run.cfg.img_size,
        "cache_img_size": c.img_size,
        "stats": {k: c.stats[k] for k in ("mean", "std", "eigval", "eigvec") if k in c.stats},
        "wnids": c.wnids,
        "names": c.names,
        "data": data_identity(c),
    }


def data_identity(cache: Cache) -> dict:
    """The training split's checksums from the cache's manifest: a resumed run must read the
    same images and labels in the same order (the cache's folder may move)."""
    files = cache.manifest.get("files", {})
    algorithm = cache.manifest.get("hash")
    return {name: files[name][algorithm] for name in ("train_x.npy", "train_y.npy")
            if name in files and algorithm in files[name]}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               cfg: TrainConfig, device: torch.device, check: Callable[[torch.Tensor], None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a normalised batch; returns (logits, loss). `check(loss)` runs before
    the backward pass and raises to abandon the step (a non-finite loss)."""
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # Last step's gradients go before the forward pass, whose bf16 weight copies and
    # activations can then reuse their memory: the Baseline's most memory in use during a
    # CPU step went from 944 to 827 MiB (docs/speed.md, Memory).
    opt.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits = model(x.contiguous(memory_format=fmt))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if check is not None:
        check(loss)
    loss.backward()
    opt.step()
    return logits, loss


def _flush(sums: torch.Tensor, counted: list, m: dict) -> None:
    """Move the device-side sums (loss, correct) and the host's image count into the meters dict."""
    loss, correct = sums.tolist()
    m["loss"] += loss
    m["correct"] += int(correct)
    m["n"] += counted[0]
    sums.zero_()
    counted[0] = 0


def train_one_epoch(run: Run, epoch: int, start: int, state: dict, save: Callable[[int, int], None]) -> int | None:
    """Train from batch `start` to the end of the epoch. Returns None, or the number of the
    epoch's batches done when a stop request ended it (after `last.pth` was saved there).

    The host reads the loss only every `every` steps (each step on the CPU, where it costs
    nothing; every 25 on CUDA, so the GPU queue never drains): that is when a non-finite loss
    and a stop request are checked, agreed across ranks, and shown on the progress bar.
    """
    cfg, d = run.cfg, run.dist
    run.model.train()
    if not isinstance(run.batches, FastBatches) and cfg.workers > 0:
        run.writer.wait()  # DataLoader workers are forked: not while another thread is writing
    it = run.batches(run.order(epoch), start) if isinstance(run.batches, FastBatches) \
        else run.batches(run.order(epoch), start, epoch, d.rank)
    try:
        return _train_batches(run, epoch, start, state, save, it)
    finally:
        # Its DataLoader workers, if any, shut down now: an error on its way out of the
        # process would otherwise keep them alive in its traceback until the interpreter
        # exits, and its exit waits for each worker.
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _train_batches(run: Run, epoch: int, start: int, state: dict, save: Callable[[int, int], None],
                   it: Iterator) -> int | None:
    cfg, d, m = run.cfg, run.dist, state["meters"]
    every = 1 if run.device.type == "cpu" else 25
    plain = d.main and cfg.progress and not sys.stderr.isatty()
    bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               leave=False, disable=not (d.main and cfg.progress and sys.stderr.isatty()), dynamic_ncols=True)
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)
    loss_sum, correct = sums[0], sums[1]  # views: each step adds in place, one kernel each
    counted = [0]  # images this stretch: known on the host
    # The rate shown is this process's since it started the epoch here: a resumed rank 0's
    # meters hold every rank's images up to the checkpoint, summed.
    n_start, seconds_start = m["n"], m["seconds"]
    last = {"loss": float("nan"), "stop": False}

    def check(loss: torch.Tensor) -> None:
        run.writer.poll()
        value = loss.item()
        bad, stop = distributed.any_ranks([not math.isfinite(value), bool(run.stop_signal)], d, run.device)
        if bad:
            # At the run's first step no update has been made yet: the learning rate is not to blame.
            cause = ("the model's output or its input is not finite (no update had been made yet)" if state["step"] == 0
                     else "the learning rate is probably too high")
            raise NonFiniteLoss(f"loss became {value if not math.isfinite(value) else 'non-finite on another rank'} "
                                f"at epoch {epoch + 1}, step {b + 1} of {run.steps_per_epoch} "
                                f"(lr {run.opt.param_groups[0]['lr']:.3g}): {cause}; {last_good(run)}")
        last.update(loss=value, stop=stop)

    t0 = time.perf_counter()
    for b in range(start, run.steps_per_epoch):
        s = step_seed(cfg.seed, d.rank, state["step"])
        run.aug_gen.manual_seed(s)
        x, y = next(it)
        seed_torch(s, run.device)  # dropout; after the batch, which a per-image transform may have reseeded
        checking = (b - start) % every == 0 or b == run.steps_per_epoch - 1
        logits, loss = train_step(run.model, run.opt, x, y, cfg, run.device, check if checking else None)
        m["lr"] = run.opt.param_groups[0]["lr"]  # the lr this step used: the epoch's row shows its last step's
        if run.per_step:
            run.sched.step()
        state["step"] += 1
        # In place on the device: a tensor made from a host number would be a copy that waits
        # for the GPU, draining its queue every step. (`sums[0] += ...` would also copy the
        # result back through a new view: two kernels more, on a GPU step bound by launches.)
        loss_sum.add_(loss.detach(), alpha=len(y))
        correct.add_((logits.argmax(1) == y).sum())
        counted[0] += len(y)
        bar.update(1)
        if checking:
            rate = (m["n"] - n_start + counted[0]) * d.world / (time.perf_counter() - t0 + m["seconds"] - seconds_start)
            bar.set_postfix(loss=f"{last['loss']:.3f}", img_s=f"{rate:.0f}")
            if plain and (b + 1) % max(1, run.steps_per_epoch // 10) < every:
                print(f"epoch {epoch + 1}/{cfg.epochs} step {b + 1}/{run.steps_per_epoch} "
                      f"loss {last['loss']:.4f} {rate:.0f} img/s", flush=True)
        if last["stop"]:
            # A stop request (agreed by every rank) is acted on once the step is complete: its
            # forward pass has already moved BatchNorm's running statistics, so saving the
            # position before it would make a resumed run apply this batch to them twice.
            _flush(sums, counted, m)  # first: reading the sums waits for the GPU's last step
            m["seconds"] += time.perf_counter() - t0
            save(epoch, b + 1)
            bar.close()
            return b + 1
        if cfg.save_every and state["step"] % cfg.save_every == 0:
            _flush(sums, counted, m)
            m["seconds"] += time.perf_counter() - t0
            save(epoch, b + 1)
            t0 = time.perf_counter()  # the save is not training time
    _flush(sums, counted, m)
    m["seconds"] += time.perf_counter() - t0
    bar.close()
    return None


def fit(cfg: TrainConfig, log=print) -> dict:
    """Train to the end (or resume and continue); returns the final state summary."""
    # --deterministic and cuDNN's algorithm timing are switches of the whole process: a run
    # sets them for itself and hands them back, so that the next run of a study in this
    # process, or the caller's own code, does not inherit them.
    switches = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        return _fit(cfg, log)
    finally:
        unlock_folder(cfg.out)
        torch.use_deterministic_algorithms(switches[0], warn_only=switches[1])
        torch.backends.cudnn.benchmark = switches[2]


def _fit(cfg: TrainConfig, log=print) -> dict:
    out, first = Path(cfg.out), int(os.environ.get("RANK", "0")) == 0
    created = []  # the folders build_run's mkdir makes for --out, deepest first
    for folder in (out, *out.parents) if first else ():
        if os.path.lexists(folder):
            break
        created.append(folder)

    def drop_empty_out() -> None:  # a run that never started leaves no folder, nor the ones above it it made
        for folder in created:
            try:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
            except OSError:  # gone, or in use: the error that stopped the run is the one to show
                break

    try:
        run = build_run(cfg, log)
    except BaseException:
        drop_empty_out()
        raise
    cfg = run.cfg  # as resolved for this device (--amp)
    reset_peak(run.device)  # this run's peak, also when an ablation ran others in this process
    d = run.dist
    say = log if d.main else (lambda *a, **k: None)
    state: dict[str, Any] = {"step": 0, "best_top1": -1.0, "best_epoch": -1, "history": [], "best_train_loss": math.inf,
                             "meters": _fresh_meters()}
    epoch, start = 0, 0
    if cfg.resume and d.enabled:
        # Every process reads the checkpoint and decides from it: one that cannot see it (a
        # node without the others' file system) would start afresh beside them.
        path = run.out / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
        sees = path.is_file()
        some, not_all = distributed.any_ranks([sees, not sees], d, run.device)
        if some and not_all:
            drop_empty_out()  # nothing was written: the run never started
            raise UserError(f"--resume: {path} is {'' if sees else 'not '}there for rank {d.rank} and "
                            f"{'not ' if sees else ''}for another: every process reads it, so --out (and "
                            "--resume PATH) must be on a file system that every node shares")
    if cfg.resume == "auto" and not (run.out / "last.pth").exists():
        # A requeued job passes --resume every time, its first start included.
        say(f"--resume: no {run.out / 'last.pth'} yet; starting the run from the beginning")
    elif cfg.resume:
        try:
            epoch, start = _resume(run, state, say)
        except BaseException:  # a checkpoint that does not fit: nothing was written
            drop_empty_out()
            raise
        if epoch >= cfg.epochs:  # said so; nothing to train, write or evaluate
            distributed.cleanup(d)
            return _summary(run, state)
    metrics = MetricsLog(run.out, enabled=d.main, label_smoothing=run.cfg.label_smoothing)
    metrics.write(state["history"])  # after a resume: the files match the checkpoint's history
    if d.main:
        write_text_atomic(run.out / "config.json", json.dumps(run.cfg.to_dict(), indent=2) + "\n")
        path = "per image in DataLoader workers" if isinstance(run.batches, PerImageBatches) else "batched on the device"
        say(f"training {run.variant or cfg.model} ({sum(p.numel() for p in run.raw.parameters()):,} parameters) "
            f"on {run.device.type}{f' x{d.world}' if d.enabled else ''}: {run.train_n:,} train / {len(run.val_y):,} val "
            f"images, {run.steps_per_epoch} {'step' if run.steps_per_epoch == 1 else 'steps'} of "
            f"{cfg.bs}{'x' + str(d.world) if d.enabled else ''} per epoch, "
            f"{cfg.img_size}x{cfg.img_size} px, transforms {run.transforms_source} ({path}), "
            f"amp={'bf16' if cfg.amp else 'off'}, "
            f"{'channels_last' if cfg.channels_last else 'NCHW'}")

    def save(ep: int, batch: int, best: bool = False) -> None:
        # Weights a too-high learning rate has blown up are never saved over a good
        # checkpoint (the loss that shows it is only computed at the next step).
        if not weights_finite(run.raw):
            raise NonFiniteLoss(f"the weights became non-finite by epoch {ep + 1}, step {batch} "
                                f"(lr {run.opt.param_groups[0]['lr']:.3g}) and were not saved: the learning rate is "
                                f"probably too high; {last_good(run)}")
        # Every rank takes part: the epoch's partial meters are summed over ranks first, so
        # that rank 0's checkpoint holds the whole run's progress (rank 0 restores them).
        m = state["meters"]
        sums = torch.tensor([m["loss"], m["correct"], m["n"]], dtype=torch.float64, device=run.device)
        loss_sum, correct, n = distributed.all_reduce_sum(sums, d).tolist()
        if d.main:
            obj = checkpoint_state(run, ep, batch, {**state, "meters": {**m, "loss": loss_sum, "correct": int(correct),
                                                                         "n": int(n)}})
            saving[0] = True
            try:
                run.writer.save(obj, run.out / "last.pth", run.out / "best.pth" if best else None)
            finally:
                saving[0] = False

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # Which of stdout and stderr are a terminal, asked now: a hang-up breaks the terminal's
    # descriptors before SIGHUP arrives, and isatty() is then False.
    terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # False for a closed one
    saving, first_request = [False], [0.0]

    def request_stop(signum: int, frame: Any) -> None:
        # Only a second Ctrl-C, a second or more after the first and never while a checkpoint
        # is being written, stops at once: launchers (torchrun, Slurm) pass one request on as
        # further SIGTERMs, and those must not cut the stop's own save short.
        if signum == getattr(signal, "SIGHUP", None):
            _detach_from_terminal(terminals)
        if run.stop_signal:
            writing = saving[0] or run.writer.busy
            if signum == signal.SIGINT and not writing and time.monotonic() - first_request[0] > 1.0:
                raise KeyboardInterrupt
            return
        run.stop_signal.append(signum)
        first_request[0] = time.monotonic()
        if d.main:
            _note(f"{signal.Signals(signum).name}: stopping at the next step boundary (an evaluation under way is "
                  f"cut short and runs on resume), with {run.out / 'last.pth'} saved (Ctrl-C again to stop at once, "
                  "without saving)")

    for s, handler in previous.items():
        # A signal the process was started with ignored stays ignored, as Python leaves it: a
        # shell starts background jobs without job control with SIGINT ignored, so that a
        # Ctrl-C meant for the foreground does not reach them.
        if handler is not signal.SIG_IGN:
            signal.signal(s, request_stop)
    try:
        if isinstance(run.batches, FastBatches) and run.augment.fuses(run.cache.img_size):
            # Compiled here, not inside the first epoch's timing: half a minute the first time
            # on a machine, seconds from PyTorch's cache; a stop request during it is honoured
            # at the first step. (Each step reseeds the generator this batch draws from.)
            say("compiling the augmentation kernel (torch.compile; PyTorch caches it for later runs)")
            run.augment(run.batches.x[:cfg.bs], train=True)
        for ep in range(epoch, cfg.epochs):
            stopped_at = train_one_epoch(run, ep, start, state, save)
            if stopped_at is not None:
                metrics.flush()
                _stopped(run, f"epoch {ep + 1}, step {stopped_at} of {run.steps_per_epoch}", say)
            start = 0
            row = _end_epoch(run, ep, state)
            if row is None:
                # A stop request during the evaluation: saved after the epoch's last step,
                # where a resume starts with this evaluation.
                save(ep, run.steps_per_epoch)
                metrics.flush()  # the plot of the epochs done, if it was left for later
                _stopped(run, f"epoch {ep + 1}, step {run.steps_per_epoch} of {run.steps_per_epoch} (its evaluation "
                         "was cut short and runs first on resume)", say)
            if not math.isfinite(row["val_loss"]):
                raise NonFiniteLoss(f"val loss became {row['val_loss']} after epoch {ep + 1} "
                                    f"(lr {run.opt.param_groups[0]['lr']:.3g}): the weights are no longer finite and "
                                    f"were not saved; the learning rate is probably too high; {last_good(run)}")
            improved = row["val_top1"] > state["best_top1"]
            if improved:
                state["best_top1"], state["best_epoch"] = row["val_top1"], ep + 1
            save(ep + 1, 0, best=improved)
            # the last epoch's request is read once, after its checkpoint is written (below)
            stopping = ep + 1 < cfg.epochs and distributed.any_ranks([bool(run.stop_signal)], d, run.device)[0]
            metrics.write(state["history"], final=ep + 1 == cfg.epochs or stopping)
            peak = f"peak {row['peak_rss_mib'] / 1024:.2f} GiB RSS"  # this run's, so far
            if row["peak_gpu_mib"]:
                peak += f", {row['peak_gpu_mib'] / 1024:.2f} GiB GPU"
            if kept_in_memory(run.batches):
                peak += f", training split kept in memory (--memory-budget {cfg.memory_budget:g} GB)"
            say(f"epoch {ep + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_top1']:.2f}% | "
                f"val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% | "
                f"lr {row['lr']:.3g} | {row['epoch_seconds']:.0f}s, {row['images_per_s']:.0f} img/s | {peak}"
                + (" | best" if improved else ""))
            # A request that came during the evaluation: the epoch is saved, stop here.
            if stopping:
                _stopped(run, f"the end of epoch {ep + 1}", say)
    except BaseException:
        # A write still in flight lands first (under the stop handler, which leaves it be);
        # if it fails too, the run's own error is still the one raised.
        try:
            run.writer.close()
        except Exception as e:
            _note(f"also: {run.out / 'last.pth'} could not be written ({e.__class__.__name__}: {e})")
        raise
    else:
        # Every rank reaches the all-reduce below, the one whose last write failed too: the
        # others would otherwise wait in it for a rank that has left (or lose its connection).
        failed = None
        try:
            run.writer.close()
        except Exception as e:
            failed = e
        stop, any_failed = distributed.any_ranks([bool(run.stop_signal), failed is not None], d, run.device)
        if failed is not None:
            raise failed
        # A request during the last epoch's evaluation, its log lines or the wait for its
        # checkpoint: the run is complete, and whoever asked (a study's Ctrl-C, a scheduler)
        # still hears 128 + signal.
        if stop and not any_failed:
            _stopped(run, f"the end of epoch {cfg.epochs}, the last: the run is complete", say, resume=False)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        distributed.cleanup(d)
    return _summary(run, state)


def _summary(run: Run, state: dict) -> dict:
    best = max(state["history"], key=lambda r: r["val_top1"]) if state["history"] else {}
    return {"best_top1": state["best_top1"], "best_epoch": state["best_epoch"], "best": best,
            "history": state["history"], "out": str(run.out)}


# A closed terminal (SIGHUP) stops a run as Ctrl-C and SIGTERM do: saved at the next step.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _detach_from_terminal(terminals: list[int]) -> None:
    """After a hang-up every write to the terminal fails (EIO), and the run would die of its
    next progress line before saving: the descriptors that were a terminal go to /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in terminals:
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


def _note(line: str) -> None:
    """A line on stderr from a signal handler: a raw write, since the handler may have
    interrupted a print in progress (buffered writes are not reentrant)."""
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):  # replaced by a stream without a descriptor
        fd = 2
    try:
        os.write(fd, (line + "\n").encode())
    except OSError:  # a terminal gone, a closed pipe: the stop goes on without the note
        pass


def _stopped(run: Run, where: str, say, resume: bool = True) -> None:
    """Leave after a stop request, last.pth saved at `where`: exit status 128 + the signal.
    Every rank waits for rank 0's write first: a launcher that sees one process exit stops
    the others, and rank 0 would be stopped in the middle of its save."""
    run.writer.wait()
    distributed.barrier(run.dist)
    sig = run.stop_signal[0] if run.stop_signal else signal.SIGTERM  # a rank that got none stops with the others
    say(f"stopped by {signal.Signals(sig).name} at {where}; {run.out / 'last.pth'} saved"
        + (f". Resume with: {resume_command(run.cfg)}" if resume else ""))
    raise SystemExit(128 + sig)


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter and floating-point buffer (BatchNorm's running statistics) is
    finite: one reduction per tensor and one read on the host."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all()) if tensors else True


def last_good(run: Run) -> str:
    """Where a failed run's last good state is, for its error message."""
    path = run.out / "last.pth"
    try:
        run.writer.wait()  # one still being written counts
    except Exception as e:
        older = f"; {path} holds an earlier state" if path.exists() else ""
        return f"the last checkpoint could not be written ({e.__class__.__name__}: {e}){older}"
    return f"the last good checkpoint is {path}" if path.exists() else "no checkpoint had been saved yet"


def _fresh_meters() -> dict:
    return {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0}


def residency(cfg: TrainConfig, cache: Cache) -> dict:
    """`releaser`'s budget for a run: --memory-budget, with room kept for what evaluation
    maps beside the training split (the validation split) and a margin for the heap's
    growth between release points (a step's peak is above what a release point reads)."""
    return {"budget": int(cfg.memory_budget * 1e9), "reserve": cache.val.x.nbytes + RESIDENCY_MARGIN}


# Between steps the heap is within ~0.1 GB of a step's peak (glibc keeps freed blocks:
# alexnet/allocator.py); this is that and room to spare.
RESIDENCY_MARGIN = 200 * 2**20


def kept_in_memory(batches: Any) -> bool:
    """Whether the run keeps its memory-mapped training split resident (`SplitResidency`):
    then evaluation does not release it either, or the next epoch would fault every image in."""
    return isinstance(batches, FastBatches) and isinstance(batches.release, SplitResidency) and batches.release.kept


def _end_epoch(run: Run, ep: int, state: dict) -> dict | None:
    """Evaluate, reduce the epoch's meters across ranks, step a plateau schedule; one row.
    None, with nothing changed, where a stop request cut the evaluation short."""
    m = state["meters"]
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
    sums = torch.tensor([m["loss"], m["correct"], m["n"]], dtype=torch.float64, device=run.device)
    sums = distributed.all_reduce_sum(sums, run.dist).cpu()
    loss_sum, correct, n = sums.tolist()
    t = time.perf_counter()
    # Each phase holds only what it reads (docs/speed.md, Memory): evaluation's batches do not stack
    # on training's free heap blocks, nor the training split's pages on the validation
    # split's (unless the run keeps the training split: it fits --memory-budget), and the
    # other way round. The splits stay in the OS page cache; mapping them back in costs
    # about 0.1 s an epoch.
    run.opt.zero_grad(set_to_none=True)  # the next step would free them first anyway
    release_free_memory()
    if not kept_in_memory(run.batches):
        drop_resident(run.cache.train.x)
    val = evaluate(run.model, run.val_x, run.val_y, run.augment, run.dist, amp=run.cfg.amp,
                   channels_last=run.cfg.channels_last, stop=lambda: bool(run.stop_signal))
    release_free_memory()
    drop_resident(run.cache.val.x)
    if val is None:  # given up for a stop request: nothing of the epoch's end has happened yet
        return None
    eval_s = time.perf_counter() - t
    # The lr of the epoch's last step (a per-step schedule has moved on since; a checkpoint
    # from before this was recorded has only the next one)
    lr = m.get("lr", run.opt.param_groups[0]["lr"])
    if not run.per_step:
        run.sched.step(val["top1"])
    row = {"epoch": ep + 1, "train_loss": loss_sum / n, "train_top1": 100 * correct / n, "val_loss": val["loss"],
           "val_top1": val["top1"], "val_top5": val["top5"], "val_n": val["n"], "lr": lr,
           "epoch_seconds": m["seconds"] + eval_s, "train_seconds": m["seconds"],
           "images_per_s": n / m["seconds"] if m["seconds"] > 0 else 0.0, **peak_memory_mib(run.device)}
    state["history"].append(row)
    state["meters"] = _fresh_meters()
    return row


def _resume(run: Run, state: dict, say) -> tuple[int, int]:
    path = Path(run.out / "last.pth" if run.cfg.resume == "auto" else run.cfg.resume)
    c = ckpt_io.load(path)
    ckpt_io.check_compatible(c, path, run.variant, run.cfg.num_classes, run.raw)
    _check_same_trajectory(c, path, run)
    saved, now = c.get("data") or {}, data_identity(run.cache)
    if saved and now and saved != now:
        raise UserError(f"{path}: the run was trained on other data than the cache in {run.cache.root} "
                        "(its training images or labels differ); resume with the run's own --data")
    ckpt_io.load_weights(run.raw, c["model"], path)
    try:
        run.opt.load_state_dict(c["optimizer"])
        run.sched.load_state_dict(c["scheduler"])
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: optimizer/scheduler state does not fit this run ({e})") from None
    ckpt_io.set_rng_state(c["rng"], run.aug_gen)
    state.update(step=c["step"], best_top1=c["best_top1"], best_epoch=c["best_epoch"],
                 history=list(c["history"]), meters=dict(c["meters"]) if run.dist.main else _fresh_meters())
    # A run killed between an improving epoch's last.pth and its best.pth link left best.pth
    # missing or holding an older state; that epoch's checkpoint is this one (saved at the
    # epoch's end, batch 0): link it now.
    if (run.dist.main and c["batch"] == 0 and c["epoch"] > 0 and c["best_epoch"] == c["epoch"]
            and same_file(path.parent, run.out) and _older_or_missing(run.out / "best.pth", path)):
        ckpt_io.link_atomic(path, run.out / "best.pth")
        say(f"{run.out / 'best.pth'}: made the checkpoint of epoch {c['epoch']}, the best, as the run's last save "
            "was cut short before it")
    # batch == steps_per_epoch: saved after the last step of an epoch, before its evaluation;
    # train_one_epoch then does nothing and the evaluation runs.
    epoch, batch = c["epoch"], c["batch"]
    if epoch >= run.cfg.epochs:
        more = (f"its {run.cfg.schedule} schedule ended with it" if run.cfg.schedule in CURVE_SCHEDULES
                else "a larger --epochs continues it")
        say(f"{path}: the run is already complete ({epoch} of {run.cfg.epochs} epochs); nothing to do ({more})")
    else:
        into = "" if same_file(path.parent, run.out) else f", continuing in {run.out}"
        say(f"resumed from {path}: epoch {epoch + 1}, step {batch} of {run.steps_per_epoch}{into}")
    return epoch, batch


# Settings that decide the sequence of batches, augmentations and updates: a resumed run must
# keep them, or it would continue a different run. (--epochs may change where the schedule's
# curve does not span the run, plateau and constant; --out, --device and the like do not
# change the maths.)
TRAJECTORY = ("seed", "bs", "lr", "momentum", "wd", "nesterov", "schedule", "warmup_epochs", "label_smoothing",
              "transforms", "recipe", "img_size", "max_steps", "amp", "channels_last", "deterministic", "sync_bn")


def _check_same_trajectory(c: dict, path: Path, run: Run) -> None:
    saved, now = c["config"], run.cfg.to_dict()
    # A run trained in bf16 continues in fp32 where bf16 would be emulated (build_run warned):
    # not bit for bit, as another machine's kernels would not be either, but not weeks late.
    keys = [k for k in TRAJECTORY if not (k == "amp" and run.amp_fell_back and saved.get(k) is True)]
    diff = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in keys
            if saved.get(k) != now[k] and not (k == "transforms" and _same_transforms(c, now[k]))]
    if saved.get("epochs") != now["epochs"] and now["schedule"] in CURVE_SCHEDULES:
        diff.append(f"--epochs {saved.get('epochs')} -> {now['epochs']} (the {now['schedule']} schedule's lr curve "
                    "spans the run's epochs; plateau and constant runs may continue for more)")
    if c.get("world", 1) != run.dist.world:
        diff.append(f"processes {c.get('world', 1)} -> {run.dist.world}")
    if diff:
        raise UserError(f"{path}: the run was made with other settings ({'; '.join(diff)}); "
                        "resume with the same settings, or start a new run in another --out")


def _same_transforms(c: dict, now: str | None) -> bool:
    """The checkpoint's transforms file is `now` under another name (`../utils/t.py` from
    another folder, an absolute path): the file the run resolved it to, as it recorded it."""
    return bool(now) and same_file(c.get("transforms_file"), Path(now))


def _older_or_missing(best: Path, last: Path) -> bool:
    """best.pth is not the checkpoint written with last.pth: missing, or written before it. (The
    same file when linked; where the file system has no hard links, a copy made just after it.)"""
    try:
        return not same_file(best, last) and best.stat().st_mtime_ns < last.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def resume_command(cfg: TrainConfig) -> str:
    """The command line that continues this run: the same arguments plus --resume (for a run of
    `alexnet ablate`, that command as it was)."""
    args = sys.argv[1:]
    prog = Path(sys.argv[0])
    if prog.name != "train.py" and args[:1] == ["ablate"]:
        return shlex.join(["alexnet", *args])  # a study run again resumes its unfinished runs
    if prog.name == "train.py":
        head = "python train.py"
    else:
        head = "alexnet train"
        if args[:1] == ["train"]:
            args = args[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = ""  # several nodes: the launcher's options are not visible here, only the node count
    if world > 1:
        if local < world:
            nodes = f"--nnodes={-(-world // local)} --node_rank=$NODE_RANK <this run's --rdzv options> "
        head = f"torchrun {nodes}--nproc_per_node={local} " + ("train.py" if prog.name == "train.py" else "-m alexnet train")
    argv, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1
            continue
        if not a.startswith("--resume="):
            argv.append(a)
        i += 1
    command = " ".join([head, shlex.join(argv), "--resume"]) if argv else f"{head} --resume"  # pasted into a shell
    return f"{command} (on every node)" if nodes else command
