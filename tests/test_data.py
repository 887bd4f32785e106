"""The data layer: cache contents, idempotence, sources, statistics, and a clear one-line
error for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import alexnet.data as data
from alexnet.cli import main
from alexnet.data import default_data_dir, default_source, ensure_cache, open_cache, prepare
from alexnet.download import OFFICIAL_URL
from alexnet.errors import DataError, UserError
from tests.conftest import TINY_COUNTS, quiet
from tests.procs import kill_leaves_no_children
from tests.synth import class_image, make_image_folder, make_zip, val_labels, wnid

FILES = ("train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy", "classes.json", "manifest.json")


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {f: (os.stat(d / f).st_ino, os.stat(d / f).st_mtime_ns) for f in FILES}


def test_cache_contents(tiny_cache: Path, tiny_layout: Path) -> None:
    cache = open_cache(tiny_cache)
    c, n_train, n_val = TINY_COUNTS
    assert cache.train.x.shape == (c * n_train, 64, 64, 3) and cache.train.x.dtype == np.uint8
    assert cache.val.x.shape == (c * n_val, 64, 64, 3) and cache.val.x.dtype == np.uint8
    assert cache.train.y.dtype == np.int64 and cache.val.y.dtype == np.int64
    assert isinstance(cache.train.x, np.memmap)  # mapped, not copied
    assert cache.num_classes == c and cache.img_size == 64
    assert cache.wnids == [wnid(k) for k in range(c)]
    assert cache.names[0] == "synthetic class 0, stripes 0" and cache.names[-1] == wnid(c - 1)  # no words.txt entry
    assert cache.train.y.tolist() == [k for k in range(c) for _ in range(n_train)]
    # Val: index k is val_k.JPEG (numeric order, though the annotation rows are shuffled),
    # labelled from val_annotations.txt.
    labels = val_labels(tiny_layout)
    assert cache.val.y.tolist() == [cache.wnids.index(labels[f"val_{k}.JPEG"]) for k in range(c * n_val)]
    for k in (0, 2, 10, 15):
        expected = np.asarray(Image.open(tiny_layout / "val" / "images" / f"val_{k}.JPEG").convert("RGB"))
        np.testing.assert_array_equal(cache.val.x[k], expected)
    # Train image 1 of class 1 is <wnid>_1.JPEG; image 0 of every class was saved greyscale.
    expected = np.asarray(Image.open(tiny_layout / "train" / wnid(1) / "images" / f"{wnid(1)}_1.JPEG"))
    np.testing.assert_array_equal(cache.train.x[n_train + 1], expected)
    for k in range(c):
        grey = cache.train.x[k * n_train]
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        assert not (cache.train.x[k * n_train + 1, ..., 0] == cache.train.x[k * n_train + 1, ..., 1]).all()
    assert "val_0" in cache.manifest["order"]["val"]
    assert cache.manifest["counts"] == {"classes": 4, "train": 48, "val": 16, "train_per_class": 12, "val_per_class": 4}


def test_stats(tiny_cache: Path) -> None:
    cache = open_cache(tiny_cache)
    s = cache.stats
    mean, std = np.array(s["mean"]), np.array(s["std"])
    eigval, eigvec = np.array(s["eigval"]), np.array(s["eigvec"])
    assert mean.shape == std.shape == eigval.shape == (3,) and eigvec.shape == (3, 3)
    assert ((0 < mean) & (mean < 1)).all() and ((0 < std) & (std < 0.5)).all()
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
    assert (np.diff(eigval) <= 0).all() and eigval[-1] >= 0
    # Few images: the stats subset is the whole train split, so they are exact.
    px = cache.train.x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, px.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, px.std(0), rtol=1e-9)
    np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T, np.cov(px.T, bias=True), atol=1e-9)


def test_idempotent_then_force(tiny_zip: Path, tiny_cache: Path, tmp_path: Path) -> None:
    d = prepare(tiny_zip, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)
    before = snapshot(d)
    logs: list[str] = []
    prepare(tiny_zip, d, counts=TINY_COUNTS, workers=1, log=logs.append)
    assert any("cache up to date" in m for m in logs) and not any("decoding" in m for m in logs)
    assert snapshot(d) == before
    prepare(tiny_zip, d, counts=None, workers=1, log=quiet)  # None accepts any counts: no work
    assert snapshot(d) == before
    logs.clear()
    prepare(tiny_zip, d, counts=TINY_COUNTS, workers=1, force=True, log=logs.append)
    assert any("decoding" in m for m in logs)
    after = snapshot(d)
    assert all(after[f][0] != before[f][0] for f in FILES)  # every file rewritten
    assert not list(d.glob("*.tmp"))
    np.testing.assert_array_equal(open_cache(d, verify="full").train.x, open_cache(tiny_cache).train.x)


def test_other_sources_same_cache(tiny_layout: Path, tiny_cache: Path, tmp_path: Path) -> None:
    """The extracted folder (decoded by 2 worker processes) and a zip without the top folder
    give the same cache, statistics included."""
    ref = open_cache(tiny_cache)
    folder = open_cache(prepare(tiny_layout, tmp_path / "f", counts=TINY_COUNTS, workers=2, log=quiet))
    flat = make_zip(tiny_layout, tmp_path / "flat.zip", top="")
    rootzip = open_cache(prepare(flat, tmp_path / "z", counts=TINY_COUNTS, workers=1, log=quiet))
    for other in (folder, rootzip):
        for split in ("train", "val"):
            np.testing.assert_array_equal(getattr(other, split).x, getattr(ref, split).x)
            np.testing.assert_array_equal(getattr(other, split).y, getattr(ref, split).y)
        assert other.stats == ref.stats and other.wnids == ref.wnids


def test_a_cache_inside_its_source_folder_is_built_once(tiny_layout: Path, tmp_path: Path) -> None:
    """The cache's own files are not part of the source: before, every build changed the
    source folder's totals, so each start rebuilt it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_layout, src)
    images = make_image_folder(tmp_path / "images", classes=3, per_class=5)
    for source, cache, kw in ((src, src / "cache", {"counts": TINY_COUNTS}), (images, images / "cache", {"img_size": 32})):
        d = prepare(source, cache, workers=1, log=quiet, **kw)
        before = snapshot(d)
        logs: list[str] = []
        prepare(source, cache, workers=1, log=logs.append, **kw)
        assert logs == [f"cache up to date: {cache}"] and snapshot(d) == before
        (source / "train" / sorted(p.name for p in (source / "train").iterdir())[0] / "extra.txt").write_text("x")
        logs.clear()  # a change in the source itself still counts
        prepare(source, cache, workers=1, log=logs.append, **kw)
        assert any("source differs" in m for m in logs)
    # Two caches of one image folder (two sizes), and a cache in the source folder itself: each built once.
    for cache, size in ((images / "c32", 32), (images / "c48", 48), (images, 32)):
        prepare(images, cache, img_size=size, workers=1, log=quiet)
    for cache, size in ((images / "c32", 32), (images / "c48", 48), (images, 32)):
        logs = []
        prepare(images, cache, img_size=size, workers=1, log=logs.append)
        assert logs == [f"cache up to date: {cache}"]


