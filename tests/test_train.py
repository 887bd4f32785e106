"""Training, evaluation and prediction end to end on small synthetic data, through the seed's
command line (train.py / evaluate.py) and the package CLI."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--device", "cpu", "--num_classes", "4", "--bs", "8", "--max-steps", "2", "--epochs", "1", "--no-progress"]


def train(cache, out, *args):
    return main(["train", *args, "--data", str(cache), "--out", str(out), *QUICK])


SEED_COMMANDS = [
    ["models/alexnet_baseline.py"],
    ["models/alexnet_baseline.py", "--transforms", "utils/transforms_randomcrop.py"],
    ["models/alexnet_bn.py", "--epochs", "1", "--bs", "16", "--lr", "0.01", "--momentum", "0.9", "--wd", "0.0005"],
    ["models/alexnet_dropout.py"],
    ["models/alexnet_combined.py", "--transforms", "utils/transforms_combined.py", "--workers", "0"],
    ["models/alexnet_combined_small.py", "--transforms", "utils/transforms_pixel.py"],
    ["models/alexnet_paper.py", "--transforms", "utils/transforms_paper.py"],
    ["--variant", "combined_gap", "--amp", "--schedule", "onecycle", "--label-smoothing", "0.1"],
]


def test_seed_commands_train_every_registered_variant():
    from alexnet.models import VARIANTS
    from alexnet.userfiles import load_model_file

    trained = {a[1] if a[0] == "--variant" else load_model_file(ROOT / a[0], 4).variant for a in SEED_COMMANDS}
    assert trained == set(VARIANTS)


@pytest.mark.parametrize("args", SEED_COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_seed_commands(tiny_cache, tmp_path, monkeypatch, args):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    size = [] if "--bs" in args else ["--bs", "8"]
    assert main(["train", *args, "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--max-steps", "2", "--epochs", "1", "--no-progress", *size]) == 0
    for f in ("best.pth", "last.pth", "metrics.csv", "config.json", "curves.png"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and int(rows[0]["val_n"]) == 16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["lr"] > 0
    amp = "--amp" in args  # else the published fp32 recipe, in NCHW
    assert (cfg["amp"], cfg["channels_last"]) == (amp, amp)


def test_published_entry_points_as_scripts(tiny_cache, tmp_path):
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "train.py", "models/alexnet_baseline.py", "--data", str(tiny_cache),
                        "--out", str(out), *QUICK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout
    # each epoch reports the process's peak memory, in its line and in metrics.csv
    row = next(csv.DictReader((out / "metrics.csv").open()))
    peak = float(row["peak_rss_mib"])
    assert f"peak {peak / 1024:.2f} GiB RSS" in r.stdout and float(row["peak_gpu_mib"]) == 0
    if sys.platform.startswith("linux"):
        assert peak > 100  # PyTorch alone takes more
    r = subprocess.run([sys.executable, "evaluate.py", "models/alexnet_baseline.py", str(out / "best.pth"),
                        "--data", str(tiny_cache), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "top-5" in r.stdout


def test_defaults_are_the_published_ones():
    from alexnet.config import TrainConfig

    c = TrainConfig(model="m.py")
    assert (c.epochs, c.bs, c.lr, c.momentum, c.wd, c.num_classes, c.workers, c.out, c.device) == \
        (30, 64, 0.01, 0.9, 0.0005, 200, 2, "results", "auto")


def _resolve(*argv: str):
    import argparse

    from alexnet.config import add_train_args, resolve

    p = argparse.ArgumentParser()
    add_train_args(p)
    return resolve(p.parse_args(list(argv)))


@pytest.mark.parametrize("args, amp, channels_last", [
    ([], False, False),  # fp32: NCHW, where channels_last was no faster (README, Speed)
    (["--amp"], True, True),
    (["--channels-last"], False, True),  # given: kept
    (["--amp", "--no-channels-last"], True, False),
])
def test_channels_last_follows_amp_unless_given(args, amp, channels_last):
    c = _resolve("m.py", *args)
    assert (c.amp, c.channels_last) == (amp, channels_last)


def test_the_command_line_overrides_a_config_files_other_half_of_a_pair(tmp_path):
    """A run takes a model file or a variant, a recipe or a transforms file: the one given on
    the command line replaces the file's other one, as any option overrides the file."""
    file = tmp_path / "c.json"
    file.write_bytes(b"\xef\xbb\xbf" + json.dumps({"variant": "baseline", "transforms": "t.py", "epochs": 7}).encode())
    c = _resolve("m.py", "--config", str(file), "--recipe", "pixel")  # and a byte-order mark is no error
    assert (c.model, c.variant, c.recipe, c.transforms, c.epochs) == ("m.py", None, "pixel", None, 7)
    file.write_text(json.dumps({"model": "m.py", "recipe": "pixel"}))
    c = _resolve("--variant", "dropout", "--transforms", "t.py", "--config", str(file))
    assert (c.model, c.variant, c.recipe, c.transforms) == (None, "dropout", None, "t.py")
    assert _resolve("--config", str(file)).model == "m.py"  # nothing given: the file's


