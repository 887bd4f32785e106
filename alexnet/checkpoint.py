"""Checkpoints: atomic writes, validated reads, and the RNG state needed for exact resume.

A checkpoint is one dict holding everything a run needs to continue or to be evaluated on
its own: model, optimizer and scheduler state, position (epoch, step, batch within the
epoch), best metric, metric history, every RNG state, the resolved config, the model's
variant and settings, the augmentation recipe, normalisation statistics and class ids.
"""

from __future__ import annotations

import copy
import random
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.atomic import link_atomic, write_atomic
from alexnet.errors import CheckpointError, ConfigError
from alexnet.models import AlexNet, AlexNetConfig, registered

FORMAT = 1


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save through a temporary file and a rename (see alexnet.atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


class CheckpointWriter:
    """Writes a run's checkpoints (`save_atomic`, then best.pth as a link), either at once or,
    with `background`, in a thread while training goes on.

    Why a thread: on a GPU an epoch of TinyImageNet trains in about 2 s, and writing the
    Baseline's 463 MB last.pth (copy to the host, serialise, fsync) was, by estimate, most of
    the second more that each epoch took on an H200 machine (README, On a GPU). In the
    background the state is first copied to host memory (the next step changes the weights
    in place): on this project's CPU 0.11-0.14 s for that checkpoint against 0.40-1.36 s for
    the write; serialising and fsync release the GIL for most of their time (a busy loop
    beside a save on the CPU kept 89% of its rate). At most one write is in flight: `save` waits for the one before, `wait` for the
    last, and either raises that write's error. The thread is not a daemon: an interpreter
    that exits waits for it, so a started write always lands (unless the process is killed,
    and then the rename leaves the previous last.pth, as for any write).
    """

    def __init__(self, background: bool = False) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if background else None
        self._pending: Future | None = None

    def save(self, obj: dict[str, Any], path: str | Path, best: str | Path | None = None) -> None:
        """Write obj to path; with `best`, make that file the same checkpoint."""
        self.wait()
        if self._pool is None:
            _write(obj, path, best)
        else:
            self._pending = self._pool.submit(_write, host_copy(obj), path, best)

    @property
    def busy(self) -> bool:
        """A write is in flight."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        finally:
            # Forgotten only once it is over: a wait cut short (Ctrl-C) leaves it, and its
            # error, to the next one.
            if pending.done():
                self._pending = None

    def poll(self) -> None:
        """Raise the error of a write that has already failed (no waiting): a run learns of a
        full disk at its next check, not a whole epoch later at the next save."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _write(obj: dict[str, Any], path: str | Path, best: str | Path | None) -> None:
    save_atomic(obj, path)
    if best is not None:
        link_atomic(path, best)


def host_copy(obj: Any) -> Any:
    """A copy that later changes to obj cannot reach: tensors copied to host memory (from the
    GPU, or from the CPU tensors an optimizer updates in place), containers rebuilt, other
    values deep-copied (NumPy's RNG state holds an array)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes: a state dict's OrderedDict and its _metadata
        for k, v in obj.items():
            out[k] = host_copy(v)
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; unreadable or foreign files raise CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file in it (best.pth or last.pth)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, wrong file type
        # PyTorch's own messages run to several lines of advice about other cases; the kind
        # of failure is what helps here.
        raise CheckpointError(f"{path}: not a readable checkpoint: the file is truncated, corrupted or of "
                              f"another kind ({e.__class__.__name__} from torch.load)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by this project (a readable file without the "
                              f"training state this project saves)")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: written by another version of this project (checkpoint format "
                              f"{ckpt.get('format')!r}; this version reads format {FORMAT})")
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: str | Path, variant: str | None, num_classes: int,
                     model: torch.nn.Module | None = None) -> None:
    """A checkpoint from another variant, class count or model setting is refused with both.
    The settings matter where the weights alone cannot tell: the same weights fit a GAP head
    that averages conv5 and one that averages pool5 (`AlexNetConfig.gap_input`)."""
    if ckpt["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: trained for {ckpt['num_classes']} classes, "
                              f"but the model here has {num_classes}")
    diff = []
    if isinstance(model, AlexNet) and ckpt.get("model_cfg") is not None:
        saved, here = trained_config(ckpt, path), model.cfg
        diff = [k for k in here.__dict__ if getattr(saved, k) != getattr(here, k)]
        if not diff:
            return  # the same model, whatever each was named (a model file for an older head)
    if variant is not None and ckpt.get("variant") not in (None, variant):
        raise CheckpointError(f"{path}: trained as variant {ckpt['variant']!r}, "
                              f"but the model here is {variant!r}")
    if diff:
        shown = "; ".join(f"{k}={getattr(saved, k)!r}, but the model here has {k}={getattr(here, k)!r}" for k in diff)
        raise CheckpointError(f"{path}: trained with {shown}; {_builds_it(ckpt, saved)}")


def _builds_it(ckpt: dict[str, Any], saved: AlexNetConfig) -> str:
    """How to get the model a checkpoint was trained as: a model file's line for a registered
    variant (with the settings it changed), and evaluate and predict without a model file."""
    row = registered(ckpt.get("variant"))
    alone = "evaluate and predict rebuild it from the checkpoint alone"
    if row is None:
        return alone
    changed = ", ".join(f"{k}={v!r}" for k, v in saved.__dict__.items() if getattr(row.model, k) != v)
    return f"a model file returning create_model({row.name!r}, num_classes{', ' + changed if changed else ''}) builds it; {alone}"


def trained_config(ckpt: dict[str, Any], path: str | Path) -> AlexNetConfig:
    """The AlexNetConfig a checkpoint's model was built with. Settings added since it was
    written take the value that matches how the model was then built."""
    cfg = dict(ckpt["model_cfg"])  # lists (a config given them, or a JSON round trip): AlexNetConfig makes them tuples
    if cfg.get("head") == "gap":
        cfg.setdefault("gap_input", "pool5")  # the GAP head followed pool5 until gap_input existed
    try:
        return AlexNetConfig(**cfg)
    except (TypeError, ConfigError) as e:  # a setting this version does not know
        raise CheckpointError(f"{path}: its model settings do not fit this version of the project ({e})") from None


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with a one-line error instead of PyTorch's page of key lists."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        def keys(what: str, ks: list[str]) -> str:
            return f"{len(ks)} {what}: {', '.join(ks[:3])}{f' and {len(ks) - 3} more' if len(ks) > 3 else ''}"

        found = [keys(w, ks) for w, ks in (("missing", missing), ("unexpected", unexpected)) if ks]
        raise CheckpointError(f"{path}: weights do not fit this model ({'; '.join(found)}); was it trained "
                              f"from another model file or variant?")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)[:200]]
        raise CheckpointError(f"{path}: weights do not fit this model ({first[0].strip()})") from None


def rng_state(aug_generator: torch.Generator | None) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        # Only where this process already uses CUDA: asking starts a CUDA context, which a CPU
        # run on a GPU machine has no use for (and DataLoader workers would fork from).
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "aug": aug_generator.get_state() if aug_generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], aug_generator: torch.Generator | None) -> None:
    """Restore what fits this machine. Training reseeds augmentation and dropout every step
    from (seed, rank, step), so exact resume does not depend on these; a checkpoint made on
    another device (a CUDA generator's state does not fit a CPU one) still resumes."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    aug = state.get("aug")
    if aug_generator is not None and aug is not None and aug.numel() == aug_generator.get_state().numel():
        aug_generator.set_state(aug)
