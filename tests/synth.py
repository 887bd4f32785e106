"""Small synthetic data sets in the layouts `alexnet.data.prepare` reads.

The images are learnable: each class has its own mean colour and stripe orientation, plus
noise, so a small CNN trained for a few epochs is far above chance. Everything is
deterministic for a given seed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

TINY = "tiny-imagenet-200"


def wnid(c: int) -> str:
    return f"n{90000000 + c:08d}"


def class_image(c: int, classes: int, rng: np.random.Generator, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """(h, w, 3) uint8 of class c: a class colour, stripes at a class angle, noise."""
    w, h = size
    hue = 2 * np.pi * c / classes
    colour = 128 + 90 * np.array([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)])
    angle = np.pi * c / classes
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / 8 + phase)
    img = colour[None, None, :] + 40 * stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, path: Path, grey: bool = False, fmt: str = "JPEG") -> None:
    im = Image.fromarray(arr)
    if grey:
        im = im.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def make_tiny_imagenet(root: Path, classes: int = 4, train_per_class: int = 12, val_per_class: int = 4,
                       size: int = 64, seed: int = 0, greyscale: int = 1) -> Path:
    """Write root/tiny-imagenet-200 in the official layout and return that folder.

    The first `greyscale` train images of every class are saved as mode L. The last class
    has no entry in words.txt (its name falls back to its wnid). val_k.JPEG labels are
    shuffled over the classes and val_annotations.txt rows are in a shuffled order.
    """
    rng = np.random.default_rng(seed)
    top = Path(root) / TINY
    wnids = [wnid(c) for c in range(classes)]
    top.mkdir(parents=True, exist_ok=True)
    (top / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    words = [f"{wnid(c)}\tsynthetic class {c}, stripes {c}" for c in range(classes - 1)]
    words += ["n01000001\tunrelated entity", "n01000002\tanother, unrelated"]
    (top / "words.txt").write_text("\n".join(words) + "\n")
    for c, w in enumerate(wnids):
        folder = top / "train" / w
        boxes = []
        for k in range(train_per_class):
            _save(class_image(c, classes, rng, (size, size)), folder / "images" / f"{w}_{k}.JPEG",
                  grey=k < greyscale)
            boxes.append(f"{w}_{k}.JPEG\t0\t0\t{size - 1}\t{size - 1}")
        (folder / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    labels = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    rows = []
    for k, c in enumerate(labels):
        _save(class_image(int(c), classes, rng, (size, size)), top / "val" / "images" / f"val_{k}.JPEG")
        rows.append(f"val_{k}.JPEG\t{wnids[c]}\t1\t2\t{size - 2}\t{size - 3}")
    order = rng.permutation(len(rows))
    (top / "val" / "val_annotations.txt").write_text("".join(rows[i] + "\n" for i in order))
    return top


def val_labels(top: Path) -> dict[str, str]:
    """file name -> wnid, read from val_annotations.txt (the only source of val labels)."""
    rows = (Path(top) / "val" / "val_annotations.txt").read_text().splitlines()
    return {r.split("\t")[0]: r.split("\t")[1] for r in rows if r.strip()}


def make_zip(folder: Path, zip_path: Path, top: str | None = None) -> Path:
    """Zip `folder` under the top folder `top` (default: the folder's name; '' = no top
    folder), with directory entries as the official archive has them."""
    folder, zip_path = Path(folder), Path(zip_path)
    top = folder.name if top is None else top
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            arcname = "/".join(p for p in (top, path.relative_to(folder).as_posix()) if p)
            if path.is_dir():
                z.writestr(arcname + "/", "")
            else:
                z.write(path, arcname)
    return zip_path


def make_image_folder(root: Path, classes: int = 3, per_class: int = 5,
                      sizes: list[tuple[int, int]] | None = None, val_per_class: int = 2,
                      seed: int = 0) -> Path:
    """root/train/<class>/*, root/val/<class>/* with PNG and JPEG images of mixed (w, h)
    sizes; class names 'class_a', 'class_b', ...; train/class_a/img1.png is a palette
    (mode P) image. Returns root."""
    sizes = sizes or [(80, 60), (50, 70)]
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            for k in range(n):
                arr = class_image(c, classes, rng, sizes[(c + k) % len(sizes)])
                fmt, ext = ("PNG", "png") if k % 2 else ("JPEG", "jpg")
                path = root / split / f"class_{chr(97 + c)}" / f"img{k}.{ext}"
                if split == "train" and c == 0 and k == 1:  # a palette PNG
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).convert("P").save(path)
                else:
                    _save(arr, path, fmt=fmt)
    return root