def test_channels_last_follows_amp_from_a_config_file(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"amp": True}))
    assert _resolve("m.py", "--config", str(file)).channels_last is True
    assert _resolve("m.py", "--config", str(file), "--no-amp").channels_last is False
    file.write_text(json.dumps({"amp": True, "channels_last": False}))
    assert _resolve("m.py", "--config", str(file)).channels_last is False


@pytest.fixture(scope="module")
def trained(learnable_cache, tmp_path_factory):
    """Combined-GAP trained a few epochs on 4 learnable classes."""
    out = tmp_path_factory.mktemp("trained")
    code = main(["train", "--variant", "combined_gap", "--data", str(learnable_cache), "--out", str(out),
                 "--device", "cpu", "--num_classes", "4", "--bs", "16", "--epochs", "6", "--lr", "0.05",
                 "--schedule", "onecycle", "--no-progress", "--seed", "1"])
    assert code == 0
    return out


def test_learns_above_chance_and_evaluate_reproduces(trained, learnable_cache, capsys):
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    best = max(rows, key=lambda r: float(r["val_top1"]))
    assert float(best["val_top1"]) >= 60.0, rows  # chance is 25%
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    capsys.readouterr()
    assert main(["evaluate", str(trained / "best.pth"), "--data", str(learnable_cache), "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    top1 = float(line.split("top-1 ")[1].split("%")[0])
    assert abs(top1 - float(best["val_top1"])) < 1e-6


def test_evaluate_tta_and_per_class(trained, learnable_cache, tmp_path):
    from alexnet.data import open_cache
    from alexnet.inference import load_trained, run_evaluate

    def top1(tta="none", **kw):
        return run_evaluate(None, trained / "best.pth", data=learnable_cache, device="cpu", tta=tta,
                            log=lambda *a: None, **kw)

    # The views by hand: the val images' centre view and its mirror image (flip), or torchvision's
    # ten crops (tested in test_augment); the class scores are the mean of their softmax.
    model, c, augment = load_trained(trained / "best.pth", None, torch.device("cpu"))
    assert not c["config"]["channels_last"]  # fp32 run: NCHW, as below
    val = open_cache(learnable_cache).val
    x, y = torch.from_numpy(np.array(val.x)), torch.from_numpy(np.array(val.y))
    centre = augment(x, train=False)
    views = {"none": [centre], "flip": [centre, centre.flip(-1)], "10crop": list(augment.ten_crop(x))}
    for tta, vs in views.items():
        with torch.no_grad():
            probs = torch.stack([model.eval()(v.contiguous()).softmax(-1) for v in vs]).mean(0)
        r = top1(tta)
        assert r["n"] == len(y) and abs(r["top1"] - (probs.argmax(1) == y).double().mean().item() * 100) < 1e-9, tta
        want_loss = torch.nn.functional.nll_loss(probs.log(), y).item()
        assert r["loss"] == pytest.approx(want_loss, rel=1e-5), tta
    plain = top1()
    pc = tmp_path / "pc.csv"
    top1(per_class=pc)
    rows = list(csv.DictReader(pc.open()))  # the table alone (the confused pairs: pc_confused.csv)
    assert sorted(int(r["class"]) for r in rows) == [0, 1, 2, 3]
    assert sum(int(r["n"]) for r in rows) == plain["n"]  # every val image in its class's row
    weighted = sum(float(r["top1"]) * int(r["n"]) for r in rows) / plain["n"]
    assert abs(weighted - plain["top1"]) < 0.01  # per-class figures are rounded to 0.01


def test_predict_prints_top_classes(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(jpg)
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8)).save(png)  # greyscale, small
    capsys.readouterr()
    assert main(["predict", str(trained / "best.pth"), str(jpg), str(png), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("%") == 8  # top-k is capped by the 4 classes
    from alexnet.inference import run_predict

    res = run_predict(trained / "best.pth", [jpg], device="cpu", log=lambda *a: None)
    assert abs(sum(p for _, _, p in res[0]) - 1) < 1e-4
    # The ranking is the model's: its softmax over the image as evaluation sees it, sorted,
    # each index named by the checkpoint's class list; --topk cuts it.
    from alexnet.inference import load_image, load_trained

    # What the model is shown, computed by hand: the 90x120 JPEG's shorter side to 64 (64x85),
    # the greyscale 50x30 PNG's to 64 (107x64) as RGB, then the centre 64x64 of each.
    want = {jpg: Image.open(jpg).resize((64, 85), Image.Resampling.BILINEAR).crop((0, 10, 64, 74)),
            png: Image.open(png).convert("RGB").resize((107, 64), Image.Resampling.BILINEAR).crop((21, 0, 85, 64))}
    for f, im in want.items():
        assert torch.equal(load_image(f, 64), torch.from_numpy(np.asarray(im))), f
    model, c, augment = load_trained(trained / "best.pth", None, torch.device("cpu"))
    with torch.no_grad():
        probs = model(augment(load_image(jpg, 64)[None], train=False)).softmax(1)[0]
    order = probs.argsort(descending=True).tolist()
    assert [w for w, _, _ in res[0]] == [c["wnids"][i] for i in order]
    assert [p for _, _, p in res[0]] == pytest.approx(probs[order].tolist(), abs=1e-4)
    top2 = run_predict(trained / "best.pth", [jpg, png], device="cpu", topk=2, log=lambda *a: None)
    assert [len(r) for r in top2] == [2, 2]
    # the same ranking; the probabilities up to float rounding, which differs with the batch
    # the image is evaluated in (one image here, two above)
    assert [w for w, _, _ in top2[0]] == [w for w, _, _ in res[0][:2]]
    assert [p for _, _, p in top2[0]] == pytest.approx([p for _, _, p in res[0][:2]], abs=1e-6)
    assert main(["predict", str(trained / "best.pth"), str(jpg), "--topk", "0"]) == 2
    assert "--topk must be at least 1, got 0" in capsys.readouterr().err


def test_predict_folders_in_batches_and_to_csv(trained, tmp_path, capsys):
    """A folder is walked for image files (subfolders too; hidden files and non-images left
    out) in natural order; batches of any size give the same classes; --csv writes one row an
    image instead of printing them."""
    from alexnet.inference import run_predict

    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / ".cache").mkdir()
    names = ["img2.jpg", "img10.png", "sub/a.JPEG"]
    for n in names + [".hidden.jpg", ".cache/x.jpg"]:
        Image.fromarray(rng.integers(0, 255, (48, 70, 3), dtype=np.uint8)).save(photos / n)
    (photos / "notes.txt").write_text("not an image")
    (photos / "receipt.pdf").write_bytes(b"%PDF-1.4 a format PIL writes but cannot read")
    (photos / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # a dangling link
    if hasattr(os, "mkfifo"):
        os.mkfifo(photos / "pipe.jpg")  # reading it would block for ever
    from alexnet.sources import is_image_name

    assert is_image_name("a.mpo") and is_image_name("b.JPEG") and not is_image_name("c.pdf")
    extra = tmp_path / "extra.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(extra)
    ckpt = trained / "best.pth"
    quiet = dict(device="cpu", topk=3, log=lambda *a: None)
    expected = [photos / n for n in names] + [extra]
    one = [run_predict(ckpt, [f], **quiet)[0] for f in expected]  # each image alone
    for bs in (1, 2, 256):
        got = run_predict(ckpt, [photos, extra], bs=bs, **quiet)
        # the same top class; the probabilities up to the float rounding a batch's size changes
        assert [r[0][0] for r in got] == [r[0][0] for r in one]
        assert [p for r in got for _, _, p in r] == pytest.approx([p for r in one for _, _, p in r], abs=1e-5)

    table = tmp_path / "out" / "pred.csv"
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(photos), str(extra), "--csv", str(table), "--topk", "2",
                 "--bs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "%" not in out and f"top-2 classes of 4 images written to {table}" in out
    with table.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "wnid1", "name1", "prob1", "wnid2", "name2", "prob2"]
    assert [r[0] for r in rows[1:]] == [str(f) for f in expected]
    assert [r[1] for r in rows[1:]] == [r[0][0] for r in one]
    assert [float(r[3]) for r in rows[1:]] == pytest.approx([r[0][2] for r in one], abs=1e-5)


def test_predict_skips_an_unreadable_image_and_fails_at_the_end(trained, tmp_path, capsys):
    """One file that does not decode among many: skipped with a warning, the others classified
    and written, then exit status 2 naming it. A file name that is not UTF-8 reaches the CSV
    as its bytes."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for n in ("a.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photos / n)
    (photos / "b.jpg").write_bytes(b"\xff\xd8 cut short")
    try:
        odd = photos / os.fsdecode(b"caf\xe9.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(odd)
    except (OSError, UnicodeError):  # a file system that takes only UTF-8 names
        odd = None
    table = tmp_path / "pred.csv"
    capsys.readouterr()
    assert main(["predict", str(trained / "best.pth"), str(photos), "--csv", str(table), "--bs", "2",
                 "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert f"warning: skipped {photos / 'b.jpg'}: not an image PIL can read" in captured.err
    assert f"files skipped, not readable as images (the others were classified): {photos / 'b.jpg'}" in captured.err
    rows = table.read_bytes().split(b"\n")
    named = [r.split(b",")[0] for r in rows[1:] if r]
    expected = [photos / "a.jpg", photos / "c.png"] + ([odd] if odd else [])
    assert sorted(named) == sorted(os.fsencode(f) for f in expected)


def test_predict_bad_inputs_named_before_any_work(trained, tmp_path, capsys):
    ckpt = str(trained / "best.pth")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    assert main(["predict", ckpt, str(empty), "--device", "cpu"]) == 2
    assert f"{empty}: a folder with no image files in it or its subfolders" in capsys.readouterr().err
    jpg = tmp_path / "a.jpg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(jpg)
    missing = tmp_path / "nope.jpg"
    assert main(["predict", ckpt, str(jpg), str(missing), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert f"{missing}: image file not found" in captured.err and "%" not in captured.out
    assert main(["predict", ckpt, str(jpg), "--bs", "0"]) == 2
    assert "--bs must be at least 1, got 0" in capsys.readouterr().err
    assert main(["predict", ckpt, str(jpg), "--csv", str(tmp_path)]) == 2
    assert f"--csv {tmp_path}: is a directory" in capsys.readouterr().err
    # the table must not replace an image, one being classified least of all
    assert main(["predict", ckpt, str(jpg), "--csv", str(jpg)]) == 2
    assert f"--csv {jpg}: names an image file (.jpg)" in capsys.readouterr().err
    same = tmp_path / "listed.csv"
    same.write_text("a CSV given as an image too")
    assert main(["predict", ckpt, str(jpg), str(same), "--csv", str(same)]) == 2
    assert f"--csv {same}: is one of the files to classify" in capsys.readouterr().err
    assert jpg.stat().st_size > 100 and same.read_text() == "a CSV given as an image too"


def test_predict_unreadable_subfolder_is_one_line(trained, tmp_path, capsys, monkeypatch):
    """A folder the walk cannot enter (no permission: simulated, as root reads every folder)
    is named, before any work, instead of a traceback or a silent gap."""
    import alexnet.sources as sources

    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    real_walk = sources.os.walk

    def walk(top, onerror=None, **kw):
        for root, dirs, files in real_walk(top, onerror=onerror, **kw):
            if Path(root).name == "locked":
                onerror(PermissionError(13, "Permission denied", root))
            yield root, dirs, files

    monkeypatch.setattr(sources.os, "walk", walk)
    assert main(["predict", str(trained / "best.pth"), str(photos), "--device", "cpu"]) == 2
    assert (f"{photos / 'locked'}: cannot read this folder (Permission denied); predict reads every folder "
            f"under {photos}") in capsys.readouterr().err


def test_torchvision_transform_file_runs_per_image(tiny_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert train(tiny_cache, tmp_path / "tv", "models/alexnet_combined_gap.py",
                 "--transforms", "examples/transforms_torchvision.py", "--workers", "2") == 0
    assert (tmp_path / "tv" / "best.pth").is_file()
    assert ("64x64 px, transforms examples/transforms_torchvision.py (per image in DataLoader workers)"
            in capsys.readouterr().out)
    assert train(tiny_cache, tmp_path / "recipe", "models/alexnet_combined_gap.py",
                 "--transforms", "utils/transforms_randomcrop.py") == 0
    assert "transforms utils/transforms_randomcrop.py (batched on the device)" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [2**63 - 1, 2**64, -5])
def test_any_integer_seed_trains_both_ways(tiny_cache, tmp_path, monkeypatch, seed):
    # Seeds are mixed with the epoch, rank and position before they reach a generator,
    # which takes less than 2^64: a seed from 1,829 up overflowed the per-image seeds.
    # Reduced mod 2^63, as the CPU generator reduces its seed: a negative seed draws what it did.
    monkeypatch.chdir(ROOT)
    for transforms in ("examples/transforms_torchvision.py", "utils/transforms_combined.py"):
        assert train(tiny_cache, tmp_path / Path(transforms).stem, "models/alexnet_combined_gap.py",
                     "--transforms", transforms, "--workers", "0", "--seed", str(seed)) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="names are bytes on Linux; other systems refuse this one")
def test_an_out_folder_whose_name_is_not_utf8(tiny_cache, tmp_path):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/run\xfe"))  # Python keeps the byte as a surrogate
    assert train(tiny_cache, out, "--variant", "combined_gap") == 0
    assert (out / "curves.png").is_file() and (out / "best.pth").is_file()


def test_per_image_data_travels_to_a_spawned_worker_as_files(tiny_cache, tmp_path):
    """Under spawn (macOS, Windows) DataLoader pickles the data set into each worker: the split
    goes as its memory-mapped file, not its pixels, and a transform whose class is defined in
    the user's file is rebuilt from that file, giving the same images as in this process."""
    import pickle

    from alexnet.data import open_cache
    from alexnet.loader import _PerImage
    from alexnet.userfiles import load_transforms_file

    t = tmp_path / "own_class.py"
    t.write_text("import torch\n\nclass Invert:\n    def __call__(self, img):\n"
                 "        return 255 - img if torch.rand(()) < 0.5 else img\n\n"
                 "def build_transforms():\n    return Invert()\n")
    split = open_cache(tiny_cache).train
    ds = _PerImage(split.x, split.y, load_transforms_file(t), torch.arange(len(split.y)).flip(0), 7, str(t))
    blob = pickle.dumps(ds)
    assert len(blob) < split.x.nbytes / 20
    here = torch.stack([ds[i][0] for i in range(6)])
    code = ("import pickle, sys, torch\n"
            "ds = pickle.loads(sys.stdin.buffer.read())\n"
            "torch.save(torch.stack([ds[i][0] for i in range(6)]), sys.argv[1])\n")
    out = tmp_path / "there.pt"
    subprocess.run([sys.executable, "-c", code, str(out)], input=blob, check=True, timeout=120, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert torch.equal(torch.load(out), here)
    raw = [torch.from_numpy(np.array(split.x[len(split.y) - 1 - i])).permute(2, 0, 1) for i in range(6)]
    inverted = [torch.equal(h, 255 - r) for h, r in zip(here, raw)]
    assert all(inv or torch.equal(h, r) for h, r, inv in zip(here, raw, inverted)) and 0 < sum(inverted) < 6


def test_torchvision_path_checks_output(tiny_cache, tmp_path, capsys):
    bad = tmp_path / "t.py"
    bad.write_text("def build_transforms():\n    return lambda img: img[0]\n")
    assert train(tiny_cache, tmp_path / "o", "--variant", "combined_gap", "--transforms", str(bad), "--workers", "0") == 2
    assert "must return a (3, H, W) tensor" in capsys.readouterr().err


@pytest.mark.parametrize("pipeline, pixels", [
    ("v2.ToDtype(torch.float32)", lambda v: v),  # no scale=True: 0..255 as floats
    ("v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)", lambda v: (v / 255 - 0.5) / 0.25),
])
def test_torchvision_path_checks_the_pixel_range(tiny_cache, tmp_path, capsys, pipeline, pixels):
    """Float pixels must be in [0, 1]: the project normalises after the transform, so 0..255
    floats or a normalised image would train at the wrong scale and say nothing."""
    from alexnet.data import open_cache

    bad = tmp_path / "t.py"
    bad.write_text("import torch\nfrom torchvision.transforms import v2\n\n"
                   f"def build_transforms():\n    return v2.Compose([{pipeline}])\n")
    first = open_cache(tiny_cache).train.x[0]  # the image the check runs the transform on
    shown = f"[{pixels(float(first.min())):.4g}, {pixels(float(first.max())):.4g}]"
    assert train(tiny_cache, tmp_path / "o", "--variant", "combined_gap", "--transforms", str(bad), "--workers", "0") == 2
    err = capsys.readouterr().err
    assert f"{bad}: the transform returned float pixels in {shown}; expected uint8, or float in [0, 1]" in err


def test_a_model_file_for_small_images_trains_below_alexnets_minimum(tmp_path):
    """AlexNet needs 63 pixels; a user's model made for 32x32 images trains and evaluates on a
    32-pixel cache (the size check is the model's own forward pass)."""
    from alexnet.data import prepare
    from tests.synth import make_image_folder

    cache = prepare(make_image_folder(tmp_path / "images", classes=3, per_class=8), tmp_path / "c32", img_size=32,
                    workers=1, log=lambda *a: None)
    m = tmp_path / "small.py"
    m.write_text("from torch import nn\n\ndef build_model(num_classes):\n"
                 "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
                 "                         nn.Flatten(), nn.Linear(8, num_classes))\n")
    assert main(["train", str(m), "--data", str(cache), "--out", str(tmp_path / "o"), "--img-size", "32",
                 "--num_classes", "3", "--bs", "8", "--epochs", "1", "--device", "cpu", "--no-progress"]) == 0
    assert main(["evaluate", str(m), str(tmp_path / "o" / "best.pth"), "--data", str(cache), "--device", "cpu"]) == 0


def test_img_size_224(tiny_cache, tmp_path, monkeypatch):
    from alexnet import train

    shapes, real = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda model, opt, x, *a, **k: shapes.append(tuple(x.shape))
                        or real(model, opt, x, *a, **k))
    assert main(["train", "--variant", "combined_gap", "--img-size", "224", "--data", str(tiny_cache),
                 "--out", str(tmp_path), "--device", "cpu", "--num_classes", "4", "--bs", "4", "--max-steps", "1",
                 "--epochs", "1", "--no-progress"]) == 0
    assert shapes == [(4, 3, 224, 224)]  # the model trained on 224-pixel batches
    assert torch.load(tmp_path / "best.pth", weights_only=False)["img_size"] == 224


def test_summary_lists_all_variants(capsys):
    """Every registered variant, with the parameters and MFLOPs the README's table shows."""
    import re

    from alexnet.models import VARIANTS

    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    printed = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `(\w+)` \| .* \| ([\d,]+) \| ([\d.,]+) \|$", out, re.M)}
    readme = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `(\w+)` \| `models/\w+\.py` \| .* \| ([\d,]+) \| ([\d.,]+) \|$",
                                                      (ROOT / "README.md").read_text(), re.M)}
    assert set(printed) == set(VARIANTS) and printed == readme
    assert main(["summary", "models/alexnet_baseline.py"]) == 0
    assert f"total parameters {readme['baseline'][0]};" in capsys.readouterr().out


