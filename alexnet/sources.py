"""Reading a data source: the official TinyImageNet-200 zip or its extracted folder, or an
image folder (train/<class>/*, val/<class>/*), zipped or not.

`_open_source` finds the data root and the layout, `_plan_tiny` / `_plan_folder` check the
layout and list what to decode in cache order with the labels, and `_decode` turns one file
into a uint8 RGB array. `alexnet.data` builds the cache from these. `load_image_file` decodes
a single image file with exactly the image-folder geometry, for prediction. Every problem is
a one-line `DataError` (or `UserError`) naming the file.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alexnet.errors import DataError, UserError

Log = Callable[[str], object]


class SettingsMismatch(DataError):
    """A readable data set that does not fit the options given (`--counts`, `--img-size`):
    the options are wrong for it, not the data set, so a download of it is kept."""

TINY = "tiny-imagenet-200"
TINY_SIZE = 64  # every TinyImageNet-200 image is 64x64
LAYOUT = "expected the official TinyImageNet-200 layout"
SUBSET = " (for a subset of the data set in the same layout: prepare --counts any)"


class _Reader:
    """Files of a zip archive or a folder by '/'-separated name relative to the data root
    (`prefix` is that root inside a zip: 'tiny-imagenet-200/' or '')."""

    def __init__(self, kind: str, path: str, prefix: str = "") -> None:
        self.kind, self.path, self.prefix = kind, str(path), prefix
        self._zip: zipfile.ZipFile | None = None
        if kind == "zip":
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise DataError(f"{self.path}: not a readable zip archive ({e}); the file is "
                                f"truncated or not a zip: download it again") from None

    def spec(self) -> tuple[str, str, str]:
        return self.kind, self.path, self.prefix

    def names(self) -> list[str]:
        if self._zip is not None:
            k = len(self.prefix)
            return [n[k:] for n in self._zip.namelist() if n.startswith(self.prefix) and not n.endswith("/")]
        root = Path(self.path)
        return [Path(d, f).relative_to(root).as_posix() for d, _, fs in walk(root, onerror=_unreadable_folder(root))
                for f in fs]

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self.prefix + name)
        return Path(self.path, name).read_bytes()

    def show(self, name: str) -> str:
        """How messages name a file (a name that is not UTF-8 with its odd bytes as U+FFFD,
        so that printing it cannot fail)."""
        return printable(f"{self.prefix}{name} in {self.path}" if self._zip is not None else str(Path(self.path, name)))

    def missing(self, name: str) -> str:
        return printable(f"{self.prefix}{name}: missing from {self.path}" if self._zip is not None
                         else f"{Path(self.path, name)}: missing")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def printable(text: str) -> str:
    """`text` with the undecodable bytes of file names (Python's surrogate escapes) as U+FFFD:
    a terminal, or a log, set to strict UTF-8 would otherwise fail on the message itself."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def walk(root: str | Path, onerror: Callable[[OSError], None] | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk that enters linked folders, as torchvision's ImageFolder does (a link to a class
    folder is a class of its own, named by the link), except a link to a folder on its own
    path or above it, which would loop (or walk everything above the source). Sorted, so that
    the result does not depend on the file system's listing order. The caller may prune `dirs`."""
    chains: dict[str, tuple[str, ...]] = {}  # folder -> the real paths of it and the folders above it
    for folder, dirs, files in os.walk(root, onerror=onerror, followlinks=True):
        key = os.path.normpath(folder)
        chain = chains[key] = (*chains.get(os.path.dirname(key), ()), os.path.realpath(folder))
        keep = []
        for d in sorted(dirs):
            path = os.path.join(folder, d)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if any(_within(real, target) for real in chain):  # target is on this path, or above it
                    continue
            keep.append(d)
        dirs[:] = keep
        files.sort()
        yield folder, dirs, files


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unreadable_folder(root: str | Path) -> Callable[[OSError], None]:
    """os.walk's onerror under `root`: a folder of the data (in train/ or val/) that cannot be
    listed is an error, not a class left out; others (lost+found at a mount's root) are not read."""
    def onerror(e: OSError) -> None:
        try:
            parts = Path(e.filename).relative_to(root).parts
        except (TypeError, ValueError):
            parts = ("train",)
        if "train" in parts or "val" in parts:
            raise DataError(printable(f"{e.filename}: cannot list it ({e.strerror})")) from None
    return onerror


