"""`alexnet summary`: each layer's output shape, parameters and forward MFLOPs per image (and
a single model's training step), and a table over all registered variants. FLOPs are counted by PyTorch's FlopCounterMode
(a multiply-add counts as 2 FLOPs; convolutions and linear layers dominate), for the
computation as torchvision's AlexNet does it: FC1 over the 36 copies of a 1x1 map's pooled
vector. The project's models fold those copies (alexnet/models.py); a single model's summary
also prints what that leaves."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alexnet.config import MIN_IMG_SIZE, img_size_error
from alexnet.errors import ConfigError
from alexnet.models import VARIANTS, count_parameters, create_model
from alexnet.userfiles import check_model_output, load_model_file


def forward_mflops(model: nn.Module, img_size: int, folded: bool = False) -> float:
    """Forward MFLOPs per image in evaluation; `folded`: as the project computes them."""
    x = torch.zeros(1, 3, img_size, img_size)
    model.eval()
    with _fold(model, folded), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 1e6


def train_step_mflops(model: nn.Module, img_size: int) -> float:
    """MFLOPs per image of a training step (forward and backward, FC1 folded) as the project
    computes it: what a CPU's arithmetic peak has to cover (docs/speed.md, Time to accuracy).
    Two images, since BatchNorm in training mode needs more than one value per channel."""
    x = torch.zeros(2, 3, img_size, img_size)
    model.train()
    with _fold(model, True), FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2 / 1e6


@contextmanager
def _fold(model: nn.Module, on: bool) -> Iterator[None]:
    """FC1 folded (alexnet/models.py) or over the copies, in every AlexNet the model holds (a
    model file may wrap one)."""
    old = {m: m.fold_fc1 for m in model.modules() if hasattr(m, "fold_fc1")}
    for m, was in old.items():
        m.fold_fc1 = on and was
    try:
        yield
    finally:
        for m, was in old.items():
            m.fold_fc1 = was


def layer_table(model: nn.Module, img_size: int) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, type, output shape without batch, parameters) for every leaf module in order."""
    rows: list = []
    hooks = []
    inside: list[str] = []  # rows already taken: their modules' children are not rows again
    for name, m in model.named_modules():
        if _is_row(m) and not any(name.startswith(r + ".") for r in inside):
            inside.append(name)
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: rows.append(
                    (name, _kind(mod), tuple(out.shape[1:]), sum(p.numel() for p in mod.parameters())))))
    model.eval()
    with _fold(model, False), torch.no_grad():  # every layer runs, avgpool and FC1 as torchvision's
        model(torch.zeros(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    return rows


def _is_row(m: nn.Module) -> bool:
    """A layer of the table: a module without children, or one whose children have no parameters
    and that is not a container (GroupedLRN: one layer, though it runs its LRN once per tower)."""
    if not any(True for _ in m.children()):
        return True
    return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and not any(True for _ in m.parameters())


def _kind(m: nn.Module) -> str:
    """The layer's type; with dropout's p, as the Baseline keeps torchvision's layers at p=0."""
    return f"{type(m).__name__}(p={m.p:g})" if isinstance(m, nn.modules.dropout._DropoutNd) else type(m).__name__


def variants_table(img_size: int = 64, num_classes: int = 200) -> list[tuple[str, str, int, float]]:
    out = []
    for name, v in VARIANTS.items():
        m = create_model(name, num_classes)
        out.append((name, v.title, count_parameters(m), forward_mflops(m, img_size)))
    return out


def print_summary(target: str | None, img_size: int = 64, num_classes: int = 200, log=print) -> None:
    if img_size < MIN_IMG_SIZE:  # every variant's table runs at this size
        raise ConfigError(img_size_error(img_size))
    if num_classes < 1:
        raise ConfigError(f"--num-classes must be at least 1, got {num_classes}")
    if target is not None:
        if Path(target).suffix == ".py" or (target not in VARIANTS and Path(target).exists()):
            model = load_model_file(target, num_classes)
            # train's checks: a model that fails on this input, or has nothing to train, is one line
            check_model_output(target, model, num_classes, img_size, torch.device("cpu"), amp=False,
                               channels_last=False, training=True)
        else:
            model = create_model(target, num_classes)
        log(f"{target} at {img_size}x{img_size}, {num_classes} classes")
        log(f"{'layer':<16}{'type':<20}{'output shape':<20}{'params':>12}")
        for name, kind, shape, n in layer_table(model, img_size):
            log(f"{name:<16}{kind:<20}{str(shape):<20}{n:>12,}")
        nominal, computed = forward_mflops(model, img_size), forward_mflops(model, img_size, folded=True)
        log(f"total parameters {count_parameters(model):,}; forward {nominal:,.1f} MFLOPs per image"
            + (f" ({computed:,.1f} computed here: FC1 on summed weights)" if computed < nominal else ""))
        log(f"a training step (forward and backward, FC1 as training runs it) {train_step_mflops(model, img_size):,.1f} "
            "MFLOPs per image")
        log("")
    log(f"| variant | model | parameters | MFLOPs/image ({img_size}x{img_size}) |")
    log("|---|---|---:|---:|")
    for name, title, n, mf in variants_table(img_size, num_classes):
        log(f"| `{name}` | {title} | {n:,} | {mf:,.1f} |")
