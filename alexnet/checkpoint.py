"""Checkpoints: atomic writes, validated reads, and the RNG state needed for exact resume.

A checkpoint is one dict holding everything a run needs to continue or to be evaluated on
its own: model, optimizer and scheduler state, position (epoch, step, batch within the
epoch), best metric, metric history, every RNG state, the resolved config, the model's
variant and settings, the augmentation recipe, normalisation statistics and class ids.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.atomic import write_atomic
from alexnet.errors import CheckpointError

FORMAT = 1


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save through a temporary file and a rename (see alexnet.atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


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


def check_compatible(ckpt: dict[str, Any], path: str | Path, variant: str | None, num_classes: int) -> None:
    """A checkpoint from another variant or class count is refused with both names."""
    if ckpt["num_classes"] != num_classes:
        raise CheckpointError(f"{path}: trained for {ckpt['num_classes']} classes, "
                              f"but the model here has {num_classes}")
    if variant is not None and ckpt.get("variant") not in (None, variant):
        raise CheckpointError(f"{path}: trained as variant {ckpt['variant']!r}, "
                              f"but the model here is {variant!r}")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with a one-line error instead of PyTorch's page of key lists."""
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
