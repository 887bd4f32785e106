"""The fast path against slow references: the same training run fed by the batched path and
by a per-image DataLoader reaches the same loss; the benchmark runs and reports its ratios."""

import argparse
import csv
import os
import sys
from pathlib import Path

import pytest
import torch

from alexnet.bench import _jpeg_folder, _reference_loader, add_bench_args, run_bench
from alexnet.cli import main
from alexnet.augment import RECIPES
from tests.conftest import needs_compiler
from tests.procs import kill_leaves_no_children

ROOT = Path(__file__).resolve().parents[1]


def _train(cache, out, *extra):
    assert main(["train", str(ROOT / "models" / "alexnet_bn_gap.py"), "--data", str(cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "16", "--epochs", "2", "--lr", "0.05", "--no-progress",
                 "--seed", "3", *extra]) == 0
    return [float(r["train_loss"]) for r in csv.DictReader((out / "metrics.csv").open())]


def test_fast_and_per_image_paths_train_alike(learnable_cache, tmp_path):
    identity = tmp_path / "identity.py"
    identity.write_text("def build_transforms():\n    return lambda img: img  # per-image path, no augmentation\n")
    fast = _train(learnable_cache, tmp_path / "fast", "--recipe", "baseline")
    slow = _train(learnable_cache, tmp_path / "slow", "--transforms", str(identity), "--workers", "0")
    # Same batches, same seeds, no dropout, and the same normalisation arithmetic for uint8
    # batches on both paths (training at lr 0.05 amplifies even last-bit differences).
    assert fast == pytest.approx(slow, rel=1e-3, abs=1e-3)


def test_bench_prints_ratios(capsys):
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--variants", "combined_gap", "--bs", "8", "--steps", "1", "--rounds", "1", "--no-reference",
                      "--device", "cpu"])
    rows = run_bench(a, log=print)
    out = capsys.readouterr().out
    assert rows[0]["variant"] == "combined_gap" and rows[0]["model"] > 0 and rows[0]["project"] > 0
    assert "(2)/(1)" in out


