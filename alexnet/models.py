"""The AlexNet family: one configurable module, a table of variants, a registry.

Layer geometry follows torchvision's `alexnet` (the AlexNet people use today: channels
64-192-384-256-256, conv1 11x11 stride 4, overlapping 3x3/2 max pooling, adaptive average
pooling to 6x6, FC 4096-4096-classes). The 2012 paper model changes channels, adds local
response normalisation, drops the outputs of the hidden FC layers (torchvision drops their
inputs) and uses the paper's initialisation. Every variant is a row of
`VARIANTS`; `create_model(name)` builds one.

At 64x64 input the feature map after the last pooling is 1x1, so `AdaptiveAvgPool2d(6)`
copies one 256-vector 36 times and FC1 (9216 -> 4096) multiplies those copies. The model
keeps that function and torchvision's parameter layout, so that results and checkpoints stay
comparable with the usual implementation, but not the work: W @ repeat(v) equals
(W summed over each input's 36 columns) @ v, so FC1 runs as a 4096 x 256 product on the
summed weights, and autograd hands each of the 36 columns the gradient the copies would
have got (the sum's backward repeats it). FC1's forward pass and both its gradients were
three (N x 9216) x (9216 x 4096) matrix products, the largest part of a Baseline step; now
they are 36x smaller, plus one pass over the weights to sum them and one to write their
gradient. Measured on a 2-core AVX2 CPU in fp32 (docs/speed.md): Baseline steps 1.57x
faster at batch 64, 1.67x at batch 128. The fold is exact math, not an approximation (the
outputs and gradients differ by float rounding, the order of the sums); it is taken only
where the copies are identical: a 1x1 map (not at 224 pixels) and no dropout on FC1's input
(so in training for variants without dropout and for the paper's model, whose dropout acts
after FC1; in evaluation for all but the GAP head, which has no copies), and where the head
is the one built here, not replaced or hooked.
`ALEXNET_FOLD_FC1=0`, or `model.fold_fc1 = False`, keeps the 36 copies.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.errors import ConfigError
from alexnet.smallconv import Conv2d

FOLD_ENV = "ALEXNET_FOLD_FC1"
Norm = Literal["none", "batchnorm", "lrn"]
Head = Literal["large", "small", "gap"]
Init = Literal["pytorch", "paper"]


@dataclass(frozen=True)
class AlexNetConfig:
    """Everything that distinguishes one AlexNet variant from another."""

    widths: tuple[int, int, int, int, int] = (64, 192, 384, 256, 256)
    norm: Norm = "none"
    # Which convs (0-based) are followed by the normalisation; the paper put LRN after
    # conv1 and conv2 only, BatchNorm is usually after every conv.
    norm_layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    dropout: float = 0.0
    # Where the head's dropout acts. False: on the inputs of FC1 and FC2 (torchvision's order,
    # the published design's). True: on the outputs of the hidden FC layers, after their ReLU,
    # as the paper ("dropout in the first two fully-connected layers") and Caffe's
    # bvlc_alexnet have it. At 64x64 the two differ more than the order suggests: FC1's input
    # is 36 copies of one vector, and dropout there drops each copy on its own.
    dropout_after_fc: bool = False
    head: Head = "large"
    hidden: int = 4096
    # "standard": conv1 11x11 stride 4 (15x15 map at 64x64 input, 1x1 after the last pool).
    # "small": conv1 5x5 stride 2, a 32x32 map, 3x3 after the last pool: more resolution
    # for 64x64 images at about 2.5x the forward MFLOPs (an extra, not used by the seed variants).
    stem: Literal["standard", "small"] = "standard"
    init: Init = "pytorch"
    # init "paper": the constant bias of conv2, conv4, conv5 and the hidden FC layers. The
    # paper says 1; with 1 this model's loss stayed flat at ln(200) here, also on the paper's
    # own input scale (docs/results.md, the paper's model), as it did for Caffe's reference
    # replication, bvlc_alexnet, which used 0.1 ("found necessary for training, as
    # initialization to 1 gave flat loss").
    init_bias: float = 0.1
    # The paper's two GPUs ("towers"): 2 splits conv2, conv4 and conv5 into two groups that each
    # see half the channels, and LRN normalises within each half; conv1, conv3 and the FC layers
    # connect everything, as the paper's GPUs communicated only there. 1 (default): one tower.
    groups: int = 1
    # What the GAP head averages. "conv5" (default): conv5's whole map, as the variant is defined
    # (global average pooling after conv5). "pool5": the map after the last 3x3/2 max pool, as
    # this project built it before this setting existed (checkpoints without it load so): at
    # 64x64 that pool's one window covers conv5's whole 3x3 map, so the head saw conv5's
    # maximum, a global max pool, and the average was over one value.
    gap_input: Literal["conv5", "pool5"] = "conv5"

    def __post_init__(self) -> None:
        # Tuples, however given: a config from a list compares equal to the one its checkpoint records.
        for k in ("widths", "norm_layers"):
            if isinstance(getattr(self, k), list):
                object.__setattr__(self, k, tuple(getattr(self, k)))
        if len(self.widths) != 5 or min(self.widths) < 1:
            raise ConfigError(f"widths must be 5 positive channel counts, got {self.widths}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("none", "batchnorm", "lrn"):
            raise ConfigError(f"norm must be none, batchnorm or lrn, got {self.norm!r}")
        if self.head not in ("large", "small", "gap"):
            raise ConfigError(f"head must be large, small or gap, got {self.head!r}")
        if self.stem not in ("standard", "small"):
            raise ConfigError(f"stem must be standard or small, got {self.stem!r}")
        if self.init not in ("pytorch", "paper"):
            raise ConfigError(f"init must be pytorch or paper, got {self.init!r}")
        if self.dropout_after_fc and self.head == "gap":
            raise ConfigError("dropout_after_fc needs a hidden FC layer (head large or small); the gap head has none")
        if not math.isfinite(self.init_bias):
            raise ConfigError(f"init_bias must be finite, got {self.init_bias}")
        if self.gap_input not in ("conv5", "pool5"):
            raise ConfigError(f"gap_input must be conv5 or pool5, got {self.gap_input!r}")
        if self.gap_input == "pool5" and self.head != "gap":
            raise ConfigError("gap_input pool5 is a setting of the gap head; the large and small heads always follow pool5")
        if not isinstance(self.groups, int) or self.groups < 1 or any(w % self.groups for w in self.widths):
            raise ConfigError(f"groups must be a positive integer dividing every width {self.widths}, got {self.groups!r}")


def paper_lrn() -> nn.LocalResponseNorm:
    """The paper's response normalisation: k=2, n=5, alpha=1e-4, beta=0.75.

    The paper divides by (k + alpha * sum a^2)^beta; PyTorch divides by
    (k + alpha/n * sum a^2)^beta, so the paper's alpha is n * 1e-4 = 5e-4 here.
    """
    return nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)


class GroupedLRN(nn.Module):
    """The paper's LRN within each tower: the channels split into `groups` equal parts, each
    normalised on its own, so no window spans two towers (no parameters, so no state-dict keys)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups, self.lrn = groups, paper_lrn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lrn(part) for part in x.chunk(self.groups, 1)], 1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def _norm(cfg: AlexNetConfig, index: int, channels: int) -> list[nn.Module]:
    if cfg.norm == "none" or index not in cfg.norm_layers:
        return []
    if cfg.norm == "batchnorm":
        return [nn.BatchNorm2d(channels)]
    return [paper_lrn() if cfg.groups == 1 else GroupedLRN(cfg.groups)]