def _open_source(path: Path) -> tuple[_Reader, str]:
    """A reader at the data root and the layout: 'tinyimagenet' or 'imagefolder'."""
    if path.is_dir():
        for root in (path, path / TINY):
            if (root / "wnids.txt").is_file():
                return _Reader("dir", str(root)), "tinyimagenet"
        if (path / "train").is_dir() and not (path / "val" / "val_annotations.txt").exists():
            return _Reader("dir", str(path)), "imagefolder"
        if (path / "val" / "val_annotations.txt").exists():  # the TinyImageNet layout, less its class list
            raise DataError(f"{path / 'wnids.txt'}: missing; a TinyImageNet-200 folder has wnids.txt (the 200 class "
                            f"ids, one per line) beside train/ and val/")
        raise DataError(f"{path}: neither a TinyImageNet-200 folder (wnids.txt, train/, "
                        f"val/val_annotations.txt) nor an image folder (train/<class>/*, val/<class>/*)")
    reader = _Reader("zip", str(path))
    names = reader.names()
    roots = [""] + sorted({n.split("/", 1)[0] + "/" for n in names if "/" in n})
    tiny = any(n.endswith("val/val_annotations.txt") for n in names)  # then never an image folder
    for layout, marker in (("tinyimagenet", "wnids.txt"), ("imagefolder", "train/")):
        for root in roots:
            if not (tiny and layout == "imagefolder") and any(n.startswith(root + marker) for n in names):
                reader.prefix = root
                return reader, layout
    reader.close()
    raise DataError(f"{TINY}/wnids.txt: missing from {path}; {LAYOUT} (or an image folder: "
                    f"train/<class>/*, val/<class>/*)")


@dataclass
class _Plan:
    """What to decode, in cache order, and the labels."""

    wnids: list[str]
    names: list[str]
    train: list[str]
    train_y: np.ndarray
    val: list[str]
    val_y: np.ndarray
    order: dict[str, str]