def test_image_folder_source(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=5)
    cache = open_cache(prepare(root, tmp_path / "c", img_size=32, workers=1, log=quiet))
    assert cache.train.x.shape == (15, 32, 32, 3) and cache.val.x.shape == (6, 32, 32, 3)
    assert cache.wnids == cache.names == ["class_a", "class_b", "class_c"]
    assert cache.train.y.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and cache.val.y.tolist() == [0, 0, 1, 1, 2, 2]
    # Shorter side to 32, then the centre 32x32 (train/class_a/img0.jpg is 80x60).
    im = Image.open(root / "train" / "class_a" / "img0.jpg").convert("RGB").resize((43, 32), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(cache.train.x[0], np.asarray(im.crop((5, 0, 37, 32))))
    png = sorted((root / "train" / "class_a").iterdir())[1]  # the palette PNG, as PIL converts it to RGB
    assert Image.open(png).mode == "P"
    w, h = Image.open(png).size
    side = (round(w * 32 / min(w, h)), round(h * 32 / min(w, h)))
    rgb = Image.open(png).convert("RGB").resize(side, Image.Resampling.BILINEAR)
    left, top = (side[0] - 32) // 2, (side[1] - 32) // 2
    np.testing.assert_array_equal(cache.train.x[1], np.asarray(rgb.crop((left, top, left + 32, top + 32))))
    logs: list[str] = []
    prepare(root, tmp_path / "c", img_size=32, workers=1, log=logs.append)  # counts do not apply
    assert any("cache up to date" in m for m in logs)
    flat = make_zip(root, tmp_path / "images.zip", top="")  # the same layout, zipped
    np.testing.assert_array_equal(open_cache(prepare(flat, tmp_path / "z", img_size=32, workers=1, log=quiet)).val.x,
                                  cache.val.x)


def test_a_prepare_that_waits_for_another_says_so(tiny_zip: Path, tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(2)\n", str(d / ".prepare.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        logs: list[str] = []
        open_cache(prepare(tiny_zip, d, counts=TINY_COUNTS, workers=1, log=logs.append))
    finally:
        holder.kill()
        holder.wait()
    assert logs[0] == f"waiting for another process preparing the cache in {d} to finish"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_decoding_workers_end_with_a_prepare_that_is_killed(tiny_zip: Path, tmp_path: Path) -> None:
    """SIGKILL (the out-of-memory killer, a scheduler's hard limit) gives prepare no chance to
    stop its workers; they must not stay behind, blocked for ever, holding memory."""
    kill_leaves_no_children(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "c"), "--counts",
                             ",".join(map(str, TINY_COUNTS)), "--workers", "2"], 2)


