"""Using a trained checkpoint: evaluate it on the val split, or predict classes of images.

A checkpoint carries its variant, model settings, class ids and names, normalisation
statistics and recipe, so both commands need nothing else (a custom model from a user's file
also needs that file).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alexnet import checkpoint as ckpt_io
from alexnet.atomic import not_a_folder, same_file, write_atomic
from alexnet.augment import BatchAugment, Recipe
from alexnet.data import cache_for
from alexnet.errors import CheckpointError, ConfigError, UserError
from alexnet.evaluate import (CONFUSED_HEADER, PER_CLASS_HEADER, TTA, confused_path, evaluate, logits_for,
                              write_per_class)
from alexnet.loader import to_memory
from alexnet.models import AlexNet
from alexnet.precision import resolve_amp
from alexnet.sources import image_files, is_image_name, load_image_file
from alexnet.train import pick_device
from alexnet.userfiles import check_model_output, load_model_file


def _warn(line: str) -> None:
    print(line, file=sys.stderr)  # stderr escapes what it cannot encode, and stays out of piped results


def load_trained(ckpt_path: str | Path, model_file: str | Path | None, device: torch.device, warn=_warn):
    """(model in eval mode, checkpoint dict, BatchAugment for its eval view)."""
    c = ckpt_io.load(ckpt_path)
    if model_file is not None:
        model = load_model_file(model_file, c["num_classes"])
        ckpt_io.check_compatible(c, ckpt_path, getattr(model, "variant", None), c["num_classes"], model)
    elif c.get("model_cfg") is not None:
        model = AlexNet(ckpt_io.trained_config(c, ckpt_path), c["num_classes"])
    else:
        source = c.get("config", {}).get("model")
        raise CheckpointError(f"{ckpt_path}: holds a custom model{f' (trained from {source})' if source else ''}; "
                              "pass its model file too (`evaluate MODEL_FILE CHECKPOINT`, `predict --model MODEL_FILE`)")
    ckpt_io.load_weights(model, c["model"], ckpt_path)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules()):
        warn(f"warning: {ckpt_path}: the model has BatchNorm without running statistics (track_running_stats="
             "False), which normalises over the batch in eval mode too: an image's scores depend on the images "
             "evaluated beside it, and an image alone gets the same scores whatever it shows")
    model = model.to(device).eval()
    channels_last = c["config"].get("channels_last", True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if model_file is not None:
        check_model_output(model_file, model, c["num_classes"], c.get("img_size", 64), device,
                           resolve_amp(c["config"].get("amp", False), device), channels_last)
    st = c["stats"]
    try:
        recipe = Recipe(**c["recipe"]) if c.get("recipe") else Recipe()
    except (ConfigError, TypeError) as e:  # a recipe this version does not take (TypeError: a field it lacks)
        raise CheckpointError(f"{ckpt_path}: its augmentation recipe {c['recipe']} cannot be used: {e}") from None
    augment = BatchAugment(recipe, c["img_size"], st["mean"], st["std"], st.get("eigval"), st.get("eigvec"), device=device)
    return model, c, augment


def _check_writable(path: Path, flag: str) -> None:
    """A clear error now for an output file that cannot be written later."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give the path of a CSV file to write")
    parent = path.parent
    if why := not_a_folder(parent):  # the message names the file that is in the way
        raise UserError(f"{flag} {path}: {parent} {why}" if why.startswith("is ") else f"{flag} {path}: {why}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create its folder {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable")


