"""The typed training configuration: defaults in code, a JSON file may override them, the
command line overrides the file. Unknown keys and out-of-range values raise `ConfigError`
naming the option. The resolved config is saved beside the outputs and in every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from alexnet.errors import ConfigError

# conv1 (11x11, stride 4) and three 3x3 max-pools of stride 2 leave a 3x3 map before the last
# pool at 63 pixels; below, a 2x2 one, which that pool cannot take.
MIN_IMG_SIZE = 63


def img_size_error(size: int) -> str:
    return f"--img-size must be at least {MIN_IMG_SIZE} (AlexNet's pooling needs it), got {size}"


SCHEDULES = ("plateau", "cosine", "onecycle", "step", "constant")
WARMUP_SCHEDULES = ("cosine", "step", "constant")  # the per-step schedules built on LambdaLR (train.build_scheduler)
DEVICES = ("auto", "cpu", "cuda")


def opt(default: Any, help: str, flag: str | None = None, **kw: Any) -> Any:
    """A config field that also describes its command-line option."""
    meta = {"help": help, "flag": flag, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    model: str | None = opt(None, "model file defining build_model(num_classes) (positional in train.py)", positional=True)
    variant: str | None = opt(None, "a registered variant name instead of a model file")
    transforms: str | None = opt(None, "transforms file (default: with --variant, the variant's own recipe; with a model file, the "
                                    "Baseline's, no augmentation, except the paper's model, which gets the paper's)")
    recipe: str | None = opt(None, "a built-in augmentation recipe by name (baseline, randomcrop, pixel, combined, paper) instead of a transforms file")
    data: str | None = opt(None, "cache directory (default ./data or $ALEXNET_DATA; prepared on first use)")
    out: str = opt("results", "output directory for checkpoints, metrics and plots")
    epochs: int = opt(30, "number of epochs")
    bs: int = opt(64, "batch size per process")
    lr: float = opt(0.01, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    wd: float = opt(0.0005, "weight decay")
    nesterov: bool = opt(False, "Nesterov momentum")
    num_classes: int = opt(200, "number of classes (must match the data)")
    workers: int = opt(2, "DataLoader workers, used only by per-image (torchvision) transforms files")
    device: str = opt("auto", "auto, cpu or cuda", choices=DEVICES)
    seed: int = opt(0, "random seed, any integer (data order, augmentation, initialisation)")
    deterministic: bool = opt(False, "deterministic algorithms: identical metrics for identical runs")
    schedule: str = opt("plateau", "learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs (cosine, step, constant)")
    label_smoothing: float = opt(0.0, "label smoothing for the cross-entropy loss")
    amp: bool = opt(False, "bf16 autocast on CPU and CUDA")
    channels_last: bool | None = opt(None, "channels_last memory format (the same maths up to rounding); default: on "
                                           "with --amp, off in fp32, where it was not faster on the CPU measured "
                                           "(README, Speed)")
    compile: bool = opt(False, "torch.compile the model")
    img_size: int = opt(64, "training resolution; 224 or 227 upsample on the device (paper geometry)")
    resume: str | None = opt(None, "checkpoint to resume from; --resume alone (or 'auto') takes OUT/last.pth", nargs="?",
                             const="auto")
    save_every: int = opt(0, "also save last.pth every N steps inside an epoch (0: only at epoch ends)")
    sync_bn: bool = opt(False, "synchronise BatchNorm statistics across processes (torchrun)")
    memory_budget: float = opt(3.0, "resident-set budget in GB per process (Linux CPU runs with a built-in recipe, "
                                    "and CUDA runs whose split stays on the host): "
                                    "the training split stays in memory for the run when the process fits in it "
                                    "with the split, else its pages are released as batches read them; 0: always "
                                    "release (README, Memory)")
    max_steps: int = opt(0, "stop each epoch after N steps (0: full epochs); for smoke tests")
    progress: bool = opt(True, "progress bar when the output is a terminal")

    def __post_init__(self) -> None:
        # Unset, channels_last follows --amp: on a 2-core CPU it sped bf16 steps up by up to
        # 1.34x and left fp32 steps level or slower, down to 0.91x (README, Speed).
        if self.channels_last is None:
            self.channels_last = bool(self.amp)

    def warnings(self) -> list[str]:
        """Settings that are valid but almost surely not what was meant: a warm-up the schedule
        does not run, or one that takes the whole run. Warnings, not errors: runs started
        before they were pointed out must still resume with the settings they were made with."""
        out = []
        if self.warmup_epochs and self.schedule not in WARMUP_SCHEDULES:
            out.append(f"--warmup-epochs {self.warmup_epochs:g} has no effect: it applies to --schedule "
                       f"{', '.join(WARMUP_SCHEDULES)}, not {self.schedule}"
                       + (" (onecycle warms up over its first quarter itself)" if self.schedule == "onecycle" else ""))
        elif self.warmup_epochs >= self.epochs:
            out.append(f"--warmup-epochs {self.warmup_epochs:g} takes the whole run of --epochs {self.epochs}: "
                       "the lr never reaches --lr")
        return out

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.bs >= 1, f"--bs must be at least 1, got {self.bs}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive finite number, got {self.lr}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.momentum > 0 or not self.nesterov,
             "--nesterov needs --momentum above 0 (Nesterov's look-ahead is along the momentum; "
             "PyTorch's SGD refuses it without), got --momentum 0")
        need(math.isfinite(self.wd) and self.wd >= 0, f"--wd must be a finite number >= 0, got {self.wd}")
        need(self.num_classes >= 2, f"--num_classes must be at least 2, got {self.num_classes}")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        # An empty path (an unset shell variable) would mean the working directory, or the default.
        need(self.out.strip() != "", "--out must name a folder, got an empty path")
        need(self.data is None or self.data.strip() != "", "--data must name a cache folder (or be left out for the "
                                                            "default), got an empty path")
        need(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.model is None:  # a registered variant: AlexNet's geometry
            need(self.img_size >= MIN_IMG_SIZE, img_size_error(self.img_size))
        else:  # a model file's model is run at this size before training (check_model_output)
            need(self.img_size >= 2, f"--img-size must be at least 2, got {self.img_size}")  # a mirror needs 2
        need(math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        need(math.isfinite(self.memory_budget) and self.memory_budget >= 0,
             f"--memory-budget must be a number of GB >= 0, got {self.memory_budget}")
        need(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        need(self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}")
        from alexnet.augment import RECIPES

        need(self.recipe is None or self.recipe in RECIPES,
             f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        need(self.recipe is None or self.transforms is None, "give --recipe or --transforms, not both")
        # `--resume` takes an optional path, so `--resume models/x.py` reads the model file as the checkpoint
        need(not (self.model is None and self.variant is None and str(self.resume).endswith(".py")),
             f"--resume took {self.resume} as the checkpoint to resume from; put the model file before it "
             f"(train.py {self.resume} --resume) or give --resume a checkpoint (.pth)")
        need((self.model is None) != (self.variant is None),
             "give exactly one of a model file (positional) or --variant NAME")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**{f.name: _typed(f.name, str(f.type), d[f.name], source) for f in fields(cls) if f.name in d})


# What a JSON value may be for each annotation of a TrainConfig field. A JSON file can hold
# any type; without this check {"amp": "no"} would switch autocast on (a non-empty string is
# true) and {"epochs": "two"} would fail deep inside training.
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _typed(name: str, ftype: str, value: Any, source: str) -> Any:
    """`value` for field `name` (annotation `ftype`), checked; ints become floats where a
    float is expected. Raises ConfigError naming the key, the value and what was expected."""
    base, optional = ftype.removesuffix(" | None"), ftype.endswith(" | None")
    if value is None and optional:
        return None
    types, what = _JSON_TYPES[base]
    if (isinstance(value, bool) and base != "bool") or not isinstance(value, types):  # True is an int to Python
        raise ConfigError(f"{source}: {name} must be {what}{' or null' if optional else ''}, got {value!r}")
    return float(value) if base == "float" else value


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Options generated from `TrainConfig`, so the CLI and the config cannot drift apart.

    The seed's spellings (--bs, --wd, --num_classes) are kept; underscores and dashes are both
    accepted for multi-word options.
    """
    p.add_argument("--config", help="JSON file of config keys; command-line options override it")
    for f in fields(TrainConfig):
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        shown = f" (default: {default})" if default not in (None, "") else ""
        kw: dict[str, Any] = {"help": meta["help"] + shown, "default": argparse.SUPPRESS}
        if meta.get("positional"):
            p.add_argument(f.name, nargs="?", metavar="MODEL_FILE", **kw)
            continue
        names = [_flag(f)]
        if "_" in f.name:
            names.append("--" + f.name)
        ftype = str(f.type)  # a string under `from __future__ import annotations`
        if ftype in ("bool", "bool | None"):
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, **kw)
            continue
        conv = {"int": int, "float": float}.get(ftype, str)
        for k in ("choices", "nargs", "const"):
            if k in meta:
                kw[k] = meta[k]
        p.add_argument(*names, dest=f.name, type=conv, **kw)


def resolve(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- --config file <- command line, then validate."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            loaded = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark, as Notepad writes
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (expected JSON in UTF-8)") from None
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, like {{\"epochs\": 10}}; "
                              f"got a JSON {_JSON_KIND.get(type(loaded), type(loaded).__name__)}")
        values.update(loaded)
        TrainConfig.from_dict(values, source=str(path))
    given = {k: v for k, v in vars(args).items() if k != "config" and k in _names()}  # only what was typed
    for pair in EXCLUSIVE:  # one of a pair on the command line replaces the file's other one
        for k, other in (pair, pair[::-1]):
            if k in given and other not in given:
                values.pop(other, None)
    values.update(given)
    return TrainConfig.from_dict(values).validate()


# Options of which a run takes one: a model file or a variant, a recipe or a transforms file.
EXCLUSIVE = (("model", "variant"), ("recipe", "transforms"))


_JSON_KIND = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def defaults() -> dict[str, Any]:
    return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(TrainConfig)}