@pytest.mark.parametrize("args,match", [
    (["--variants", "all", "nope"], "unknown variant 'nope'; known variants: all, baseline"),
    (["--reference-bs", "0"], "--bs, --steps, --rounds and --reference-bs must be at least 1, got 8, 1, 1 and 0"),
    (["--data", "{tmp}/nowhere"], "error: {tmp}/nowhere: no prepared data cache here (no manifest.json)"),
    (["--jpeg-zip", "{tmp}/missing.zip"], "--jpeg-zip {tmp}/missing.zip: cannot open it as a zip (FileNotFoundError"),
    (["--jpeg-zip", "{tmp}/text.zip"], "--jpeg-zip {tmp}/text.zip: cannot open it as a zip (BadZipFile"),
    (["--jpeg-zip", "{tmp}/empty.zip"], "--jpeg-zip {tmp}/empty.zip: no train/ JPEGs in it"),
    # (3) drops a last partial batch, so fewer images than one batch would never yield one:
    # refused, where it used to wait forever.
    (["--jpeg-zip", "{tiny_zip}", "--reference-bs", "64"],
     "(3) has 48 JPEGs from --jpeg-zip {tiny_zip} (up to 20 per class), fewer than one batch of --reference-bs 64"),
])
def test_bench_bad_input_is_one_line(tiny_zip, tmp_path, capsys, args, match):
    import zipfile

    (tmp_path / "text.zip").write_text("not a zip")
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    fill = {"tmp": tmp_path, "tiny_zip": tiny_zip}
    code = main(["bench", "--variants", "combined_gap", "--bs", "8", "--steps", "1", "--rounds", "1", "--device", "cpu",
                 *[x.format(**fill) for x in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and match.format(**fill) in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the split's residency reads /proc/self")
@pytest.mark.parametrize("budget,split", [("0", "released"), ("0.001", "released"), ("1000", "kept")],
                         ids=["never", "over the budget", "fits"])
def test_bench_keeps_or_releases_the_split_as_training_would(tiny_cache, capsys, monkeypatch, budget, split):
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")  # the eager colour ops: no kernel to compile in the row's process
    p = argparse.ArgumentParser()
    add_bench_args(p)
    # fp32: what is tested is the split's residency, and bf16 is emulated, slowly, on an AVX2 CPU
    a = p.parse_args(["--variants", "combined_gap", "--bs", "8", "--steps", "1", "--rounds", "1", "--no-reference",
                      "--device", "cpu", "--data", str(tiny_cache), "--memory-budget", budget, "--no-amp"])
    rows = run_bench(a, log=print)  # decided after the warm-up, in a process of its own
    assert rows[0]["split"] == split and f"split {split}" in capsys.readouterr().out


def test_bench_runs_each_of_several_rows_in_a_fresh_process(capsys, monkeypatch):
    import alexnet.bench as bench

    def in_this_process(*args, **kwargs):
        raise AssertionError("a row of several ran in the bench's own process")

    monkeypatch.setattr(bench, "bench_variant", in_this_process)  # a fresh process imports its own
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")  # the eager colour ops: no kernel to compile in each process
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--variants", "combined_gap", "combined_small", "--bs", "4", "--steps", "1", "--rounds", "1",
                      "--no-reference", "--device", "cpu", "--no-amp"])  # fp32: bf16 is emulated on AVX2 CPUs
    rows = run_bench(a, log=print)
    assert [r["variant"] for r in rows] == ["combined_gap", "combined_small"]
    assert all(r["model"] > 0 and r["project"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "combined_gap " in out and "combined_small " in out and out.count("(2)/(1)") == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the row's process in /proc")
def test_a_bench_row_ends_with_a_bench_that_is_killed():
    """Killed outright, the bench cannot stop the process running its row: that process must
    not train on alone for minutes, holding memory and the cores."""
    kill_leaves_no_children(["bench", "--variants", "combined_gap", "combined_small", "--bs", "4", "--steps", "100000",
                             "--rounds", "1", "--no-reference", "--device", "cpu", "--no-amp"], 1,
                            env={**os.environ, "ALEXNET_FUSED_AUGMENT": "0"})


def test_bench_profiles_both_paths(capsys, monkeypatch):
    # --profile: per step, the ops of (1) and (2) ((2) adds the data path's), the host's time,
    # and the GPU's only on CUDA; printed by the bench's own process for rows run in others.
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")  # the eager colour ops: no kernel to compile in each process
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--variants", "combined_gap", "combined_small", "--bs", "4", "--steps", "1", "--rounds", "1",
                      "--no-reference", "--device", "cpu", "--profile", "--no-amp"])  # fp32: bf16 is emulated on AVX2
    rows = run_bench(a, log=print)
    out = capsys.readouterr().out
    for r in rows:
        one, two = r["profile"]["(1)"], r["profile"]["(2)"]
        assert two["ops"] > one["ops"] > 20 and one["host_ms"] > 0 and two["host_ms"] > 0
        assert one["device_ms"] is None and two["device_ms"] is None
        assert f"{r['variant']:<15} per step: (1) {one['ops']:.0f} ops, host {one['host_ms']:.2f} ms, wall " in out


def test_profiled_counts_the_ops_that_would_launch_kernels():
    from alexnet.stepprofile import profiled

    x, w = torch.randn(8, 4), torch.randn(3, 4)

    def step():  # add, then a view (nothing to launch), an in-place mul, and linear (its addmm inside)
        (x + 1).view(-1).mul_(2)
        torch.nn.functional.linear(x, w)

    assert profiled(step, 3, torch.device("cpu")) == (3.0, None)


class _ExitOnArrival:
    """Unpickled in the row's process, it ends that process at once, with exit code 3."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_bench_row_whose_process_dies_is_a_clear_error():
    from alexnet.bench import _row_in_fresh_process
    from alexnet.errors import UserError

    with pytest.raises(UserError, match=r"bench of combined_gap: the process died \(exit code 3\)"):
        _row_in_fresh_process("combined_gap", argparse.Namespace(data=_ExitOnArrival()), None)


def test_a_bench_row_that_fails_in_its_own_process_is_a_clear_error():
    from alexnet.bench import _row_in_fresh_process
    from alexnet.errors import UserError

    incomplete = argparse.Namespace(data=None, device="cpu")  # no --recipe: the row fails over there
    with pytest.raises(UserError, match="bench of combined_gap: AttributeError: .*'recipe'"):
        _row_in_fresh_process("combined_gap", incomplete, None)


def test_bench_compares_settings_on_and_off(capsys, monkeypatch):
    import alexnet.bench as bench

    built = []  # (amp, channels_last, compile) of each model the comparison trains
    real = bench._trainable
    monkeypatch.setattr(bench, "_trainable", lambda cfg, dev, **kw: (built.append((cfg.amp, cfg.channels_last, cfg.compile)),
                                                               real(cfg, dev, **kw))[1])
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--compare", "amp", "channels_last", "--variants", "combined_gap", "--bs", "4", "--steps", "2",
                      "--rounds", "1", "--device", "cpu"])
    rows = run_bench(a, log=print)
    # on, then off; each pair differs in its setting only, the rest at the command's values
    assert built == [(True, True, False), (False, True, False), (True, True, False), (True, False, False)]
    assert [r["setting"] for r in rows] == ["amp", "channels_last"]
    assert all(r["variant"] == "combined_gap" and r["on"] > 0 and r["off"] > 0 and r["on/off"] > 0 for r in rows)
    assert "on/off" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse names the settings it knows
        p.parse_args(["--compare", "fp16"])


def test_bench_compile_mode_reaches_torch_compile(capsys, monkeypatch):
    """`--compile-mode` is torch.compile's mode for the compiled side of `--compare compile`
    (the compiler itself stubbed: what is checked is the wiring, not inductor)."""
    import alexnet.bench as bench

    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: (modes.append(mode), model)[1])
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--compare", "compile", "--compile-mode", "reduce-overhead", "--variants", "combined_gap",
                      "--bs", "4", "--steps", "1", "--rounds", "1", "--device", "cpu"])
    run_bench(a, log=print)
    assert modes == ["reduce-overhead"]  # the compiled side only
    assert "(mode reduce-overhead)" in capsys.readouterr().out
    assert bench._step_marker(True, "reduce-overhead", torch.device("cpu"))() is None  # no CUDA graphs on a CPU
    with pytest.raises(SystemExit):
        p.parse_args(["--compile-mode", "fast"])


def test_reference_pipeline_yields_normalised_batches(tmp_path):
    """Without augmentation each image of a batch is one of the JPEGs as PIL decodes it,
    normalised, with its folder's label; with the combined recipe the shapes hold."""
    import numpy as np
    from PIL import Image

    folder = _jpeg_folder(None, tmp_path / "jpeg", per_class=2, classes=3)
    stats = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
    mean, std = torch.tensor(stats["mean"]).view(3, 1, 1), torch.tensor(stats["std"]).view(3, 1, 1)
    classes = sorted(p.name for p in folder.iterdir())
    expected = [((torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) / 255 - mean) / std,
                 classes.index(f.parent.name)) for f in sorted(folder.glob("*/*"))]
    x, y = next(_reference_loader(folder, RECIPES["baseline"], 4, stats))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    for xi, yi in zip(x, y.tolist()):
        assert any(torch.allclose(xi, e, atol=1e-5) and yi == label for e, label in expected)
    x, y = next(_reference_loader(folder, RECIPES["combined"], 4, stats))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and y.max() < 3