class AlexNet(nn.Module):
    """AlexNet with typed options; see `AlexNetConfig`.

    Attributes `features`, `avgpool` and `classifier` mirror torchvision's module so that a
    baseline state dict loads into `torchvision.models.alexnet` unchanged.
    """

    def __init__(self, cfg: AlexNetConfig = AlexNetConfig(), num_classes: int = 200) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        c1, c2, c3, c4, c5 = cfg.widths
        # BatchNorm before ReLU (Ioffe & Szegedy); LRN after ReLU, as in the paper.
        bn_first = cfg.norm == "batchnorm"

        def block(i: int, cin: int, cout: int, k: int, s: int, p: int) -> list[nn.Module]:
            groups = cfg.groups if i in (1, 3, 4) else 1  # the paper's towers: conv2, conv4, conv5
            conv = Conv2d(cin, cout, k, s, p, bias=not (bn_first and i in cfg.norm_layers), groups=groups)
            norm = _norm(cfg, i, cout)
            return [conv, *norm, nn.ReLU(inplace=True)] if bn_first else [conv, nn.ReLU(inplace=True), *norm]

        if cfg.stem == "standard":
            stem = [*block(0, 3, c1, 11, 4, 2), nn.MaxPool2d(3, 2)]
        else:
            stem = [*block(0, 3, c1, 5, 2, 2), nn.MaxPool2d(3, 2)]
        self.features = nn.Sequential(
            *stem,
            *block(1, c1, c2, 5, 1, 2),
            nn.MaxPool2d(3, 2),
            *block(2, c2, c3, 3, 1, 1),
            *block(3, c3, c4, 3, 1, 1),
            *block(4, c4, c5, 3, 1, 1),
            *([] if cfg.head == "gap" and cfg.gap_input == "conv5" else [nn.MaxPool2d(3, 2)]),
        )
        # Dropout modules stay in place even at p=0 so that parameter indices (and so state
        # dict keys) match torchvision's for the baseline.
        if cfg.head == "gap":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(c5, num_classes))
        else:
            def hidden_fc(cin: int, cout: int) -> list[nn.Module]:  # with its dropout where cfg puts it
                fc, drop = [nn.Linear(cin, cout), nn.ReLU(inplace=True)], nn.Dropout(cfg.dropout)
                return [*fc, drop] if cfg.dropout_after_fc else [drop, *fc]

            self.avgpool = nn.AdaptiveAvgPool2d(6)
            hidden = hidden_fc(c5 * 36, cfg.hidden)
            if cfg.head == "large":
                hidden += hidden_fc(cfg.hidden, cfg.hidden)
            self.classifier = nn.Sequential(*hidden, nn.Linear(cfg.hidden, num_classes))
        if cfg.init == "paper":
            self._paper_init()
        # FC1 on summed weights where its input is 36 copies of one vector (module doc); read
        # once here, not in forward, so that torch.compile does not guard on the environment.
        self.fold_fc1 = os.environ.get(FOLD_ENV, "1") != "0"

    def _paper_init(self) -> None:
        """Weights N(0, 0.01); biases `init_bias` in conv2, conv4, conv5 and the hidden FC
        layers (to give ReLUs positive inputs early, section 5 of the paper, which says 1;
        see `AlexNetConfig.init_bias`), 0 elsewhere."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in self.classifier if isinstance(m, nn.Linear)]
        ones = {id(convs[i]) for i in (1, 3, 4)} | {id(m) for m in linears[:-1]}
        for m in [*convs, *linears]:
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.constant_(m.bias, self.cfg.init_bias if id(m) in ones else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self._folds(x):
            return self._classify_folded(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))

    def _folds(self, x: torch.Tensor) -> bool:
        """Whether FC1's input would be copies of one vector (a pooled grid over a 1x1 map,
        FC1's input dropout not at work: it would drop each copy on its own), and the head is
        still the one built here: the fold reads its modules' parameters without calling them,
        so a replaced, quantised or re-parametrised pooling, dropout or FC1, or a forward hook
        on one of them (feature extraction, Grad-CAM, legacy weight_norm), keeps the copies."""
        if not self.fold_fc1 or x.shape[-2:] != (1, 1):
            return False
        pool, head = self.avgpool, self.classifier
        if type(pool) is not nn.AdaptiveAvgPool2d or type(head) is not nn.Sequential or len(head) < 2:
            return False
        # the dropout before FC1, if any (a list: slicing the Sequential would build a new one each pass)
        before, fc1 = [head[0]] if self._fc1_at else [], head[self._fc1_at]
        if any(type(m) is not nn.Dropout for m in before) or type(fc1) is not nn.Linear:
            return False
        h, w = _pair(pool.output_size)
        if h is None or w is None or h * w == 1 or fc1.in_features != x.shape[1] * h * w:
            return False  # no copies (the GAP head), or a head built for another map
        if any(drop.training and drop.p > 0 for drop in before):  # its own mode: test-time (MC) dropout too
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (pool, head, *before, fc1))

    def _classify_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The head on (N, C, 1, 1) features, FC1 on its weights summed over each channel's
        copies (flatten puts channel c's copies at columns c*k .. c*k+k-1)."""
        fc1, (h, w) = self.classifier[self._fc1_at], _pair(self.avgpool.output_size)
        weight = fc1.weight.reshape(fc1.out_features, -1, h * w).sum(-1)
        return self.classifier[self._fc1_at + 1:](F.linear(torch.flatten(x, 1), weight, fc1.bias))

    @property
    def _fc1_at(self) -> int:
        """FC1's index in the classifier built here: after the dropout on its input, or first."""
        return 0 if self.cfg.dropout_after_fc else 1


