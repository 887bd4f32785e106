"""`--amp` where the device has no native bf16 (an AVX2-only CPU, a pre-Ampere GPU): training,
evaluation, the ablation study and the bench run in fp32 and say why; the run's config and
checkpoints record fp32, so that the run resumes. (Every other test sees bf16 as native:
conftest.native_bf16.)"""

import argparse
import json

import pytest
import torch
from PIL import Image

import alexnet.evaluate
import alexnet.train
from alexnet.cli import main
from alexnet.precision import bf16_emulated, resolve_amp

REASON = "this CPU (AVX2 vector unit) has no native bf16 arithmetic (a test's stand-in)"
QUICK = ["--variant", "combined_gap", "--device", "cpu", "--num_classes", "4", "--bs", "8", "--max-steps", "2",
         "--no-progress"]


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr("alexnet.precision.bf16_emulated", lambda device: REASON)


@pytest.fixture
def autocasts(monkeypatch):
    """The `enabled` of every autocast training and evaluation entered."""
    seen = []

    def spy(device, enabled):
        seen.append(enabled)
        return alexnet.evaluate.nullcontext()

    monkeypatch.setattr(alexnet.train, "autocast", spy)
    monkeypatch.setattr(alexnet.evaluate, "autocast", spy)
    return seen


def test_resolve_amp(monkeypatch):
    said = []
    cpu = torch.device("cpu")
    assert resolve_amp(True, cpu, said.append) and not said  # native (conftest)
    assert not resolve_amp(False, cpu, said.append) and not said
    monkeypatch.setattr("alexnet.precision.bf16_emulated", lambda device: REASON)
    assert not resolve_amp(True, cpu, said.append)
    assert len(said) == 1 and said[0].startswith("warning: --amp: " + REASON) and "running in fp32" in said[0]
    assert not resolve_amp(False, cpu, said.append) and len(said) == 1  # nothing asked, nothing said


@pytest.fixture
def real_detection(monkeypatch):
    """The real detection, not conftest's stand-in, its per-process answers forgotten before
    and after (a test's fakes must not stay cached)."""
    import alexnet.precision as precision

    monkeypatch.undo()
    caches = (precision._cpu_reason, precision._cuda_reason)
    for c in caches:
        c.cache_clear()
    yield precision
    for c in caches:
        c.cache_clear()


def test_cpu_detection_is_pytorchs_own(real_detection, monkeypatch):
    """The CPU check is oneDNN's (the one PyTorch's bf16 tests use), and a reason names the
    vector unit; a build without the check trusts --amp."""
    cpu = torch.device("cpu")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    reason = bf16_emulated(cpu)
    assert (reason is None) == native
    if reason is not None:
        assert torch.backends.cpu.get_cpu_capability() in reason
    real_detection._cpu_reason.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert "no native bf16" in bf16_emulated(cpu) and not resolve_amp(True, cpu)
    real_detection._cpu_reason.cache_clear()

    def missing():
        raise RuntimeError("No such operator mkldnn::_is_mkldnn_bf16_supported")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing, raising=False)
    assert bf16_emulated(cpu) is None and resolve_amp(True, cpu)


@pytest.mark.parametrize("capability,native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_detection_by_compute_capability(real_detection, monkeypatch, capability, native):
    """A GPU computes bf16 natively from compute capability 8.0 (Ampere) on; PyTorch's own
    check decides, and the reason names the GPU (faked here: no GPU needed)."""
    from contextlib import nullcontext

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "device", lambda d: nullcontext())
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or cuda.get_device_capability() >= (8, 0))
    reason = bf16_emulated(torch.device("cuda"))
    assert (reason is None) == native
    if not native:
        assert "Tesla T4, compute capability 7.5" in reason


