"""Batches for training and evaluation, straight from the in-memory uint8 cache.

The fast path (a built-in `Recipe`): the split is one uint8 tensor in memory (on the GPU when
training on CUDA); each batch is an index gather followed by `BatchAugment` on the device.
The per-image path (a torchvision transform from a user's file) runs that transform in
DataLoader workers, then normalises on the device. Both are deterministic functions of
(seed, epoch, batch), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import mmap
import random
import signal
import sys
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alexnet.augment import BatchAugment, as_nchw_uint8, resize
from alexnet.distributed import Dist
from alexnet.errors import UserError
from alexnet.memory import rss_bytes
from alexnet.userfiles import load_transforms_file


# The most of a GPU's free memory a split may take: the rest is the model's, its gradients',
# the optimizer's and a batch's activations (AlexNet at batch 256 and 224 px: a few GB).
GPU_SPLIT_SHARE = 0.5


def to_memory(x: np.ndarray, device: torch.device, log: Callable[[str], object] | None = None,
              what: str = "split", agree: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """(N,H,W,3) uint8 array, memory-mapped from the cache -> a tensor over the same pages
    (CPU: no copy; the page cache holds the data once) or one copy on the GPU, after which
    the host's pages leave the process's resident set (1.3 GB for TinyImageNet, per rank).
    A split larger than GPU_SPLIT_SHARE of the GPU's free memory (an image folder cached at
    224 px) stays on the host, where each batch is gathered and then copied to the GPU:
    slower, but it trains instead of running out of memory at the start. `agree` makes that
    one choice for every process (torchrun): true if any process's GPU lacks the room, as the
    processes must agree on whether the split's pages are managed on the host."""
    with warnings.catch_warnings():
        # The mapping is read-only; batches are always gathered into new tensors, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(x)
    if device.type != "cuda":
        return t
    free = torch.cuda.mem_get_info(device)[0]
    on_host = x.nbytes > GPU_SPLIT_SHARE * free
    if agree is not None:
        on_host = agree(on_host)
    if on_host:
        if log is not None:
            log(f"the {what} ({x.nbytes / 1e9:,.1f} GB) is more than {GPU_SPLIT_SHARE:.0%} of the free memory of "
                f"this GPU ({free / 1e9:,.1f} GB) or of another process's: it stays in host memory and each batch "
                "is copied to the GPU")
        return t
    t = t.to(device)
    drop_resident(x)
    return t


def drop_resident(x: np.ndarray) -> bool:
    """Take a memory-mapped split's pages out of this process's resident set; returns whether
    it could (the whole mapping, when x is a view of one). Read-only mappings only: the data
    stays in the OS page cache and is mapped back in, without disk reads while memory allows,
    the next time it is read, so nothing is lost. For a split that is not read for a while:
    the training split during an evaluation, the validation split between evaluations, a
    split already copied to the GPU. Anything else (an array in memory, a writable mapping,
    a platform without madvise) is left as it is."""
    if x.flags.writeable:  # a copy-on-write mapping would lose what was written to it
        return False
    base = _mapping(x)
    if base is None or not hasattr(base, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        base.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # only a saving: never worth stopping a run for
        return False
    return True


def _mapping(x: np.ndarray) -> mmap.mmap | None:
    base = x
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def read_in(x: np.ndarray) -> bool:
    """Map a memory-mapped split's pages into the process at once (Linux 5.14+:
    MADV_POPULATE_READ), instead of one page fault per image as batches first read them in
    random order. Returns whether it could; anything else is left to fault in as it is read."""
    base = _mapping(x)
    if base is None or not hasattr(base, "madvise") or not sys.platform.startswith("linux"):
        return False
    try:
        base.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))  # 22: <linux/mman.h>, not in every Python
    except (OSError, ValueError):  # an older kernel: EINVAL
        return False
    return True