@pytest.mark.parametrize("recipe,kinds", [
    ("baseline", ["ToTensor", "Normalize"]),
    ("randomcrop", ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]),
    ("pixel", ["ColorJitter", "ToTensor", "_Noise", "Normalize"]),
    ("combined", ["RandomCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "_Noise", "Normalize"]),
    ("paper", ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "_Lighting", "Normalize"]),
])
def test_the_reference_pipeline_does_each_recipe_s_work(recipe, kinds):
    """(3) does per image what (2) does per batch: no augmentation of the recipe left out, so
    (2)/(3) compares data paths doing the same work."""
    from alexnet.bench import _reference_transforms

    stats = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "eigval": [0.2, 0.02, 0.004],
             "eigvec": torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0].tolist()}
    tf = _reference_transforms(RECIPES[recipe], stats)
    assert [type(t).__name__ for t in tf.transforms] == kinds
    assert tf.transforms[-1].std == ([1 / 255] * 3 if recipe == "paper" else stats["std"])  # the paper's raw pixels
    from PIL import Image

    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    if recipe == "paper":  # lighting: one colour shift for every pixel, eigvec @ (alpha * eigval), alpha ~ N(0, 0.1)
        torch.manual_seed(1)
        alpha = torch.randn(3) * 0.1
        torch.manual_seed(1)
        lit = tf.transforms[4](torch.full((3, 64, 64), 0.5))
        shift = torch.tensor(stats["eigvec"]) @ (alpha * torch.tensor(stats["eigval"]))
        torch.testing.assert_close(lit, (0.5 + shift)[:, None, None].expand(3, 64, 64))
    if recipe == "pixel":  # noise of the recipe's std, per pixel
        noisy = tf.transforms[2](torch.full((3, 64, 64), 0.5))
        assert abs((noisy - 0.5).std().item() - 0.03) < 0.003
    assert tf(grey).shape == (3, 64, 64)


