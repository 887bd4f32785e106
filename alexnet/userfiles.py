"""Loading the Python files users pass on the command line: model files and transforms files.

A model file defines `build_model(num_classes)` returning an `nn.Module`. A transforms file
defines `build_transforms()` returning either an `alexnet.augment.Recipe` (run batched on the
training device) or any callable torchvision transform (run per image in DataLoader workers
on (3, H, W) uint8 tensors). Every way these files can be wrong ends in a one-line
`UserError` that names the file and what it must define.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from alexnet.augment import Recipe
from alexnet.errors import UserError

MODEL_CONTRACT = "must define build_model(num_classes) returning a torch.nn.Module"
TRANSFORMS_CONTRACT = ("must define build_transforms() returning an alexnet.augment.Recipe "
                       "or a torchvision transform")


def _where(exc: BaseException, path: Path) -> str:
    """'line N' of the innermost frame inside the user's file, if any."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == path.resolve():
            return f" (line {frame.lineno})"
    return ""


def load_python_file(path: str | Path, contract: str) -> ModuleType:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a .py file; the file {contract}")
    if not path.is_file():
        raise UserError(f"{path}: file not found; it {contract}")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        # PyTorch's checkpoints are zip archives: a checkpoint passed where a .py file goes
        what = "a zip archive (a checkpoint?), not a Python file" if _starts_with(path, b"PK\x03\x04") else \
            f"cannot read it ({e.__class__.__name__})"
        raise UserError(f"{path}: {what}; it {contract}") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        hint = "" if path.suffix == ".py" else f"; not a Python file? it {contract}"
        raise UserError(f"{path}: syntax error at line {e.lineno}: {e.msg}{hint}") from None
    name = f"alexnet_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    module = ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # so that pickling/multiprocessing can find its classes
    # As `python file.py` would: modules beside the file import by name while it loads.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        exec(code, module.__dict__)
    except SystemExit as e:  # a script's `sys.exit()` would end the run silently with its status
        raise UserError(f"{path}: called sys.exit({e.code!r}){_where(e, path)} while loading; it {contract}") from None
    except Exception as e:
        raise UserError(f"{path}: raised {e.__class__.__name__}{_where(e, path)} while loading: {e}") from None
    finally:
        if folder in sys.path:  # the file may have taken it out itself
            sys.path.remove(folder)
    return module


def _call(path: Path, fn: Callable, what: str, *args):
    try:
        return fn(*args)
    except UserError as e:
        # the project's own check (a Recipe's range, a variant's option) saw the mistake; the
        # file it is in is what the user needs to be told
        if str(e).startswith(f"{path}:"):
            raise
        raise type(e)(f"{path}: {what}{_where(e, path)}: {e}") from None
    except SystemExit as e:
        raise UserError(f"{path}: {what} called sys.exit({e.code!r}){_where(e, path)}") from None
    except Exception as e:
        raise UserError(f"{path}: {what} raised {e.__class__.__name__}{_where(e, path)}: {e}") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def load_model_file(path: str | Path, num_classes: int) -> nn.Module:
    path = Path(path)
    module = load_python_file(path, MODEL_CONTRACT)
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise UserError(f"{path}: no build_model found; the file {MODEL_CONTRACT}")
    model = _call(path, build, "build_model(num_classes)", num_classes)
    if not isinstance(model, nn.Module):
        raise UserError(f"{path}: build_model returned {type(model).__name__}, not a torch.nn.Module; "
                        f"the file {MODEL_CONTRACT}")
    return model


def check_model_output(path: str | Path, model: nn.Module, num_classes: int, img_size: int,
                       device: torch.device, amp: bool, channels_last: bool, training: bool = False) -> None:
    """A model file's model, placed as the run will use it, must take a batch of two blank
    `img_size` images and return (2, num_classes) logits. Without this check a model with
    another number of outputs trains (and evaluation indexes past its logits), and one made
    for another input size fails inside PyTorch. One forward pass in eval mode under the run's
    autocast, and with `training` one in training mode too (a model may return a tuple only
    there, as torchvision's Inception does with its auxiliary head). (No model is given a batch
    of one image: evaluation runs one as two copies, `evaluate.logits_for`.) Nothing of the
    run moves: BatchNorm's statistics and the random generators are put back, and every
    module's mode."""
    path = Path(path)
    modes = [(m, m.training) for m in model.modules()]
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    # SyncBatchNorm's training pass is a collective; its eval pass is the same as BatchNorm's
    passes = [False, True] if training and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) else [False]
    x = torch.zeros(2, 3, img_size, img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    try:
        for train_mode in passes:
            where = " in training mode" if train_mode else ""
            if train_mode:  # after the eval pass, which gives lazy modules' buffers their shapes
                buffers = [(b, b.clone()) for b in model.buffers()]
            try:
                # the training pass with gradients, to see that the loss will have some to give
                with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type),
                      torch.set_grad_enabled(train_mode), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)):
                    out = model.train(train_mode)(x)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise UserError(f"{path}: the model does not take a batch of {img_size}x{img_size} RGB images{where} "
                                f"(shape (2, 3, {img_size}, {img_size}) on {device.type}{', bf16 autocast' if amp else ''}): "
                                f"{e.__class__.__name__}{_where(e, path)}: {first}") from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"{path}: the model returns {got}{where} for a batch of 2 images; expected logits of "
                                f"shape (2, {num_classes}) for --num_classes {num_classes}")
            if not out.is_floating_point():
                raise UserError(f"{path}: the model returns {out.dtype} values{where}; expected floating-point logits")
            if train_mode and not out.requires_grad:
                if not any(p.requires_grad for p in model.parameters()):
                    raise UserError(f"{path}: the model has no trainable parameters (none, or requires_grad=False on "
                                    "every one): there is nothing to train")
                raise UserError(f"{path}: the model's output in training mode does not depend on any trainable "
                                "parameter (it has no gradient): there is nothing to train")
    finally:
        for m, was in modes:
            m.training = was
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def load_transforms_file(path: str | Path) -> Recipe | Callable:
    path = Path(path)
    module = load_python_file(path, TRANSFORMS_CONTRACT)
    build = getattr(module, "build_transforms", None)
    if not callable(build):
        raise UserError(f"{path}: no build_transforms found; the file {TRANSFORMS_CONTRACT}")
    t = _call(path, build, "build_transforms()")
    if not (isinstance(t, Recipe) or callable(t)):
        raise UserError(f"{path}: build_transforms returned {type(t).__name__}; the file {TRANSFORMS_CONTRACT}")
    return t