def settings_rebuild(model: nn.Module, num_classes: int) -> bool:
    """Whether `AlexNet(model.cfg, num_classes)` builds this very model, so that its
    checkpoint can record the settings instead of asking for the model file again. Not for a
    model file that edits what create_model returned (another activation, a layer added or
    replaced): rebuilt from the settings, it would load the same weights into the unedited
    model and evaluate it without a word. The modules are compared as printed (types, sizes,
    options), the rebuild made on the meta device (no memory, no initialisation)."""
    if type(model) is not AlexNet:
        return False
    with torch.device("meta"):
        again = AlexNet(model.cfg, num_classes)
    return repr(again) == repr(model)


def fc1_folds(model: nn.Module, img_size: int = 64) -> bool:
    """Whether `model`'s forward pass, in its present mode, would fold FC1 at `img_size`."""
    if not isinstance(model, AlexNet):
        return False
    modes = {m: m.training for m in model.features.modules()}  # eval: BatchNorm on one image
    try:
        with torch.no_grad():
            features = model.features.eval()(torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device))
    finally:
        for m, training in modes.items():
            m.training = training
    return model._folds(features)


def _pair(size) -> tuple:
    """An adaptive pooling's output_size as (h, w) (an int means a square)."""
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass(frozen=True)
class Variant:
    """A named model plus the augmentation recipe the ablation pairs it with."""

    name: str
    title: str
    model: AlexNetConfig
    recipe: str  # a name in alexnet.augment.RECIPES
    doc: str = ""
    extra: dict = field(default_factory=dict)