def test_what_a_killed_prepare_left_is_removed_by_the_next(tiny_cache: Path, tmp_path: Path) -> None:
    # Decoding arrays reserve the whole cache's size again; a cache then found up to date kept them.
    d = shutil.copytree(tiny_cache, tmp_path / "c")
    source = open_cache(d).manifest["source"]["path"]
    (d / "train_x.npy.tmp").write_bytes(b"\0" * 1000)
    (d / "downloads").mkdir()
    (d / "downloads" / "tiny-imagenet-200.zip.part").write_bytes(b"half")
    logs: list[str] = []
    prepare(source, d, counts=TINY_COUNTS, workers=1, log=logs.append)
    assert logs == [f"cache up to date: {d}"]
    assert not (d / "train_x.npy.tmp").exists() and not list((d / "downloads").iterdir())


def test_a_prepare_stopped_by_sigterm_cleans_up_as_for_ctrl_c(tiny_zip: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    real = data._decode_all

    def decode(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's, while the arrays are being written
        return real(*a, **k)

    monkeypatch.setattr(data, "_decode_all", decode)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "c"), "--counts",
              ",".join(map(str, TINY_COUNTS)), "--workers", "1"])
    assert e.value.code == 128 + signal.SIGTERM
    assert not list((tmp_path / "c").glob("*.tmp")) and signal.getsignal(signal.SIGTERM) == before


def test_a_second_sigterm_during_prepares_clean_up_ends_it_at_once(tiny_zip: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The clean-up waits for the decoding pool; a second signal there used to be caught again
    # and hang the pool's shutdown. During the clean-up the signals have their default action.
    import signal

    during: list = []

    def decode(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)))

    monkeypatch.setattr(data, "_decode_all", decode)
    with pytest.raises(SystemExit):
        main(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "c"), "--counts",
              ",".join(map(str, TINY_COUNTS)), "--workers", "1"])
    assert during == [(signal.SIG_DFL, signal.SIG_DFL)]
    # Under nohup (SIGHUP ignored) it stays ignored, during the clean-up and after.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit):
            main(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "c2"), "--counts",
                  ",".join(map(str, TINY_COUNTS)), "--workers", "1"])
        assert during[1] == (signal.SIG_DFL, signal.SIG_IGN) and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_prepare_from_a_thread_other_than_the_main_one(tiny_zip: Path, tmp_path: Path) -> None:
    import threading

    codes: list = []
    t = threading.Thread(target=lambda: codes.append(main(["prepare", "--source", str(tiny_zip), "--data",
                                                           str(tmp_path / "c"), "--counts",
                                                           ",".join(map(str, TINY_COUNTS)), "--workers", "1"])))
    t.start()
    t.join()
    assert codes == [0]


def test_a_folder_cache_of_an_older_version_is_rebuilt_once_and_says_why(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=2)
    d = prepare(root, tmp_path / "c", img_size=32, workers=1, log=quiet)
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["source"]["fingerprint"]["listing"]  # what an older version recorded
    data._write_json(d / "manifest.json", manifest)
    logs: list[str] = []
    prepare(root, d, img_size=32, workers=1, log=logs.append)
    assert any("made by an older version, which did not record its source's file names" in m for m in logs)
    logs.clear()
    prepare(root, d, img_size=32, workers=1, log=logs.append)
    assert logs == [f"cache up to date: {d}"]
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["source"]["fingerprint"] = None  # a damaged manifest: rebuilt, not a TypeError
    data._write_json(d / "manifest.json", manifest)
    logs.clear()
    prepare(root, d, img_size=32, workers=1, log=logs.append)
    assert any("source differs" in m for m in logs)


def test_an_image_moved_to_another_class_folder_rebuilds_the_cache(tmp_path: Path) -> None:
    # The usual way to relabel an image folder: the file count, total size and newest time stay.
    root = make_image_folder(tmp_path / "images", classes=3, per_class=5)
    d = prepare(root, tmp_path / "c", img_size=32, workers=1, log=quiet)
    moved = root / "train" / "class_b" / "moved.jpg"
    os.rename(root / "train" / "class_a" / "img0.jpg", moved)
    logs: list[str] = []
    cache = open_cache(prepare(root, d, img_size=32, workers=1, log=logs.append))
    assert any("source differs" in m for m in logs)
    assert np.bincount(cache.train.y).tolist() == [4, 6, 5]