class SplitResidency:
    """Whether a memory-mapped training split stays in the process's resident set for the
    run, or leaves it every `RELEASE_IMAGES` images; `FastBatches` calls it at those points.

    Releasing keeps a run's resident set up to the split's size lower (1.2 GB for
    TinyImageNet), and costs a page fault for every image an epoch reads, in random order,
    plus the release itself (docs/speed.md). A process that fits within `budget`
    bytes with the whole split resident has no reason to pay that. So at the first release
    point of a run the split is released and the resident set read; if that plus the split
    plus `reserve` (room for what evaluation maps: the validation split) fits in `budget`, the
    split is read in at once (`read_in`) and kept; otherwise it is released at every point, as
    before. Under torchrun every process decides by its own memory, then `agree` (given this
    process's wish, returns whether every process keeps it) makes them decide alike: one that
    releases would set the pace of all. A kept split whose process later reads more than
    `budget` at a release point is released there and for the rest of the run (that process's
    alone). budget 0: always release. Where the resident set cannot be read (no
    /proc/self/statm: macOS, Windows) or the split is not a mapping, it is never kept."""

    def __init__(self, x: np.ndarray, budget: int, reserve: int = 0, rss: Callable[[], int | None] | None = None,
                 agree: Callable[[bool], bool] | None = None) -> None:
        self.x, self.budget, self.reserve = x, budget, reserve
        self.rss = rss or rss_bytes
        self.agree = agree or (lambda want: want)
        self.kept = False
        self.was_kept = False  # kept at some point, maybe released since
        self.decided = budget <= 0  # budget 0: nothing to decide

    def __call__(self) -> bool:
        """One release point; returns whether the split's pages were released."""
        if self.kept:
            now = self.rss()
            if now is not None and now <= self.budget:
                return False
            self.kept = False  # over the budget after all: release from here on
        released = drop_resident(self.x)
        if not self.decided:
            self.decided = True
            now = self.rss()
            want = released and now is not None and now + self.x.nbytes + self.reserve <= self.budget
            if self.agree(want):
                self.kept = self.was_kept = True
                read_in(self.x)
        return released

    @property
    def state(self) -> str:
        """What it did with the split so far: kept, released, or kept, then released."""
        return "kept" if self.kept else "kept, then released" if self.was_kept else "released"


def releaser(x: np.ndarray, device: torch.device, budget: int = 0, reserve: int = 0,
             agree: Callable[[bool], bool] | None = None) -> SplitResidency | None:
    """What `FastBatches` calls at its release points, `device` being where `to_memory` put
    the split: the CPU, where batches read the memory-mapped split in place, a
    `SplitResidency`; None on CUDA, where the split is on the GPU and its host pages are
    gone already."""
    return None if device.type == "cuda" else SplitResidency(x, budget, reserve, agree=agree)


def epoch_order(n: int, seed: int, epoch: int, d: Dist, bs: int) -> torch.Tensor:
    """This rank's sample indices for an epoch: one permutation shared by all ranks
    (seeded by seed and epoch), cut to whole batches on every rank, then dealt rank::world."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)  # any --seed: a generator takes < 2^64
    perm = torch.randperm(n, generator=g)
    per_rank = (n // d.world) // bs * bs
    return perm[d.rank::d.world][:per_rank]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of every random stream a step uses (augmentation, dropout): a function of
    (seed, rank, step) only, which makes resume exact without replaying anything. The rank
    moves the stream by a large odd constant (about 2^62.3), so no rank reaches another
    rank's seeds in any run's number of steps (a small multiplier, 7,919, gave rank 1 at step t
    rank 0's seeds at step t + 7,919); rank 0's seeds, and so a one-process run, are as before."""
    return (seed * 1_000_003 + rank * 0x4F1BBCDCBFA53E0B + step) % (2**63)


def seed_torch(seed: int, device: torch.device | None = None) -> None:
    """What `torch.manual_seed(seed)` does for the generators a step draws from (dropout, a
    per-image transform): the CPU's, and on CUDA the device's. torch.manual_seed also queues
    the seed for every backend this process has not started (CUDA on a CPU run, XPU and MTIA
    on a GPU run) and formats a stack trace for each, kept for their error messages: on this
    project's CPU 81 us a call from the top of a program and 145 us from ten frames down,
    about as deep as the training loop (every frame costs), against 1.2 us here. A GPU step
    of 3-5 ms would pay it every step."""
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()  # default_generators stays an empty tuple until CUDA starts
        torch.cuda.default_generators[index].manual_seed(seed)