def test_training_falls_back_to_fp32_records_it_and_resumes(emulated, autocasts, tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *QUICK, "--amp", "--data", str(tiny_cache), "--out", str(out)]
    assert main([*args, "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"warning: --amp: {REASON}" in printed and "amp=off" in printed
    assert autocasts and not any(autocasts)  # training steps and evaluation, all fp32
    assert json.loads((out / "config.json").read_text())["amp"] is False
    assert torch.load(out / "last.pth", weights_only=False)["config"]["amp"] is False
    # The same command continues it: what it asked for resolves to what the checkpoint holds.
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out and not any(autocasts)


def test_a_bf16_run_continues_in_fp32_where_bf16_would_be_emulated(autocasts, monkeypatch, tiny_cache, tmp_path,
                                                                    capsys):
    """Trained in bf16 on one machine, resumed with the same command on one without native bf16."""
    out = tmp_path / "run"
    args = ["train", *QUICK, "--amp", "--data", str(tiny_cache), "--out", str(out)]
    assert main([*args, "--epochs", "1"]) == 0 and all(autocasts)
    assert torch.load(out / "last.pth", weights_only=False)["config"]["amp"] is True
    autocasts.clear()
    capsys.readouterr()
    monkeypatch.setattr("alexnet.precision.bf16_emulated", lambda device: REASON)
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"warning: --amp: {REASON}" in printed and "resumed from" in printed
    assert autocasts and not any(autocasts)
    assert torch.load(out / "last.pth", weights_only=False)["config"]["amp"] is False
    # Nothing else is let through: another setting still refuses.
    assert main([*args, "--epochs", "3", "--resume", "--lr", "0.5"]) == 2
    assert "--lr 0.01 -> 0.5" in capsys.readouterr().err


def test_evaluation_of_a_bf16_checkpoint_falls_back(autocasts, monkeypatch, tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--amp", "--epochs", "1", "--data", str(tiny_cache), "--out", str(out)]) == 0
    assert autocasts and all(autocasts)  # trained in bf16 where it is native
    assert torch.load(out / "best.pth", weights_only=False)["config"]["amp"] is True
    autocasts.clear()
    capsys.readouterr()
    monkeypatch.setattr("alexnet.precision.bf16_emulated", lambda device: REASON)
    assert main(["evaluate", str(out / "best.pth"), "--data", str(tiny_cache), "--device", "cpu"]) == 0
    said = capsys.readouterr()  # the warning on stderr, out of the results' way
    fallback = said.out
    assert f"warning: --amp: {REASON}" in said.err and autocasts and not any(autocasts)
    assert main(["evaluate", str(out / "best.pth"), "--data", str(tiny_cache), "--device", "cpu", "--no-amp"]) == 0
    said = capsys.readouterr()
    fp32 = said.out
    assert "warning" not in said.err and fallback.split("tta=none: ")[1] == fp32.split("tta=none: ")[1]
    autocasts.clear()
    jpg = tmp_path / "a.jpg"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(jpg)
    assert main(["predict", str(out / "best.pth"), str(jpg), "--device", "cpu"]) == 0
    assert f"warning: --amp: {REASON}" in capsys.readouterr().err and autocasts and not any(autocasts)


def test_bench_measures_the_precision_training_would_use(emulated, capsys, monkeypatch):
    import alexnet.bench as bench
    from alexnet.bench import add_bench_args, run_bench

    built = []  # the amp of each model (1) and (2) train
    real = bench._trainable
    monkeypatch.setattr(bench, "_trainable", lambda cfg, dev, **kw: (built.append(cfg.amp), real(cfg, dev, **kw))[1])
    p = argparse.ArgumentParser()
    add_bench_args(p)
    a = p.parse_args(["--variants", "combined_gap", "--bs", "4", "--steps", "1", "--rounds", "1", "--no-reference",
                      "--device", "cpu"])  # --amp is the bench's default
    run_bench(a, log=print)
    printed = capsys.readouterr().out
    assert f"warning: --amp: {REASON}" in printed and "amp=off" in printed and a.amp  # the caller's args untouched
    assert built == [False]


def test_ablation_study_falls_back_once_and_continues(emulated, tiny_cache, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["ablate", "--variants", "baseline", "--seeds", "1", "--epochs", "1", "--max-steps", "1", "--bs", "8",
            "--amp", "--device", "cpu", "--num_classes", "4", "--data", str(tiny_cache), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("warning: --amp") == 1 and "amp off" in printed
    assert "amp off" in (out / "results.md").read_text()
    row = json.loads((out / "baseline" / "seed0" / "config.json").read_text())
    assert (row["amp"], row["channels_last"]) == (False, True)  # channels_last follows the --amp asked, as in train
    assert main(args) == 0  # the finished study's configs match what the same command resolves to
    assert "other settings" not in capsys.readouterr().err