def test_bench_pairs_its_ratios_and_starts_each_block_of_3_in_step(tiny_zip, monkeypatch, capsys):
    """The order of the timed units: (1) and (2) alternating, carried on across rounds, then a
    block of (3) per round, after untimed steps on the batches its workers prefetched; (2)/(3)
    the median of each round's ratio (drift between rounds cancels), (2)/(1) of each pair's."""
    import alexnet.bench as bench

    order, fetched = [], [0]
    figures = {"model_only": iter([100.0] * 6), "project": iter([200.0, 200.0, 200.0, 600.0, 600.0, 600.0]),
               "reference": iter([100.0, 600.0])}

    def timed(step, steps, bs, dev):  # scripted figures instead of the clock
        order.append(step.__name__)
        return next(figures[step.__name__])

    real_loader = bench._reference_loader

    def counting_loader(*args):
        for batch in real_loader(*args):
            fetched[0] += 1
            yield batch

    monkeypatch.setattr(bench, "_timed", timed)
    monkeypatch.setattr(bench, "_reference_loader", counting_loader)
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--variants", "combined_gap", "--bs", "8", "--steps", "3", "--rounds", "2", "--device", "cpu",
                      "--no-amp", "--jpeg-zip", str(tiny_zip), "--reference-bs", "8"])
    row, = run_bench(a, log=print)
    m, p2, r = "model_only", "project", "reference"
    assert order == [m, p2, p2, m, m, p2, r, p2, m, m, p2, p2, m, r]
    assert fetched[0] == 2 + 2 * bench.REFERENCE_WORKERS * bench.REFERENCE_PREFETCH  # warm-up, then each block's
    assert row["project/typical"] == pytest.approx(1.5)  # rounds 2.0 and 1.0; the medians' ratio would be 400/350
    assert row["project/model"] == pytest.approx(4.0) and row["typical"] == 350.0
    assert "(2)/(3) 1.50" in capsys.readouterr().out