def test_summary_of_a_variant_in_a_study_folder(tmp_path, capsys, monkeypatch):
    """`alexnet ablate` makes a folder per row, named as the variant: inside a study folder
    the name is still the variant, not that folder taken for a model file."""
    (tmp_path / "combined_gap" / "seed0").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["summary", "combined_gap"]) == 0
    assert "total parameters 2,522,248" in capsys.readouterr().out


def test_summary_shows_a_grouped_lrn_as_one_layer(capsys):
    """The towers' LRN runs once per tower inside one layer: one row with the whole output."""
    assert main(["summary", "models/alexnet_paper_towers.py"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("features.")]
    assert [r[:2] for r in rows if "LRN" in r[1] or "LocalResponseNorm" in r[1]] == [
        ["features.2", "GroupedLRN"], ["features.6", "GroupedLRN"]]
    assert [r[0] for r in rows] == [f"features.{i}" for i in range(15)]


@pytest.mark.parametrize("args,error", [
    (["--img-size", "62"], "--img-size must be at least 63 (AlexNet's pooling needs it), got 62"),
    (["combined_gap", "--num-classes", "0"], "--num-classes must be at least 1, got 0"),
])
def test_summary_bad_sizes_are_one_line(capsys, args, error):
    assert main(["summary", *args]) == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_summary_of_a_model_file_checks_it_as_train_does(tmp_path, capsys):
    m = tmp_path / "m.py"
    m.write_text("from torch import nn\n\ndef build_model(num_classes):\n"
                 "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))\n")
    assert main(["summary", str(m)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {m}: the model does not take a batch of 64x64 RGB images") and err.count("\n") == 1


def test_prepare_command(tiny_zip, tmp_path, capsys):
    assert main(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "c"), "--counts", "4,12,4",
                 "--workers", "1"]) == 0
    assert (tmp_path / "c" / "manifest.json").is_file()
    assert main(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "c"), "--counts", "4,12,4"]) == 0
    assert "up to date" in capsys.readouterr().out
    # The official counts are the default: a 4-class archive is refused with a one-line reason.
    assert main(["prepare", "--source", str(tiny_zip), "--data", str(tmp_path / "d"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "wnids.txt" in err and "\n" not in err


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_trains_and_saves_a_plain_checkpoint(tiny_cache, tmp_path, capsys):
    # The compiled wrapper prefixes parameter names with `_orig_mod.`; checkpoints must not,
    # or an uncompiled `evaluate` could not load them.
    assert train(tiny_cache, tmp_path, "--variant", "combined_gap", "--compile") == 0
    state = torch.load(tmp_path / "best.pth", weights_only=False)["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)
    assert main(["evaluate", str(tmp_path / "best.pth"), "--data", str(tiny_cache), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_resume_from_a_checkpoint_without_memory_columns(tiny_cache, tmp_path):
    # A checkpoint of a version before the peak-memory columns: resuming it keeps its rows
    # (their memory cells empty) and reports the new epoch's peak.
    from alexnet.metrics import read_csv

    out = tmp_path / "run"
    args = ["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), *QUICK]
    assert main(args) == 0
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=False)
    for row in ckpt["history"]:
        del row["peak_rss_mib"], row["peak_gpu_mib"]
    torch.save(ckpt, out / "last.pth")
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    old, new = read_csv(out / "metrics.csv")
    assert "peak_rss_mib" not in old and old["epoch"] == 1
    assert new["epoch"] == 2 and new["peak_gpu_mib"] == 0
    if sys.platform.startswith("linux"):
        assert new["peak_rss_mib"] > 100  # PyTorch alone takes more


def test_peak_memory_script(tiny_cache):
    r = subprocess.run([sys.executable, "scripts/peak_memory.py", "--variant", "combined_gap", "--steps", "2",
                        "--data", str(tiny_cache), "--", "--device", "cpu", "--num_classes", "4", "--bs", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # a CPU run releases the training split's pages as it reads them, so the script does not
    # read the whole split in first (it does for batches that keep them)
    assert "MiB of the training split" not in r.stdout, r.stdout
    assert "epoch 2/2" in r.stdout and "combined_gap: peak resident set" in r.stdout


@pytest.mark.parametrize("script,args,usage", [
    ("train.py", ["--device", "gpu"], "python train.py: error: argument --device: invalid choice: 'gpu'"),
    ("evaluate.py", [], "python evaluate.py: error: the following arguments are required"),
])
def test_seed_scripts_name_themselves_in_usage_errors(script, args, usage):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and usage in r.stderr and "alexnet" not in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("model_file,recipe", [
    ("models/alexnet_baseline.py", "baseline"), ("models/alexnet_combined_small.py", "baseline"),
    ("models/alexnet_paper.py", "paper"),  # its initialisation needs the paper's input scale
])
def test_a_model_file_trains_with_the_seed_recipe_or_the_input_scale_it_needs(model_file, recipe):
    from alexnet.config import TrainConfig
    from alexnet.train import build_model, build_transforms

    cfg = TrainConfig(model=model_file, num_classes=4).validate()
    assert build_transforms(cfg, build_model(cfg)[1])[1] == f"recipe:{recipe}"
    chosen = TrainConfig(model=model_file, num_classes=4, recipe="randomcrop").validate()
    assert build_transforms(chosen, build_model(chosen)[1])[1] == "recipe:randomcrop"  # a named recipe wins


@pytest.mark.parametrize("overrides", ["init_bias=1.0", "init='pytorch'", "groups=2"])
def test_a_model_file_that_modifies_the_papers_model_keeps_its_input_scale(tmp_path, overrides):
    """What the paper's model file tells users to write for the paper's letter is still the paper's model."""
    from alexnet.config import TrainConfig
    from alexnet.train import build_model, build_transforms

    f = tmp_path / "paper_letter.py"
    f.write_text("from alexnet.models import create_model\n\n"
                 f"def build_model(num_classes=200):\n    return create_model('paper', num_classes, {overrides})\n")
    cfg = TrainConfig(model=str(f), num_classes=4).validate()
    assert build_transforms(cfg, build_model(cfg)[1])[1] == "recipe:paper"


def test_the_papers_two_towers_train_and_load_from_their_checkpoint(tiny_cache, tmp_path):
    """A checkpoint records groups=2, so evaluate and predict rebuild the two towers without
    the model file (and a one-tower model file is refused for it)."""
    from alexnet.inference import load_trained

    f = tmp_path / "paper_towers.py"
    f.write_text("from alexnet.models import create_model\n\n"
                 "def build_model(num_classes=200):\n    return create_model('paper', num_classes, groups=2)\n")
    assert train(tiny_cache, tmp_path / "o", str(f)) == 0
    model, c, _ = load_trained(tmp_path / "o" / "best.pth", None, torch.device("cpu"))
    assert c["model_cfg"]["groups"] == 2
    assert [m.groups for m in model.features if isinstance(m, torch.nn.Conv2d)] == [1, 2, 1, 2, 2]
    assert main(["evaluate", str(f), str(tmp_path / "o" / "best.pth"), "--data", str(tiny_cache), "--device", "cpu"]) == 0
    assert main(["evaluate", str(ROOT / "models/alexnet_paper.py"), str(tmp_path / "o" / "best.pth"),
                 "--data", str(tiny_cache), "--device", "cpu"]) != 0


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_the_lr_column_is_the_lr_of_the_epochs_last_step(tiny_cache, tmp_path, schedule):
    """One meaning for every schedule: the lr the epoch's last step trained with (a per-step
    schedule's next value, after the last step, used to be shown: 0 for a cosine's last epoch)."""
    out = tmp_path / "o"
    assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "2", "--max-steps", "3", "--lr", "0.05",
                 "--schedule", schedule, "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    if schedule == "cosine":  # steps 0..5 of 6: the epochs end with steps 2 and 5
        want = [0.05 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in (2, 5)]
    else:
        want = [0.05, 0.05]
    assert [float(r["lr"]) for r in rows] == pytest.approx(want, rel=1e-6)


def test_evaluate_on_a_cache_of_another_image_size_is_refused(tmp_path, capsys):
    """The same classes prepared at 32 pixels would be upsampled and scored without a word."""
    from alexnet.data import prepare
    from tests.synth import make_image_folder

    src = make_image_folder(tmp_path / "src", classes=4, per_class=4)
    c64, c32 = (prepare(src, tmp_path / f"c{s}", counts="any", img_size=s, workers=1, log=lambda *a: None)
                for s in (64, 32))
    assert main(["train", "--variant", "combined_gap", "--data", str(c64), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r" / "best.pth"), "--data", str(c32), "--device", "cpu"]) == 2
    assert "trained on a cache of 64x64 images; " in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "r" / "best.pth"), "--data", str(c64), "--device", "cpu"]) == 0