def _natural(name: str) -> list:
    """Sort key putting val_2 before val_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _text(reader: _Reader, name: str) -> str:
    try:
        return reader.read(name).decode("utf-8-sig")  # -sig: a byte-order mark an editor added is not text
    except (KeyError, FileNotFoundError):
        raise DataError(f"{reader.missing(name)}; {LAYOUT}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) as e:
        # RuntimeError: NotImplementedError, a compression method zipfile lacks (Deflate64)
        raise DataError(f"{reader.show(name)}: unreadable ({e}); {LAYOUT}") from None


def _plan_tiny(reader: _Reader, counts: tuple[int, int, int] | None, log: Log) -> _Plan:
    """Validate the official layout. Val labels come only from val_annotations.txt."""
    wnids = _text(reader, "wnids.txt").split()
    if len(set(wnids)) != len(wnids) or not wnids or (counts and len(wnids) != counts[0]):
        expected = f"{counts[0]} distinct" if counts else "distinct"
        subset = SUBSET if counts else ""
        error = SettingsMismatch if wnids and len(set(wnids)) == len(wnids) else DataError
        raise error(f"{reader.show('wnids.txt')}: {len(wnids)} class ids ({len(set(wnids))} "
                    f"distinct), expected {expected} WordNet ids, one a line{subset}")
    files = reader.names()
    words = {}
    if "words.txt" in files:
        for line in _text(reader, "words.txt").splitlines():
            wnid, _, name = line.partition("\t")
            words[wnid.strip()] = name.strip()
    by_class: dict[str, list[str]] = {w: [] for w in wnids}
    val_files = set()
    strays = []
    for n in files:
        parts = n.split("/")
        in_images = (len(parts) == 4 and parts[0] == "train" and parts[2] == "images") or \
            (len(parts) == 3 and parts[:2] == ["val", "images"])
        if in_images and not is_image_name(n):
            if not parts[-1].startswith("."):  # hidden files (.DS_Store) go unmentioned
                strays.append(n)
            continue
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
            if parts[1] not in by_class:
                raise DataError(f"{reader.show('train/' + parts[1] + '/')}: class folder not listed in wnids.txt")
            by_class[parts[1]].append(n)
        elif len(parts) == 3 and parts[:2] == ["val", "images"]:
            val_files.add(parts[2])
    if strays:
        log(f"warning: {len(strays)} file(s) in images/ folders that are not images skipped, e.g. "
            f"{reader.show(strays[0])}")
    expected = counts[1] if counts else max(len(v) for v in by_class.values())
    why = f"counts={tuple(counts)}" if counts else "as many as the largest class"
    # Every class one other count: --counts could fit it. Uneven classes: no option does.
    uneven = len({len(v) for v in by_class.values()}) > 1
    for w, images in by_class.items():
        if len(images) != expected or not images:
            error = SettingsMismatch if counts and images and not uneven else DataError
            raise error(f"{reader.show(f'train/{w}/images/')}: {len(images)} images, "
                        f"expected {expected} per class ({why}){SUBSET if error is SettingsMismatch else ''}")
    ann = "val/val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    labels: dict[str, int] = {}
    for lineno, line in enumerate(_text(reader, ann).splitlines(), 1):
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip():
            continue
        if len(fields) < 2:
            raise DataError(f"{reader.show(ann)}: line {lineno} is not 'file<TAB>wnid<TAB>box'")
        file, wnid = fields[:2]
        if wnid not in index:
            raise DataError(f"{reader.show(ann)}: line {lineno} labels {file} {wnid}, which is not in wnids.txt")
        if file not in val_files:
            raise DataError(f"{reader.show(ann)}: line {lineno} names {file}, which is missing from val/images/")
        if file in labels:
            raise DataError(f"{reader.show(ann)}: line {lineno} labels {file} a second time")
        labels[file] = index[wnid]
    if len(labels) < len(val_files):
        log(f"warning: {len(val_files) - len(labels)} images in val/images/ have no row in {ann}: skipped")
    val = sorted(labels, key=_natural)
    val_y = np.array([labels[f] for f in val], dtype=np.int64)
    per_class = np.bincount(val_y, minlength=len(wnids))
    for c, k in enumerate(per_class):
        if (counts and k != counts[2]) or k == 0:
            error = SettingsMismatch if k else DataError  # some val images: --counts any takes them
            raise error(f"{reader.show(ann)}: class {wnids[c]} has {k} val images, expected "
                        f"{counts[2] if counts else 'at least 1'}{SUBSET if error is SettingsMismatch else ''}")
    train = [n for w in wnids for n in sorted(by_class[w], key=_natural)]
    return _Plan(wnids, [words.get(w) or w for w in wnids], train,
                 np.repeat(np.arange(len(wnids), dtype=np.int64), expected),
                 [f"val/images/{f}" for f in val], val_y,
                 {"train": "classes in wnids.txt order; within a class, file names in natural order",
                  "val": "val/images/ file names in natural (numeric) order: val index i is "
                         "val_i.JPEG (val_0 ... val_9999); labels only from val/val_annotations.txt"})


def is_image_name(name: str) -> bool:
    """An image by its name, as both image-folder training data and `predict`'s folders take
    them: an extension of a format PIL can open (not one it only writes, as PDF), and no
    hidden file or folder on the way."""
    parts = name.split("/")
    return not any(p.startswith(".") for p in parts) and os.path.splitext(parts[-1])[1].lower() in _readable()


@functools.cache
def _readable() -> frozenset[str]:
    # Formats PIL registers an extension for but only writes; every other one it opens
    # (MPO, say, through JPEG's opener, though it has no opener of its own).
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt not in ("PDF", "PALM"))


def image_files(paths) -> list[Path]:
    """The files `predict` reads: files as given; folders walked recursively for image files
    (`is_image_name`; links to folders followed, except one that would loop), in natural order of their paths within
    the folder. A missing file or an unreadable folder is an error now, before any work."""
    files: list[Path] = []
    for path in map(Path, paths):
        try:
            is_dir, exists = path.is_dir(), path.exists()
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
        if not is_dir:
            if not exists:
                raise UserError(f"{path}: image file not found")
            files.append(path)
            continue
        found = []

        def unreadable(e: OSError) -> None:
            raise UserError(f"{e.filename}: cannot read this folder ({e.strerror or e}); "
                            f"predict reads every folder under {path}")

        for root, dirs, names in walk(path, onerror=unreadable):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(root).relative_to(path).as_posix()
            # regular files (or links to them): not a FIFO, which would block the read, nor a dangling link
            found += [(Path(root) / n, n if rel == "." else f"{rel}/{n}") for n in names
                      if os.path.isfile(os.path.join(root, n))]
        found = [(f, rel) for f, rel in found if is_image_name(rel)]
        if not found:
            raise UserError(f"{path}: a folder with no image files in it or its subfolders; "
                            f"expected JPEG, PNG or another format PIL reads")
        files += [f for f, rel in sorted(found, key=lambda item: _natural(item[1]))]
    return files


def _plan_folder(reader: _Reader, log: Log = lambda *a: None) -> _Plan:
    """root/train/<class>/**, root/val/<class>/**: classes are the sorted train folder names.
    What is left out (files that are not images, images outside a class folder, a train
    folder without images) and classes without val images are said, not passed over."""
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    skipped: list[str] = []
    folders: set[str] = set()
    for n in reader.names():
        parts = n.split("/")
        if parts[0] not in splits or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # outside the splits, or the hidden files of file managers
        if len(parts) >= 3 and parts[0] == "train":
            folders.add(parts[1])
        if len(parts) >= 3 and is_image_name(n):
            splits[parts[0]].setdefault(parts[1], []).append(n)
        else:
            skipped.append(n)
    classes = sorted(splits["train"])
    if not classes:
        raise DataError(f"{reader.show('train/')}: no images in train/<class>/ folders; expected an "
                        f"image folder (train/<class>/*, val/<class>/*) or {TINY}")
    if len(classes) < 2:
        raise DataError(f"{reader.show('train/')}: one class folder ({classes[0]}); a classifier needs at "
                        f"least 2, each a folder of images in train/")
    if skipped:
        log(f"warning: left out {len(skipped)} file(s) that are not images in a train/<class>/ or val/<class>/ "
            f"folder, e.g. {reader.show(skipped[0])}")
    if empty := sorted(folders - set(classes)):
        log(f"warning: train/ folder(s) without images, not classes: {', '.join(empty[:5])}"
            f"{f' and {len(empty) - 5} more' if len(empty) > 5 else ''}")
    if no_val := [c for c in classes if c not in splits["val"]]:
        log(f"warning: {len(no_val)} class(es) without val images, so without a val accuracy: "
            f"{', '.join(no_val[:5])}{f' and {len(no_val) - 5} more' if len(no_val) > 5 else ''}")
    if unknown := sorted(set(splits["val"]) - set(classes)):
        raise DataError(f"{reader.show('val/' + unknown[0] + '/')}: class folder missing from train/; "
                        f"every val class must be a train class")
    if not splits["val"]:
        raise DataError(f"{reader.show('val/')}: no images in val/<class>/ folders; expected the val split there")
    order = "class folders in sorted order; within a class, file names in natural order"
    lists = {}
    for split, by_class in splits.items():
        pairs = [(n, c) for c, w in enumerate(classes) for n in sorted(by_class.get(w, []), key=_natural)]
        lists[split] = ([n for n, _ in pairs], np.array([c for _, c in pairs], dtype=np.int64))
    return _Plan(classes, classes, *lists["train"], *lists["val"], {"train": order, "val": order})


def _decode(reader: _Reader, name: str, size: int, strict: bool) -> tuple[np.ndarray | None, str | None]:
    """(size, size, 3) uint8 RGB, or an error message. strict: the image must already be
    size x size (TinyImageNet); otherwise as `_fit`: shorter side to `size`, centre crop."""
    try:
        with Image.open(io.BytesIO(reader.read(name))) as im:
            if strict and im.size != (size, size):
                return None, (f"{reader.show(name)}: image is {im.size[0]}x{im.size[1]}, expected "
                              f"{size}x{size} like every TinyImageNet-200 image")
            return np.asarray(_rgb(im) if strict else _fit(im, size)), None
    except UnidentifiedImageError:
        return None, f"{reader.show(name)}: not in an image format PIL can read; expected an image file"
    except Exception as e:  # noqa: BLE001 - any failure to read or decode is this file's problem
        detail = " ".join(f"{e.__class__.__name__}: {e}".split())
        return None, f"{reader.show(name)}: cannot decode the image ({detail}); expected a readable image"


def load_image_file(path: Path, size: int) -> np.ndarray:
    """One image file -> a writable (size, size, 3) uint8 RGB array, exactly as `prepare`
    stores an image-folder image (so predictions see what training saw)."""
    try:
        with Image.open(path) as im:
            # A copy: np.asarray of a PIL image is read-only, and torch.from_numpy warns on that.
            return np.array(_fit(im, size), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except DataError as e:  # readable, but not as pixels we can take
        raise UserError(f"{path}: {e}") from None
    except Image.DecompressionBombError as e:  # an image, refused for its size
        raise UserError(f"{path}: {e} (PIL's limit against decompression bombs: Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:  # noqa: BLE001 - any failure to read or decode is this file's problem
        raise UserError(f"{path}: not an image PIL can read ({e.__class__.__name__}); "
                        f"expected JPEG, PNG or similar") from None


def _fit(im: Image.Image, size: int) -> Image.Image:
    """An image of any size and orientation -> size x size RGB: EXIF orientation applied,
    shorter side to `size`, centre crop."""
    return _resize_crop(_rgb(ImageOps.exif_transpose(im)), size)


def _rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I"):
        # 16-bit greyscale (PNG, TIFF): PIL's convert clips at 255, which turns it white; scale
        # its 0..65535 down to 0..255 instead.
        a = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        raise DataError("32-bit float pixels, which have no fixed range; expected 8 or 16 bits a channel")
    # Palette images may carry transparency: through RGBA, which RGB then drops.
    return (im.convert("RGBA") if im.mode == "P" else im).convert("RGB")


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear; PIL antialiases when shrinking), centre crop."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2  # floor: an odd margin's extra pixel goes right/bottom
    return im.crop((left, top, left + size, top + size))
