"""CUDA checks, run on a GPU machine (scripts/gpu_bench.sh runs them); skipped elsewhere."""

import numpy as np
import pytest
import torch

from alexnet.augment import RECIPES, BatchAugment, Recipe
from alexnet.cli import main
from alexnet.models import VARIANTS, create_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MEAN, STD = [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]
EIG = ([0.2, 0.02, 0.004], torch.eye(3).tolist())


@pytest.mark.parametrize("name", list(RECIPES))
def test_augmentation_matches_cpu(name):
    x = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8)
    cpu = BatchAugment(RECIPES[name], 64, MEAN, STD, *EIG, device="cpu")
    gpu = BatchAugment(RECIPES[name], 64, MEAN, STD, *EIG, device="cuda")
    cpu.fused = None  # the CPU's eager ops, as the GPU runs them (the CPU's kernel against them: test_augment)
    assert gpu.device == x.cuda().device  # "cuda" settled to "cuda:N", as tensors report it
    p = cpu.sample(16, 64)
    p_gpu = type(p)(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()})
    torch.testing.assert_close(gpu(x.cuda(), params=p_gpu).cpu(), cpu(x, params=p), atol=1e-4, rtol=1e-4)
    # the training path reads the batch straight out of a cache held on the GPU
    ids = torch.arange(15, -1, -1)
    cache = x.flip(0).contiguous().cuda()
    torch.testing.assert_close(gpu(cache, params=p_gpu, ids=ids.cuda()).cpu(), cpu(x, params=p), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_step_bf16(name):
    model = create_model(name, 200).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    x = torch.randn(32, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), torch.randint(0, 200, (32,), device="cuda"))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_train_and_evaluate_on_cuda(tiny_cache, tmp_path):
    assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path),
                 "--device", "cuda", "--num_classes", "4", "--bs", "8", "--epochs", "2", "--amp", "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path / "best.pth"), "--data", str(tiny_cache), "--device", "cuda",
                 "--tta", "10crop"]) == 0
    from alexnet.inference import run_evaluate

    # A CUDA-trained checkpoint evaluates on the CPU to the same figures (fp32 both ways;
    # cuDNN's TF32 convolutions round differently: at most one image may change its class).
    for tta in ("none", "10crop"):
        gpu, cpu = (run_evaluate(None, tmp_path / "best.pth", data=str(tiny_cache), device=dev, tta=tta, amp=False,
                                 log=lambda *_: None) for dev in ("cuda", "cpu"))
        assert gpu["n"] == cpu["n"] > 0
        assert abs(gpu["loss"] - cpu["loss"]) < 1e-2 * max(1.0, cpu["loss"]), tta
        assert abs(gpu["top1"] - cpu["top1"]) <= 100 / cpu["n"] + 1e-9, tta


def test_predict_on_cuda_matches_cpu(tiny_cache, tmp_path):
    from PIL import Image

    from alexnet.inference import run_predict

    assert main(["train", "--variant", "baseline", "--data", str(tiny_cache), "--out", str(tmp_path / "run"),
                 "--device", "cuda", "--num_classes", "4", "--bs", "8", "--epochs", "1", "--no-progress"]) == 0
    g = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(g.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(images[-1])
    gpu, cpu = (run_predict(tmp_path / "run" / "best.pth", images, device=dev, log=lambda *_: None)
                for dev in ("cuda", "cpu"))
    for a, b in zip(gpu, cpu):  # top-5 of 4 classes: every class's probability
        pa, pb = ({w: p for w, _, p in rows} for rows in (a, b))
        assert pa.keys() == pb.keys() and len(pa) == 4
        assert all(abs(pa[w] - pb[w]) < 1e-3 for w in pa), (pa, pb)


def test_stop_and_resume_on_cuda_matches_uninterrupted(learnable_cache, tmp_path, monkeypatch):
    """Stopped mid-epoch on CUDA and resumed: it ends where the uninterrupted run does (both
    with --deterministic; a tolerance for what cuDNN does not promise bit for bit)."""
    import os
    import signal

    from alexnet import train
    from tests.test_reliability import run_args, strip_times

    args = [*run_args(learnable_cache, tmp_path / "full"), "--epochs", "2", "--device", "cuda"]
    assert main(["train", *args]) == 0
    steps, real = [], train.train_step

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    cut = [*run_args(learnable_cache, tmp_path / "cut"), "--epochs", "2", "--device", "cuda"]
    with pytest.raises(SystemExit):
        main(["train", *cut])
    monkeypatch.setattr(train, "train_step", real)
    assert main(["train", *cut, "--resume"]) == 0
    a, b = (torch.load(tmp_path / r / "last.pth", weights_only=False) for r in ("full", "cut"))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    ha, hb = strip_times(a["history"]), strip_times(b["history"])
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb]
    np.testing.assert_allclose([r["val_loss"] for r in hb], [r["val_loss"] for r in ha], rtol=1e-3)