# A memory-mapped training split that is not kept (SplitResidency) leaves the resident set
# after every this many images read: the kernel maps more than each read touches (64 KiB
# around it, or a whole large folio), ~100 KiB per image of the TinyImageNet cache on this
# project's machines, so ~100 MiB of the split stay mapped instead of all of it (1.2 GB) by
# the end of an epoch (docs/speed.md, Memory).
RELEASE_IMAGES = 1024


class FastBatches:
    """Training batches for a built-in recipe: gather + batched augmentation on the device.

    `release`, when given, is called after every `release_images` images read (whole
    batches): a `SplitResidency`, which either keeps the memory-mapped split in memory or
    releases its pages there, so that only the recent batches' stay resident."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: BatchAugment, bs: int,
                 release: Callable[[], object] | None = None, release_images: int | None = None) -> None:
        self.x, self.y, self.augment, self.bs = x, y, augment, bs
        self.release = release
        self.release_every = max(1, (release_images or RELEASE_IMAGES) // bs)

    def __call__(self, order: torch.Tensor, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = self.augment.device
        order = order.to(self.x.device)
        for b in range(start, len(order) // self.bs):
            idx = order[b * self.bs:(b + 1) * self.bs]
            # the augmentation reads the batch's images straight out of the cache
            xb = self.augment(self.x, train=True, ids=idx)
            if self.release is not None and (b + 1) % self.release_every == 0:
                self.release()  # the batch is copied out: its pages can go
            yield xb, self.y[idx].to(dev, non_blocking=True)


class _PerImage(Dataset):
    """Cache rows through a user's torchvision transform; each item seeded by its position so
    the result does not depend on the number of workers."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Callable, order: torch.Tensor, seed: int,
                 transform_file: str | None = None) -> None:
        self.x, self.y, self.transform, self.order, self.seed = x, y, transform, order, seed
        self.transform_file = transform_file

    # Pickled only for workers started by spawn or forkserver (macOS, Windows, Linux from
    # Python 3.14; fork copies the process): the split travels as its file, not as 1.2 GB of
    # pixels a worker an epoch, and the transform as the file that builds it, whose classes
    # the new process could not import by name.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self.x, np.memmap) and self.x.filename is not None:
            state["x"] = ("memmap", self.x.filename, self.x.offset, self.x.dtype.str, self.x.shape)
        if self.transform_file is not None:
            state["transform"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["x"], tuple):
            _, filename, offset, dtype, shape = state["x"]
            state["x"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        if state["transform"] is None:
            state["transform"] = load_transforms_file(state["transform_file"])
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        j = int(self.order[i])
        s = (self.seed + i) % 2**63
        # Every generator a transform may draw from: torch's (torchvision v2), Python's
        # (torchvision v1's RandomChoice and RandomOrder, a user's own code) and numpy's.
        seed_torch(s)  # a DataLoader worker: CPU only
        random.seed(s)
        np.random.seed(s % 2**32)
        img = torch.from_numpy(np.array(self.x[j])).permute(2, 0, 1)  # (3,H,W) uint8
        try:
            return self.transform(img), int(self.y[j])
        except Exception as e:  # `probe` tried one image; this is another that the transform fails on
            raise _TransformFailed(f"the transform raised {e.__class__.__name__} on training image {j} of the "
                                   f"cache: {e}") from None


class _TransformFailed(UserError):
    """A transform that raised, in a DataLoader worker or not (PerImageBatches words it)."""


def _collate(items: list, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of a transform's images: stacked as they are when they share a size (`finish`
    resizes the batch on the device), else each resized to `size` first, keeping its dtype
    (a random resize, v2.RandomResize, gives every image its own size)."""
    images, labels = zip(*items)
    for img in images:
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
            got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise _TransformFailed(f"the transform must return a (3, H, W) tensor, got {got} for a training image")
        if img.dtype != torch.uint8 and not img.is_floating_point():
            raise _TransformFailed(_dtype_refused(img.dtype))
        if img.is_floating_point():  # `probe` saw one image; a transform may scale only some
            lo, hi = img.aminmax()
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise _TransformFailed(_float_range_refused(float(lo), float(hi)))
    if len({img.shape for img in images}) > 1:
        images = tuple(resize(img[None], (size, size))[0].round_().clamp_(0, 255).to(torch.uint8)
                       if img.dtype == torch.uint8 else resize(img[None], (size, size))[0] for img in images)
    if len({img.dtype for img in images}) > 1:  # some scaled to float (v2.RandomApply): uint8 ones to 0..1 too
        images = tuple(img.float().div_(255) if img.dtype == torch.uint8 else img.float() for img in images)
    return torch.stack(images), torch.tensor(labels)


def _float_range_refused(lo: float, hi: float) -> str:
    # `finish` reads float pixels as 0..1 and normalises them itself: 0..255 floats or an
    # already normalised image would train at the wrong scale without any error.
    return (f"the transform returned float pixels in [{lo:.4g}, {hi:.4g}]; expected uint8, or float in [0, 1] "
            f"(v2.ToDtype(torch.float32, scale=True), no v2.Normalize: normalisation is applied after the transform)")


def _dtype_refused(dtype: torch.dtype) -> str:
    # Integers other than uint8 would be read as 0..1 floats: the model would see 255 times its input.
    return f"the transform returned {dtype} pixels; expected uint8, or float in [0, 1] (v2.ToDtype(torch.float32, scale=True))"


def _worker_init(_: int) -> None:
    # Ctrl-C, a scheduler's SIGTERM and a closed terminal's SIGHUP are for the main process,
    # which saves a checkpoint at the next step and then stops the workers itself. Slurm (and
    # `kill -- -PGID`, and a hang-up) signals every process of the job: a worker that died of
    # it failed the run before it could save. A worker still running a minute after a SIGTERM
    # (its main process never got to stop it) ends then, by SIGALRM's default action.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGALRM"):
        for s in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal, as for the main process
            signal.signal(s, _end_in_a_minute)
    if hasattr(signal, "pthread_sigmask"):  # forked with them blocked (PerImageBatches): now they may come
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_STOP_SIGNALS)


# The signals a worker leaves to the main process. PyTorch's worker sets its own SIGTERM
# handler first (it dies unless its parent sent it), seeds, and only then calls
# `_worker_init`: a job-wide SIGTERM in that gap killed the worker, and the run with it. The
# workers are started with these blocked, so one that comes then waits for `_worker_init`.
WORKER_STOP_SIGNALS = {signal.SIGINT, *(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))}


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block WORKER_STOP_SIGNALS while DataLoader workers are forked (they inherit the mask);
    one that arrives meanwhile reaches this process when the mask is put back."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no masks, and no job-wide signals either
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_death(e: BaseException) -> str | None:
    """What to say of a DataLoader worker that died ("DataLoader worker (pid N) is killed by
    signal: Killed.": the kernel's out-of-memory killer, most often, or a transform that
    crashed its process), or None for any other error. PyTorch raises it in the main thread
    wherever that is, inside a training step as often as in the loader (cli.main)."""
    text = str(e).strip()
    if not (isinstance(e, RuntimeError) and text.startswith("DataLoader worker")):
        return None
    return f"a DataLoader worker died ({text.rstrip('. ')}; out of memory?)"


# What helps a training run (train, ablate) whose worker died.
WORKER_ADVICE = "fewer --workers or a smaller --bs need less"


def _end_in_a_minute(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(60)


class PerImageBatches:
    """Training batches for a torchvision transform, run per image in DataLoader workers."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Callable, augment: BatchAugment,
                 bs: int, workers: int, seed: int, source: str, transform_file: str | Path | None = None) -> None:
        self.x, self.y, self.transform, self.augment = x, y, transform, augment
        self.bs, self.workers, self.seed, self.source = bs, workers, seed, source
        self.transform_file = None if transform_file is None else str(Path(transform_file).resolve())

    def probe(self) -> None:
        """Run the transform once in this process, so that a transform that raises or returns
        the wrong thing fails here with a one-line error, not inside a worker or collate."""
        img = torch.from_numpy(np.array(self.x[0])).permute(2, 0, 1)
        try:
            out = self.transform(img)
        except Exception as e:
            raise UserError(f"{self.source}: the transform raised {e.__class__.__name__} on a (3, H, W) uint8 "
                            f"image: {e}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[0] != 3:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"{self.source}: the transform must return a (3, H, W) tensor, got {got}")
        if out.dtype != torch.uint8 and not out.is_floating_point():
            raise UserError(f"{self.source}: {_dtype_refused(out.dtype)}")
        if out.is_floating_point():
            lo, hi = out.min().item(), out.max().item()
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise UserError(f"{self.source}: {_float_range_refused(lo, hi)}")

    def __call__(self, order: torch.Tensor, start: int, epoch: int = 0, rank: int = 0):
        order = order[start * self.bs:]
        base = (((self.seed * 1_000_003 + epoch) * 1_009 + rank) * 10_000_019 + start * self.bs) % 2**63
        ds = _PerImage(self.x, self.y, self.transform, order, base, self.transform_file)
        dl = DataLoader(ds, batch_size=self.bs, num_workers=self.workers, drop_last=True, worker_init_fn=_worker_init,
                        collate_fn=partial(_collate, size=self.augment.size),
                        persistent_workers=False, pin_memory=self.augment.device.type == "cuda")
        with _stop_signals_blocked():
            batches = iter(dl)  # starts the workers
        try:
            while True:
                # --workers 0 makes the images in this process: its own Python and numpy
                # streams (a model's code may draw from them) go on as they would with workers.
                kept = (random.getstate(), np.random.get_state()) if self.workers == 0 else None
                try:
                    xb, yb = next(batches)
                except StopIteration:
                    return
                except _TransformFailed as e:
                    # From a worker it comes back with the worker's traceback around the message.
                    raise UserError(f"{self.source}: {str(e).rsplit('_TransformFailed: ', 1)[-1].strip()}") from None
                except RuntimeError as e:
                    if (died := worker_death(e)) is None:
                        raise
                    raise UserError(f"{self.source}: {died}: {WORKER_ADVICE}") from None
                finally:
                    if kept is not None:
                        random.setstate(kept[0])
                        np.random.set_state(kept[1])
                yield self.finish(xb), yb.to(self.augment.device, non_blocking=True)
        finally:
            # The workers stop now, not when the iterator is collected: an error's traceback
            # holds this frame, and with it the iterator, until the process exits, whose
            # clean-up then signals the workers and waits a minute for them (_worker_init).
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def finish(self, xb) -> torch.Tensor:
        """Check the transform's output, then resize/normalise on the device."""
        if not isinstance(xb, torch.Tensor) or xb.dim() != 4 or xb.shape[1] != 3:
            shape = tuple(xb.shape[1:]) if isinstance(xb, torch.Tensor) else type(xb).__name__
            raise UserError(f"{self.source}: the transform must return a (3, H, W) tensor, got {shape}")
        unit = 1 / 255 if xb.dtype == torch.uint8 else 1.0
        xb = xb.to(self.augment.device, non_blocking=True)
        if xb.shape[-1] != self.augment.size or xb.shape[-2] != self.augment.size:
            xb = resize(xb, (self.augment.size,) * 2)
        elif xb.dtype != torch.uint8:
            xb = xb.float()
        # uint8 batches go through the very arithmetic of the fast path (same rounding)
        return self.augment.normalize(xb.contiguous(memory_format=torch.channels_last), unit)


def eval_batches(x: torch.Tensor, y: torch.Tensor, bs: int, d: Dist) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation in order, dealt rank::world so every image is counted exactly once."""
    idx = torch.arange(d.rank, len(x), d.world, device=x.device)  # made there once, not copied per batch
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        yield as_nchw_uint8(x[j]), y[j]