@pytest.mark.parametrize("trailing_slash", [False, True])
def test_linked_class_folders_are_classes_and_a_link_loop_is_not_followed(tmp_path: Path, trailing_slash: bool) -> None:
    """As in torchvision's ImageFolder, a linked folder is read as if it were there, named by
    the link (inside the source or outside it); a link to a folder on its own path or above
    it, which would loop or read everything above the source, is not followed."""
    root = make_image_folder(tmp_path / "images", classes=3, per_class=2)
    extra = make_image_folder(tmp_path / "elsewhere", classes=4, per_class=3)
    pool = make_image_folder(root / "pool", classes=5, per_class=1)  # inside the source, outside train/ and val/
    for split in ("train", "val"):
        (root / split / "class_d").symlink_to(extra / split / "class_d", target_is_directory=True)
        (root / split / "class_e").symlink_to(pool / split / "class_e", target_is_directory=True)
        (root / split / "aaa").symlink_to(root / split / "class_b", target_is_directory=True)  # a second name
    (root / "train" / "class_a" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "class_a" / "up").symlink_to(tmp_path, target_is_directory=True)  # above the source
    (extra / "train" / "class_d" / "back").symlink_to(root, target_is_directory=True)  # from outside, back in
    source = Path(str(root) + "/") if trailing_slash else root
    cache = open_cache(prepare(source, tmp_path / "c", img_size=32, workers=1, log=quiet))
    assert cache.wnids == ["aaa", "class_a", "class_b", "class_c", "class_d", "class_e"]
    assert np.bincount(cache.train.y).tolist() == [2, 2, 2, 2, 3, 1]  # no loop's images
    # A new image in a linked folder is a change of the source.
    shutil.copy(extra / "train" / "class_d" / "img0.jpg", extra / "train" / "class_d" / "img9.jpg")
    logs: list[str] = []
    prepare(source, tmp_path / "c", img_size=32, workers=1, log=logs.append)
    assert any("source differs" in m for m in logs)


def test_image_folder_says_what_it_leaves_out(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=2)
    (root / "train" / "class_a" / "readme.txt").write_text("not an image")
    (root / "train" / "class_a" / ".DS_Store").write_bytes(b"a file manager's; not worth a word")
    (root / "train" / "class_a" / "._img0.jpg").write_bytes(b"\x00\x05\x16\x07 macOS metadata, not a JPEG")
    Image.new("RGB", (8, 8)).save(root / "train" / "loose.jpg")  # in no class folder
    (root / "train" / "class_z").mkdir()
    (root / "train" / "class_z" / "labels.csv").write_text("a folder without images")
    shutil.rmtree(root / "val" / "class_c")
    logs: list[str] = []
    cache = open_cache(prepare(root, tmp_path / "c", img_size=32, workers=1, log=logs.append))
    assert cache.wnids == ["class_a", "class_b", "class_c"] and cache.val.y.tolist() == [0, 0, 1, 1]
    warnings = [m for m in logs if m.startswith("warning:")]
    left_out = "warning: left out 3 file(s) that are not images in a train/<class>/ or val/<class>/ folder, e.g. "
    example = {str(root / "train" / n) for n in ("class_a/readme.txt", "loose.jpg", "class_z/labels.csv")}
    assert len(warnings) == 3 and warnings[0].startswith(left_out) and warnings[0][len(left_out):] in example
    assert warnings[1:] == ["warning: train/ folder(s) without images, not classes: class_z",
                            "warning: 1 class(es) without val images, so without a val accuracy: class_c"]
    shutil.rmtree(root / "train" / "class_b")
    shutil.rmtree(root / "train" / "class_c")
    with pytest.raises(DataError, match="one class folder \\(class_a\\); a classifier needs at least 2"):
        prepare(root, tmp_path / "c1", img_size=32, workers=1, log=quiet)