def test_splits_kept_on_the_host_train_as_on_the_gpu(learnable_cache, tmp_path, monkeypatch, capsys):
    """Splits too large for the GPU stay on the host and each batch is gathered there and
    copied: the same batches, so the same run as with the splits on the GPU."""
    from alexnet import loader
    from tests.test_reliability import run_args, strip_times

    args = ["--epochs", "2", "--device", "cuda"]
    assert main(["train", *run_args(learnable_cache, tmp_path / "gpu"), *args]) == 0
    assert "host memory" not in capsys.readouterr().out
    monkeypatch.setattr(loader, "GPU_SPLIT_SHARE", 0.0)
    assert main(["train", *run_args(learnable_cache, tmp_path / "host"), *args]) == 0
    out = capsys.readouterr().out
    assert "the training split" in out and "the validation split" in out and "stays in host memory" in out
    a, b = (torch.load(tmp_path / r / "last.pth", weights_only=False) for r in ("gpu", "host"))
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    np.testing.assert_allclose([r["val_loss"] for r in strip_times(b["history"])],
                               [r["val_loss"] for r in strip_times(a["history"])], rtol=1e-3)


def test_cpu_checkpoint_resumes_on_cuda(learnable_cache, tmp_path, monkeypatch):
    from tests.test_reliability import run_args

    # The CPU half on the eager ops: compiling the CPU's augmentation kernel takes a minute
    # cold on a fresh GPU machine, and the resume does not depend on it (the GPU runs them too).
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "0")

    out = tmp_path / "o"
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1"]) == 0
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "2", "--device", "cuda", "--resume"]) == 0
    ck = torch.load(out / "last.pth", weights_only=False)
    assert ck["epoch"] == 2 and len(ck["history"]) == 2
    assert all(np.isfinite(r["val_loss"]) for r in ck["history"])


def test_noise_window_copy_at_training_size():
    # CUDA reads each batch's noise window by a device-side copy from a very large unfolded
    # view (index_select's general path there); the CPU by a plain view.
    from alexnet.augment import NOISE_TABLE, _window

    n = 256 * 64 * 64 * 3
    table = torch.randint(-127, 128, (n + NOISE_TABLE,), dtype=torch.int8)
    for start in (0, 12345, NOISE_TABLE):
        got = _window(table.cuda(), torch.tensor([start], device="cuda"), n, copy=True)
        assert torch.equal(got.cpu(), table[start:start + n]), start


def test_split_copied_to_the_gpu_leaves_the_host_resident_set(tmp_path):
    from alexnet.loader import to_memory
    from tests.test_memory import mapped_split, rss_file_mib

    x, data = mapped_split(tmp_path)
    torch.zeros(1, device="cuda")  # CUDA's own start-up maps libraries: not what is measured
    before = rss_file_mib()
    t = to_memory(x, torch.device("cuda"))  # reads every page of the mapping
    assert rss_file_mib() - before < 16
    assert t.is_cuda and torch.equal(t[::997].cpu(), torch.from_numpy(data[::997]))
    # The measure sees such reads at all: the same pages read and kept by the host count.
    assert int(np.asarray(x).sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))
    assert rss_file_mib() - before > 32


def test_settled_device_has_its_index_and_cudnn_timing_follows_determinism():
    from alexnet.train import settle_device

    before = torch.backends.cudnn.benchmark
    try:
        dev = settle_device(torch.device("cuda"))
        assert dev == torch.zeros(1, device="cuda").device and torch.backends.cudnn.benchmark
        assert settle_device(torch.device("cuda"), deterministic=True) == dev and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("name", ["baseline", "dropout"])
def test_fc1_fold_matches_copies(name):
    """FC1 on summed weights (alexnet/models.py) gives the logits and FC1 gradient of the 36
    copies on the GPU too (TF32 off: cuBLAS's reduced precision would swamp the comparison)."""
    import copy

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        folded = create_model(name, 200).cuda().eval()
        folded.fold_fc1 = True
        plain = copy.deepcopy(folded)
        plain.fold_fc1 = False
        x = torch.randn(16, 3, 64, 64, device="cuda")
        y = torch.randint(0, 200, (16,), device="cuda")
        outs = []
        for m in (folded, plain):
            out = m(x)
            torch.nn.functional.cross_entropy(out, y, reduction="sum").backward()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        g_f, g_p = folded.classifier[1].weight.grad, plain.classifier[1].weight.grad
        assert g_p.abs().max() > 1e-3  # a gradient large enough for the comparison to mean something
        torch.testing.assert_close(g_f, g_p, rtol=1e-4, atol=1e-4 * g_p.abs().max().item())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_step_seed_seeds_dropout_on_the_gpu_as_torch_manual_seed(device):
    from alexnet.loader import seed_torch

    x = torch.ones(100_000, device="cuda")
    torch.manual_seed(3)
    a = torch.nn.functional.dropout(x, 0.5)
    torch.manual_seed(0)
    seed_torch(3, torch.device(device))
    assert torch.equal(torch.nn.functional.dropout(x, 0.5), a)