def run_evaluate(model_file, ckpt_path, data=None, device="auto", bs=500, tta="none", per_class=None,
                 amp=None, log=print, warn=_warn) -> dict:
    """Top-1, top-5 and loss of a checkpoint on the val split, printed through `log`; its
    warnings through `warn` (stderr), so that a reader of the results that has gone (`| head`)
    does not stop the evaluation before its --per-class tables are written."""
    if tta not in TTA:
        raise UserError(f"--tta must be one of {', '.join(TTA)}, got {tta!r}")
    if bs < 1:
        raise UserError(f"--bs must be at least 1, got {bs}")
    if per_class is not None:  # before the evaluation, not after it
        _named(per_class, "--per-class")
        inputs = [Path(p) for p in (ckpt_path, model_file) if p is not None]
        _check_output(Path(per_class), "--per-class", inputs, PER_CLASS_HEADER)
        _check_output(confused_path(per_class), f"--per-class {per_class}: its confused pairs' file", inputs,
                      CONFUSED_HEADER)
    dev = pick_device(device)
    model, c, augment = load_trained(ckpt_path, model_file, dev, warn=warn)
    cache = cache_for(data, log=log)
    if cache.wnids != c["wnids"]:
        raise CheckpointError(f"{ckpt_path}: trained on other classes than the data in {cache.root} "
                              f"({len(c['wnids'])} vs {len(cache.wnids)} classes, or a different order)")
    trained_on = c.get("cache_img_size", 64)  # the pixels the training views were cut from
    if cache.img_size != trained_on:
        raise CheckpointError(f"{ckpt_path}: trained on a cache of {trained_on}x{trained_on} images; {cache.root} "
                              f"holds {cache.img_size}x{cache.img_size} ones (prepare one with --img-size {trained_on})")
    amp = resolve_amp(c["config"].get("amp", False) if amp is None else amp, dev, warn)
    x = to_memory(cache.val.x, dev, log=warn, what="validation split")
    y = torch.from_numpy(np.array(cache.val.y)).to(dev)
    res = evaluate(model, x, y, augment, bs=bs, tta=tta, amp=amp, channels_last=c["config"].get("channels_last", True),
                   num_classes=c["num_classes"] if per_class is not None else None)
    # The tables first: a reader of the output that has gone (`| head`) must not cost them.
    pairs = write_per_class(per_class, res.pop("confusion"), c["wnids"], c["names"]) if per_class is not None else None
    log(f"{ckpt_path} (epoch {c['epoch']}, variant {c.get('variant') or 'custom'}), tta={tta}: "
        f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  on {res['n']:,} val images")
    if pairs is not None:
        log(f"per-class accuracy written to {per_class}, the most-confused class pairs to {pairs}")
    return res


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Any image PIL reads -> (size, size, 3) uint8: shorter side to `size`, centre crop,
    the same geometry `prepare` uses for image folders."""
    return torch.from_numpy(load_image_file(Path(path), size))


PREDICT_HEADER = ["image", "wnid1", "name1", "prob1"]  # then wnid2.. up to --topk: an earlier table of any k
PREDICT_BS = 256  # images decoded and classified at a time: memory stays flat for any number of files


# Never the path of a table: a checkpoint (best.pth is a hard link to last.pth, so writing
# through one loses both) or a model file.
KEPT_SUFFIXES = (".pth", ".pt", ".ckpt", ".py")


def _named(path: str | Path, flag: str) -> None:
    """An empty path is refused by name ("" would be the current folder)."""
    if not str(path).strip():
        raise UserError(f"{flag} must name a CSV file to write, got an empty path")


def _check_output(path: Path, flag: str, inputs: list[Path], header: list[str]) -> None:
    """An output table must not land on a checkpoint, a model file, one of the command's
    inputs, or any file but an earlier table of its kind (one that starts with `header`, or
    an empty file): a run's metrics.csv or a cache's .npy would be lost to a mistyped path,
    and /dev/null, replaced by rename, would become a file."""
    if path.suffix.lower() in KEPT_SUFFIXES:
        raise UserError(f"{flag} {path}: names a checkpoint or model file ({path.suffix}); give the path of a "
                        f"CSV file to write, e.g. {'predictions' if flag == '--csv' else 'per_class'}.csv")
    if path.exists() and any(same_file(f, path) for f in inputs):
        raise UserError(f"{flag} {path}: is one of this command's input files (or a link to one); "
                        f"give a new file's path")
    _check_writable(path, flag)
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path}: exists and is not a regular file (a device, a pipe or a socket); "
                        f"give the path of a CSV file to write")
    if path.is_file():
        try:
            with open(path, "rb") as f:
                first = f.read(4096).removeprefix(b"\xef\xbb\xbf")  # a BOM: saved again by a spreadsheet
        except OSError as e:
            raise UserError(f"{flag} {path}: exists and cannot be read ({e.strerror}); give a new file's path") from None
        if first and not first.startswith(",".join(header).encode()):
            raise UserError(f"{flag} {path}: holds a file this command did not write (it would replace a table "
                            f"starting {','.join(header)}); give a new file's path, or move that file "
                            f"(nothing was overwritten)")


def _check_csv(csv_path: Path, files: list[Path]) -> None:
    """--csv must not name an image, least of all one of those being classified."""
    if is_image_name(csv_path.name):
        raise UserError(f"--csv {csv_path}: names an image file ({csv_path.suffix}); give the path of a "
                        f"CSV file to write, e.g. predictions.csv")
    if csv_path.exists() and any(same_file(f, csv_path) for f in files):
        raise UserError(f"--csv {csv_path}: is one of the files to classify; give a new file's path")


def _shown(path: Path) -> str:
    """A path for the terminal: bytes of a name that is not UTF-8 as escapes, not an error."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@torch.no_grad()
def run_predict(ckpt_path, images, model_file=None, device="auto", topk=5, bs=PREDICT_BS, csv_path=None,
                log=print, warn=_warn) -> list[list[tuple[str, str, float]]]:
    """Top-k classes of each image; `images` holds files and folders (walked for image files).
    Prints each image's classes, or with `csv_path` writes them there (one row an image) and
    prints a line saying so. A file that does not decode is skipped with a warning, so that
    one bad file among thousands costs nothing else; the command still fails at the end."""
    if bs < 1:
        raise UserError(f"--bs must be at least 1, got {bs}")
    files = image_files(images)
    if csv_path is not None:
        _named(csv_path, "--csv")
        _check_csv(Path(csv_path), files)
        _check_output(Path(csv_path), "--csv", [Path(p) for p in (ckpt_path, model_file) if p is not None],
                      PREDICT_HEADER)
    dev = pick_device(device)
    model, c, augment = load_trained(ckpt_path, model_file, dev, warn=warn)
    size = c.get("cache_img_size", 64)
    amp = resolve_amp(c["config"].get("amp", False), dev, warn)
    k = min(topk, len(c["wnids"]))
    done, results, skipped = [], [], []
    for start in range(0, len(files), bs):
        pixels, chunk = [], []
        for path in files[start:start + bs]:
            try:
                pixels.append(load_image(path, size))
            except UserError as e:
                skipped.append(str(e))
                warn(f"warning: skipped {e}")
                continue
            chunk.append(path)
        if not chunk:
            continue
        logits = logits_for(model, torch.stack(pixels), augment, "none", amp, c["config"].get("channels_last", True))
        p, i = logits.float().softmax(1).topk(k)
        for path, probs, idx in zip(chunk, p.cpu().tolist(), i.cpu().tolist()):
            rows = [(c["wnids"][j], c["names"][j], q) for q, j in zip(probs, idx)]
            done.append(path)
            results.append(rows)
            if csv_path is None:
                log(f"{_shown(path)}:")
                for wnid, name, q in rows:
                    log(f"  {100 * q:6.2f}%  {wnid}  {name}")
    if csv_path is not None and done:  # none classified: an earlier table stays as it was
        header = ["image"] + [f"{col}{r}" for r in range(1, k + 1) for col in ("wnid", "name", "prob")]
        lines = [header] + [[str(f)] + [v for wnid, name, q in rows for v in (wnid, name, f"{q:.6f}")]
                            for f, rows in zip(done, results)]
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(lines)
        # File names that are not UTF-8 go out as the bytes they are, not as an error.
        text = out.getvalue().encode("utf-8", "surrogateescape")
        write_atomic(csv_path, lambda f: f.write(text))
        log(f"top-{k} classes of {len(done):,} images written to {csv_path}")
    if skipped:
        rest = "the others were classified" if len(skipped) < len(files) else "none was classified"
        raise UserError(f"{len(skipped)} of {len(files)} files skipped, not readable as images "
                        f"({rest}): {skipped[0]}" + (" (and more, above)" if len(skipped) > 1 else ""))
    return results