def test_cmyk_becomes_rgb(tiny_layout: Path, tmp_path: Path) -> None:
    path = f"train/{wnid(2)}/images/{wnid(2)}_3.JPEG"
    z = mutated_zip(tiny_layout, tmp_path, lambda top: Image.open(top / path).convert("CMYK").save(top / path, quality=95))
    cache = open_cache(prepare(z, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet))
    with zipfile.ZipFile(z) as f:  # what PIL makes of the CMYK file, as RGB
        expected = np.asarray(Image.open(io.BytesIO(f.read(f"tiny-imagenet-200/{path}"))).convert("RGB"))
    np.testing.assert_array_equal(cache.train.x[2 * 12 + 3], expected)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG (PIL mode I;16) keeps its shades: 0..65535 becomes 0..255, where
    PIL's own convert would clip everything above 255 to white. `prepare` and `predict` share
    this decoding."""
    from alexnet.sources import load_image_file

    values = np.linspace(7168, 40192, 64 * 64).reshape(64, 64).astype(np.uint16)
    values[0, :3] = [0, 65535, 257]
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_image_file(path, 64)
    expected = np.rint(values / 257).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)
    assert rgb[0, :3, 0].tolist() == [0, 255, 1] and rgb[0, 3].tolist() == [28] * 3 and rgb[1:].max() == 156  # not 255
    tiff = tmp_path / "float.tiff"  # float pixels have no range to scale from: refused, saying so
    Image.fromarray(values.astype(np.float32)).save(tiff)
    with pytest.raises(UserError, match=f"{tiff}: 32-bit float pixels, which have no fixed range"):
        load_image_file(tiff, 64)


# -- bad input -------------------------------------------------------------------------

def mutated_zip(tiny_layout: Path, tmp_path: Path, mutate: Callable[[Path], object]) -> Path:
    top = tmp_path / "src" / "tiny-imagenet-200"
    shutil.copytree(tiny_layout, top)
    mutate(top)
    return make_zip(top, tmp_path / "bad.zip")


def _rm(rel: str) -> Callable[[Path], None]:
    return lambda top: (top / rel).unlink()


def _write(rel: str, content: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(top: Path) -> None:
        old = (top / rel).read_bytes()
        (top / rel).write_bytes(content(old) if callable(content) else content)
    return mutate


def _resize(rel: str, size: tuple[int, int]) -> Callable[[Path], None]:
    return lambda top: Image.fromarray(class_image(0, 4, np.random.default_rng(0), size)).save(top / rel)


W1 = wnid(1)
IMG = f"train/{W1}/images/{W1}_5.JPEG"
ANN = "val/val_annotations.txt"
BAD_INPUTS = {
    "missing val_annotations": (_rm(ANN), ["tiny-imagenet-200/val/val_annotations.txt: missing from", "bad.zip"]),
    "too few train images": (_rm(IMG), [f"train/{W1}/images/", "11 images, expected 12"]),
    "undecodable jpeg": (_write(IMG, b"this is not a JPEG"), [IMG, "not in an image format"]),
    "truncated jpeg": (_write(IMG, lambda b: b[: len(b) // 2]), [IMG, "cannot decode"]),
    "wrong size": (_resize(IMG, (65, 64)), [IMG, "65x64", "expected 64x64"]),
    "missing wnids.txt": (_rm("wnids.txt"), ["tiny-imagenet-200/wnids.txt: missing from", "bad.zip"]),
    "too few classes": (_write("wnids.txt", lambda b: b"\n".join(b.split(b"\n")[1:])),
                        ["wnids.txt", "3 class ids", "prepare --counts any"]),
    "unknown wnid in val": (_write(ANN, lambda b: b.replace(W1.encode(), b"n12345678", 1)), [ANN, "n12345678", "not in wnids.txt"]),
    "missing val file": (_rm("val/images/val_7.JPEG"), [ANN, "val_7.JPEG", "missing from val/images"]),
    "val count": (_write(ANN, lambda b: b.replace(wnid(0).encode(), W1.encode(), 1)),
                  [ANN, "val images, expected 4", "prepare --counts any"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case: str, tiny_layout: Path, tmp_path: Path) -> None:
    mutate, needles = BAD_INPUTS[case]
    z = mutated_zip(tiny_layout, tmp_path, mutate)
    with pytest.raises(DataError) as e:
        prepare(z, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)
    message = str(e.value)
    assert "\n" not in message and e.value.__cause__ is None
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "c").exists()  # the folder it made is gone: a later --data names a missing one


def test_extracted_folder_without_wnids(tiny_layout: Path, tmp_path: Path) -> None:
    top = tmp_path / "tiny-imagenet-200"
    shutil.copytree(next(tiny_layout.glob("**/wnids.txt")).parent, top)
    (top / "wnids.txt").unlink()
    with pytest.raises(DataError) as e:
        prepare(top, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)
    assert str(e.value).startswith(f"{top / 'wnids.txt'}: missing; a TinyImageNet-200 folder has wnids.txt")


def test_bad_image_in_worker_process(tiny_layout: Path, tmp_path: Path) -> None:
    z = mutated_zip(tiny_layout, tmp_path, _write(IMG, b"garbage"))
    with pytest.raises(DataError, match=f"{IMG}.*not in an image format"):
        prepare(z, tmp_path / "c", counts=TINY_COUNTS, workers=2, log=quiet)


@pytest.mark.parametrize("content", ["truncated", "text"])
def test_not_a_zip(content: str, tiny_zip: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.zip"
    raw = tiny_zip.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if content == "truncated" else b"hello")
    with pytest.raises(DataError, match=r"broken\.zip: not a readable zip archive .*truncated"):
        prepare(bad, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)
    assert not (tmp_path / "c").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before the prepare stays
    with pytest.raises(DataError):
        prepare(bad, tmp_path / "mine", counts=TINY_COUNTS, workers=1, log=quiet)
    assert (tmp_path / "mine").is_dir()


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.zip: no such file or folder"):
        prepare(tmp_path / "nope.zip", tmp_path / "c", log=quiet)


@pytest.mark.parametrize("size", [0, -5])
def test_img_size_must_be_positive(size: int, tiny_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^--img-size must be a positive number of pixels, got {size}$"):
        prepare(tiny_zip, tmp_path / "c", counts=TINY_COUNTS, img_size=size, workers=1, log=quiet)
    assert not (tmp_path / "c").exists()


def test_tinyimagenet_keeps_its_64_pixels(tiny_zip: Path, tiny_cache: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--img-size resizes image folders; TinyImageNet-200 is refused at another size before
    anything is decoded (the old message blamed the first image), an existing cache kept."""
    monkeypatch.setattr(data, "_decode_all", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DataError) as e:
        prepare(tiny_zip, tmp_path / "c", counts=TINY_COUNTS, img_size=32, workers=1, log=quiet)
    assert str(e.value).startswith(f"--img-size 32: {tiny_zip} is TinyImageNet-200, whose images are all 64x64")
    assert not (tmp_path / "c").exists()
    d = tmp_path / "kept"
    shutil.copytree(tiny_cache, d)
    before = snapshot(d)
    with pytest.raises(DataError, match="^--img-size 48: "):
        prepare(tiny_zip, d, counts=TINY_COUNTS, img_size=48, workers=1, log=quiet)
    assert snapshot(d) == before
    # The official archive: refused before the download, which could only end in this error.
    monkeypatch.setattr(data, "download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(DataError, match=f"^--img-size 32: {OFFICIAL_URL} is TinyImageNet-200"):
        prepare(OFFICIAL_URL, tmp_path / "o", img_size=32, log=quiet)


def test_failed_rebuild_keeps_old_cache(tiny_cache: Path, tiny_layout: Path, tmp_path: Path) -> None:
    d = tmp_path / "c"
    shutil.copytree(tiny_cache, d)
    before = snapshot(d)
    z = mutated_zip(tiny_layout, tmp_path, _write(IMG, b"garbage"))
    with pytest.raises(DataError):
        prepare(z, d, counts=TINY_COUNTS, workers=1, log=quiet)
    assert snapshot(d) == before and not list(d.glob("*.tmp"))
    open_cache(d, verify="full")


def test_prepare_runs_without_torch(tiny_zip: Path, tmp_path: Path) -> None:
    """`alexnet prepare` needs numpy and PIL only: importing torch made a prepare that had
    nothing to do take 3.1 s and 0.65 GB resident, against 0.36 s and 41 MB without."""
    code = ("import sys; from alexnet.cli import main; "
            f"rc = main(['prepare', '--source', {str(tiny_zip)!r}, '--data', {str(tmp_path / 'c')!r}, "
            "'--counts', 'any', '--workers', '2']); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split()[-2:] == ["0", "False"] and (tmp_path / "c" / "manifest.json").is_file()


# -- open_cache --------------------------------------------------------------------------

def test_open_cache_fast_path(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_hash_file", lambda p: pytest.fail(f"fast path hashed {p}"))
    open_cache(tiny_cache)


def test_copied_cache_is_rehashed_once(tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "copy"
    shutil.copytree(tiny_cache, d, copy_function=shutil.copyfile)  # new mtimes, same bytes
    os.utime(d / "val_x.npy", ns=(1, 1))  # certain to differ, whatever the clock's resolution
    open_cache(d)
    recorded = json.loads((d / "manifest.json").read_text())["files"]["val_x.npy"]["mtime_ns"]
    assert recorded == 1  # rewritten for the copy
    monkeypatch.setattr(data, "_hash_file", lambda p: pytest.fail(f"hashed {p} again"))
    open_cache(d)


def test_altered_cache_detected(tiny_cache: Path, tiny_zip: Path, tmp_path: Path) -> None:
    d = tmp_path / "c"
    shutil.copytree(tiny_cache, d)  # copy2: same mtimes, so the fast path trusts the copy
    target = d / "val_x.npy"
    st = target.stat()
    with open(target, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        tail = f.read()
        f.seek(-16, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in tail))
    # An edit keeping the old mtime (coarse clocks) passes the fast check; full catches it.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError) as e:
        open_cache(d, verify="full")
    # The rebuild names the recorded source and counts: without them prepare would download
    # the official archive instead.
    counts = ",".join(map(str, TINY_COUNTS))
    hint = f"alexnet prepare --source {tiny_zip.resolve()} --counts {counts} --data {d} --force"
    assert str(e.value) == (f"{target}: checksum does not match manifest.json (cache changed or "
                            f"corrupted); run `{hint}`")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the usual case: new mtime
    with pytest.raises(DataError, match="val_x.npy: checksum does not match"):
        open_cache(d)
    with open(target, "ab") as f:  # and a size change is caught without any checksum
        f.write(b"x")
    with pytest.raises(DataError, match="val_x.npy: .* bytes, manifest.json says"):
        open_cache(d)
    assert main(shlex.split(hint)[1:]) == 0  # the hint, as printed, repairs the cache
    open_cache(d, verify="full")


def test_rebuild_hint_of_a_subset_with_uneven_classes(tiny_layout: Path, tmp_path: Path) -> None:
    """A subset prepared with --counts any whose classes hold different numbers of val images:
    the printed rebuild says --counts any (the counts are per class, no three numbers fit)."""
    top = shutil.copytree(tiny_layout, tmp_path / "src" / "tiny-imagenet-200")
    ann = top / "val" / "val_annotations.txt"
    rows = ann.read_text().splitlines(keepends=True)
    ann.write_text("".join(rows[1:]))  # one class one val image short
    d = tmp_path / "c"
    assert main(["prepare", "--source", str(top), "--counts", "any", "--data", str(d)]) == 0
    (d / "val_y.npy").write_bytes(b"broken")
    with pytest.raises(DataError) as e:
        open_cache(d)
    hint = re.search(r"run `(.*)`", str(e.value)).group(1)
    assert hint == f"alexnet prepare --source {top.resolve()} --counts any --data {d} --force"
    assert main(shlex.split(hint)[1:]) == 0
    open_cache(d, verify="full")


def test_missing_or_broken_cache(tmp_path: Path, tiny_cache: Path) -> None:
    with pytest.raises(DataError, match=r"no prepared data cache.*alexnet prepare --data"):
        open_cache(tmp_path / "nothing")
    d = tmp_path / "c"
    shutil.copytree(tiny_cache, d)
    (d / "train_y.npy").unlink()
    with pytest.raises(DataError, match="train_y.npy: missing"):
        open_cache(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest.json: unreadable.*--force"):
        open_cache(d)


def test_ensure_cache_and_env(tiny_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALEXNET_DATA", raising=False)
    monkeypatch.delenv("ALEXNET_SOURCE", raising=False)
    assert default_data_dir() == Path("data") and default_source() == OFFICIAL_URL
    monkeypatch.setenv("ALEXNET_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("ALEXNET_SOURCE", str(tiny_zip))
    logs: list[str] = []
    cache = ensure_cache(None, log=logs.append, counts=TINY_COUNTS)
    assert cache.root == tmp_path / "env" and cache.num_classes == 4
    assert logs[0] == f"no cache in {tmp_path / 'env'}: preparing it from {tiny_zip} first"
    logs.clear()
    ensure_cache(None, log=logs.append)
    assert logs == []


@pytest.mark.realdata
@pytest.mark.slow
def test_real_archive(real_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = prepare(real_zip, tmp_path / "real", workers=2, log=quiet)
    monkeypatch.setattr(data, "_hash_file", lambda p: pytest.fail(f"a fresh cache was hashed again: {p}"))
    cache = open_cache(d)
    monkeypatch.undo()
    assert cache.train.x.shape == (100_000, 64, 64, 3) and cache.val.x.shape == (10_000, 64, 64, 3)
    assert cache.num_classes == 200
    assert (np.bincount(cache.train.y, minlength=200) == 500).all()
    assert (np.bincount(cache.val.y, minlength=200) == 50).all()
    assert cache.wnids[cache.val.y[0]] == "n03444034"  # val_0.JPEG
    assert 0.3 < min(cache.stats["mean"]) < max(cache.stats["mean"]) < 0.6


def test_a_class_folder_that_cannot_be_listed_is_an_error_not_a_class_left_out(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_image_folder(tmp_path / "src", classes=3, per_class=2, val_per_class=1)
    real = os.scandir

    def scandir(path=".", *a):  # as a folder of another user without read permission
        if str(path).endswith("class_c"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"class_c: cannot list it \(Permission denied\)$"):
        prepare(src, tmp_path / "c", counts=None, workers=1, log=quiet)
    # outside train/ and val/ (lost+found at a mount's root): not data, not read
    shutil.rmtree(src / "train" / "class_c")
    shutil.rmtree(src / "val" / "class_c")
    (src / "private" / "class_c").mkdir(parents=True)
    prepare(src, tmp_path / "c", counts=None, workers=1, log=quiet)


def test_files_in_images_folders_that_are_not_images_are_skipped(tiny_layout: Path, tiny_cache: Path,
                                                                 tmp_path: Path) -> None:
    """.DS_Store or Thumbs.db beside the images counted as images (the error named another
    class, or the file as an unreadable image); hidden ones go unmentioned, others are named."""
    top = shutil.copytree(tiny_layout, tmp_path / "src" / "tiny-imagenet-200")
    first, second = sorted((top / "train").iterdir())[:2]
    (first / "images" / ".DS_Store").write_bytes(b"finder")
    (second / "images" / "Thumbs.db").write_bytes(b"windows")
    (top / "val" / "images" / "desktop.ini").write_bytes(b"windows")
    logs: list[str] = []
    d = prepare(top, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=logs.append)
    warned = [m for m in logs if m.startswith("warning: 2 file(s) in images/ folders that are not images skipped")]
    assert len(warned) == 1 and ".DS_Store" not in warned[0]
    np.testing.assert_array_equal(open_cache(d).train.x, open_cache(tiny_cache).train.x)


def test_a_byte_order_mark_in_wnids_txt_is_not_a_class_id(tiny_layout: Path, tmp_path: Path) -> None:
    top = shutil.copytree(tiny_layout, tmp_path / "src" / "tiny-imagenet-200")
    (top / "wnids.txt").write_bytes(b"\xef\xbb\xbf" + (top / "wnids.txt").read_bytes())
    prepare(top, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)


def test_a_broken_link_in_the_source_is_named(tiny_layout: Path, tmp_path: Path) -> None:
    top = shutil.copytree(tiny_layout, tmp_path / "src" / "tiny-imagenet-200")
    link = next((top / "train").glob("*/images/*.JPEG"))
    link.unlink()
    link.symlink_to(tmp_path / "nowhere.JPEG")
    with pytest.raises(DataError, match=rf"^{re.escape(str(link))}: cannot read it \(No such file or directory\)$"):
        prepare(top, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)


def test_names_that_are_not_utf8_print_on_a_strict_terminal() -> None:
    from alexnet.sources import printable

    name = os.fsdecode(b"notes\xe9.txt")  # as os.listdir gives a Latin-1 name on a UTF-8 system
    assert printable(name) == "notes\ufffd.txt"
    printable(name).encode("utf-8", "strict")


def test_a_zip_member_in_a_compression_zipfile_lacks_is_one_line() -> None:
    from alexnet.sources import _text

    class Deflate64:
        def read(self, name: str) -> bytes:
            raise NotImplementedError("That compression method is not supported")

        def show(self, name: str) -> str:
            return f"tiny-imagenet-200/{name} in t.zip"

    with pytest.raises(DataError, match="wnids.txt in t.zip: unreadable \\(That compression method is not supported\\)"):
        _text(Deflate64(), "wnids.txt")


def test_a_prepare_that_waited_goes_on_when_the_one_before_removed_the_folder(tiny_zip: Path, tmp_path: Path) -> None:
    """The first prepare failed and removed the folder it had made, lock file and all, while a
    second waited for its lock: the second then held a lock no one else could see, and failed
    writing into a folder that was gone."""
    import fcntl
    import threading
    import time

    d = tmp_path / "c"
    d.mkdir()
    held = open(d / ".prepare.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX)  # the first prepare
    logs: list[str] = []
    result: list[object] = []
    second = threading.Thread(target=lambda: result.append(
        _try(lambda: prepare(tiny_zip, d, counts=TINY_COUNTS, workers=1, log=logs.append))))
    second.start()
    deadline = time.monotonic() + 60
    while not any("waiting for another process" in m for m in logs) and time.monotonic() < deadline:
        time.sleep(0.01)
    (d / ".prepare.lock").unlink()  # what the failing first prepare's clean-up did
    d.rmdir()
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    second.join(120)
    assert result and result[0] == d, result
    open_cache(d)


def _try(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the test reports it
        return e


def test_a_read_only_cache_that_is_up_to_date_is_used(tiny_zip: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    d = prepare(tiny_zip, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)
    monkeypatch.setattr(data.os, "access", lambda p, mode: mode != os.W_OK)  # another user's cache
    logs: list[str] = []
    assert prepare(tiny_zip, d, counts=TINY_COUNTS, workers=1, log=logs.append) == d
    assert logs == [f"cache up to date: {d}"]
    with pytest.raises(DataError, match=r"not writable here, and the cache needs building \(forced rebuild\)$"):
        prepare(tiny_zip, d, counts=TINY_COUNTS, workers=1, force=True, log=quiet)


def test_an_older_cache_format_is_rebuilt_from_its_own_source(tiny_zip: Path, tmp_path: Path) -> None:
    d = prepare(tiny_zip, tmp_path / "c", counts=TINY_COUNTS, workers=1, log=quiet)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(DataError, match="from another version of this program") as e:
        open_cache(d)
    assert f"--source {tiny_zip}" in str(e.value) and "--counts" in str(e.value)


def test_a_metrics_file_with_a_ragged_row_counts_as_no_record(tmp_path: Path) -> None:
    from alexnet.metrics import recorded_epochs

    (tmp_path / "metrics.csv").write_text("epoch,val_top1\n1,0.5,extra\n")
    assert recorded_epochs(tmp_path) == 0


def test_a_manifest_write_that_fails_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def full(self, *a, **k):  # the file made, its text not written
        real(self, "")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        data._write_json(tmp_path / "manifest.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_an_md5_for_a_folder_is_refused_not_ignored(tiny_layout: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--md5: .* is a folder, and an MD5 checks one file"):
        prepare(tiny_layout, tmp_path / "c", counts=TINY_COUNTS, md5="0" * 32, workers=1, log=quiet)
    assert not (tmp_path / "c").exists()