def test_bench_reads_the_cache_training_reads(tiny_cache, monkeypatch, capsys):
    """Without --data, (2) reads the cache `alexnet train` would ($ALEXNET_DATA or ./data),
    not a synthetic one; its size bounds --bs."""
    monkeypatch.setenv("ALEXNET_DATA", str(tiny_cache))
    assert main(["bench", "--variants", "combined_gap", "--bs", "64", "--device", "cpu", "--no-reference"]) == 2
    assert capsys.readouterr().err == (f"error: --bs 64 is larger than the 48 training images of {tiny_cache}: "
                                       "(2) would have no batch\n")
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--variants", "combined_gap", "--bs", "8", "--steps", "1", "--rounds", "1", "--device", "cpu",
                      "--no-amp", "--no-reference"])
    run_bench(a, log=print)
    assert f"data: {tiny_cache};" in capsys.readouterr().out


@needs_compiler
def test_training_runs_the_fused_kernel_and_learns_as_the_eager_ops(learnable_cache, tmp_path, capsys, monkeypatch,
                                                                   recwarn):
    # The colour recipe through the compiled kernel (on the CPU, by default) and through the
    # eager ops: the same batches up to rounding, so the same losses to training's amplification.
    fused = _train(learnable_cache, tmp_path / "fused", "--recipe", "combined")
    assert "compiling the augmentation kernel" in capsys.readouterr().out
    assert not [w for w in recwarn if "augmentation kernel" in str(w.message)]  # it was compiled
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")
    eager = _train(learnable_cache, tmp_path / "eager", "--recipe", "combined")
    assert "compiling the augmentation kernel" not in capsys.readouterr().out
    # Epoch 1 agrees to ~1e-5; by epoch 2, training at lr 0.05 has amplified the rounding
    # differences to 0.3-1.1% on some seeds (measured: 0.4453 against 0.4503), so that epoch
    # is held to "learns as much", not to the last digits.
    assert fused[0] == pytest.approx(eager[0], rel=1e-3)
    assert fused[1] == pytest.approx(eager[1], rel=3e-2)
    assert fused[1] < 0.8 * fused[0]


def test_a_batch_makes_no_constants_and_the_step_seed_is_torchs(monkeypatch):
    """The eager data path (CUDA's) makes its shape-only tensors once, not per batch: on a GPU,
    where a step is bound by kernel launches, each costs one. And the dropout seed set every
    step seeds the generator torch.manual_seed would (seed_torch skips its slow lazy queue)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alexnet.augment import BatchAugment
    from alexnet.distributed import Dist
    from alexnet.loader import FastBatches, epoch_order, seed_torch

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")
    x = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    y = torch.randint(0, 4, (64,))
    for name, recipe in RECIPES.items():
        aug = BatchAugment(recipe, 64, [0.5] * 3, [0.25] * 3, [0.2, 0.02, 0.004], torch.eye(3).tolist(),
                           generator=torch.Generator())
        it = FastBatches(x, y, aug, 16)(epoch_order(64, 0, 0, Dist(), 16), 0)
        next(it)
        ops = Ops()
        with ops:
            next(it)
        made = [n for n in ops.names if n in ("ones", "zeros", "full", "fill_", "arange")]
        assert not made, (name, made)
        assert ops.names.count("index_select") >= 1, name  # the batch was read: the mode saw the ops

    torch.manual_seed(5)
    a = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    torch.manual_seed(0)
    seed_torch(5)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000), 0.5), a)


@pytest.mark.parametrize("device,seeded", [("cuda", 1), ("cuda:0", 0)])
def test_step_seed_starts_cuda_before_reading_its_generators(monkeypatch, device, seeded):
    """torch.cuda.default_generators is an empty tuple until CUDA starts (a fresh process):
    seed_torch starts it before it picks the device's generator. Simulated on the CPU (CUDA's
    start-up replaced by one that fills the tuple, current device 1); the real thing is
    tests/test_cuda.py's, on a GPU."""
    from alexnet.loader import seed_torch

    gens = (torch.Generator(), torch.Generator())
    monkeypatch.setattr(torch.cuda, "default_generators", ())
    monkeypatch.setattr(torch.cuda, "init", lambda: setattr(torch.cuda, "default_generators", gens))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    seed_torch(7, torch.device(device))
    assert [g.initial_seed() == 7 for g in gens] == [i == seeded for i in range(2)]