_BN = AlexNetConfig(norm="batchnorm")
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("baseline", "Baseline", AlexNetConfig(), "baseline",
                "torchvision geometry, no dropout, no normalisation"),
        Variant("dropout", "Dropout", AlexNetConfig(dropout=0.5), "baseline",
                "dropout 0.5 before FC1 and FC2"),
        Variant("batchnorm", "BatchNorm", _BN, "baseline",
                "BatchNorm after every conv"),
        Variant("combined", "Combined-Large", replace(_BN, dropout=0.5), "combined",
                "BatchNorm + dropout 0.5, 4096-4096 head, random crop + pixel augmentation"),
        Variant("combined_small", "Combined-Small", replace(_BN, dropout=0.5, head="small", hidden=2000),
                "combined", "as Combined-Large with a 2000-unit head"),
        Variant("combined_gap", "Combined-GAP", replace(_BN, dropout=0.5, head="gap"),
                "combined", "as Combined-Large with global average pooling of conv5 + one FC"),
        Variant("paper", "Paper (2012)",
                AlexNetConfig(widths=(96, 256, 384, 384, 256), norm="lrn", norm_layers=(0, 1),
                              dropout=0.5, dropout_after_fc=True, init="paper"),
                "paper", "96-256-384-384-256, LRN, dropout 0.5 after FC1 and FC2, paper init (biases 0.1, as Caffe's), "
                         "PCA lighting"),
    ]
}


def create_model(name: str, num_classes: int = 200, **overrides) -> AlexNet:
    """Build a registered variant; unknown names raise with the list of known ones."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    cfg = replace(VARIANTS[name].model, **overrides) if overrides else VARIANTS[name].model
    model = AlexNet(cfg, num_classes)
    # A modified variant gets its own name, so checkpoints of the two are never confused.
    model.variant = name + "".join(f"+{k}={v}" for k, v in sorted(overrides.items()))
    return model


def registered(variant: str | None) -> Variant | None:
    """The registry row a model's `variant` names, also one create_model modified
    ("paper+init_bias=1.0" is the paper's model); None for any other name."""
    return VARIANTS.get((variant or "").split("+")[0])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