def test_step_seed_before_cuda_has_started():
    """In a fresh process torch.cuda.default_generators is empty until CUDA starts: seed_torch
    must start it rather than index the empty tuple."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from alexnet.loader import seed_torch\n"
            "assert not torch.cuda.is_initialized()\n"
            "seed_torch(3, torch.device('cuda'))\n"
            "a = torch.nn.functional.dropout(torch.ones(100_000, device='cuda'), 0.5)\n"
            "torch.manual_seed(3)\n"
            "assert torch.equal(torch.nn.functional.dropout(torch.ones(100_000, device='cuda'), 0.5), a)\n")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]  # the checkout, installed or not
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("recipe", [RECIPES["pixel"], RECIPES["combined"],
                                    Recipe(crop_pad=2, flip=True, lighting_std=0.1, noise_std=0.05)],
                         ids=["pixel", "combined", "lighting64"])
def test_fused_kernel_on_the_gpu_gives_the_cpus_pixels(monkeypatch, recipe):
    """ALEXNET_FUSED_AUGMENT=all: the colour ops compiled for CUDA (Triton), reading the batch
    by ids out of a cache on the GPU as training does, give the CPU's eager pixels."""
    monkeypatch.setenv("ALEXNET_FUSED_AUGMENT", "all")
    x = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8)
    gpu = BatchAugment(recipe, 64, MEAN, STD, *EIG, device="cuda")
    cpu = BatchAugment(recipe, 64, MEAN, STD, *EIG, device="cpu")
    cpu.fused = None  # the eager ops
    assert gpu.fuses(64)
    p = cpu.sample(16, 64)
    p_gpu = type(p)(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()})
    ids = torch.arange(15, -1, -1)
    out = gpu(x.flip(0).contiguous().cuda(), params=p_gpu, ids=ids.cuda())
    assert gpu.fused.failed is None and gpu.fused.calls == 1  # the kernel made the batch
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.cpu(), cpu(x, params=p), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("amp", [False, True])
def test_a_training_step_never_waits_for_the_gpu(recipe, amp):
    """The step as training and the bench run it (reseed, the next batch gathered and augmented
    out of a cache on the GPU, forward, backward, fused SGD) never synchronises with the GPU:
    a step bound by kernel launches would otherwise leave it idle while the host launches the
    next one. The epoch's order goes to the GPU once, in the warm-up."""
    from alexnet.config import TrainConfig
    from alexnet.distributed import Dist
    from alexnet.loader import FastBatches, epoch_order, seed_torch, step_seed
    from alexnet.train import build_optimizer, train_step

    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = TrainConfig(variant="combined_gap", bs=16, amp=amp, channels_last=True).validate()
    model = create_model(cfg.variant, 200).to(dev, memory_format=torch.channels_last).train()
    opt = build_optimizer(cfg, model, fused=True)
    gen = torch.Generator(device=dev)
    aug = BatchAugment(RECIPES[recipe], 64, MEAN, STD, *EIG, device=dev, generator=gen)
    x = torch.randint(0, 256, (96, 64, 64, 3), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 200, (96,), device=dev)
    it = FastBatches(x, y, aug, cfg.bs)(epoch_order(96, 0, 0, Dist(), cfg.bs), 0)

    def step(i):
        s = step_seed(0, 0, i)
        gen.manual_seed(s)
        seed_torch(s, dev)
        xb, yb = next(it)
        train_step(model, opt, xb, yb, cfg, dev)

    step(0), step(1)  # warm-up: the order's copy, tables, constants, cuDNN's choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 6):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_profiled_counts_the_gpus_kernels_and_busy_time():
    """`alexnet bench --profile` on CUDA: the kernels of a step and their summed time."""
    from alexnet.stepprofile import profiled

    x = torch.randn(512, 512, device="cuda")

    def step():  # three kernels: a matmul, an add, a relu; the range (as the optimizer's) is no kernel
        with torch.profiler.record_function("a range"):
            torch.relu(x @ x + 1)

    step()
    ops, busy = profiled(step, 3, torch.device("cuda"))
    assert ops is not None, "the profiler recorded no CUDA events (CUPTI)"
    assert 3 <= ops <= 6 and busy > 0


def test_model_output_check_in_training_mode_moves_nothing_on_the_gpu():
    """The training-mode check of a model file on CUDA draws dropout on the GPU: the CUDA
    generator and BatchNorm's statistics are as they were afterwards."""
    from alexnet.userfiles import check_model_output

    dev = torch.device("cuda", torch.cuda.current_device())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.LazyLinear(4)).to(dev)
    model(torch.ones(2, 3, 64, 64, device=dev))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state(dev)
    check_model_output("m.py", model, 4, 64, dev, True, True, training=True)
    assert torch.equal(torch.cuda.get_rng_state(dev), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
