"""CUDA checks, run on a GPU machine (scripts/gpu_bench.sh runs them); skipped elsewhere."""

import pytest
import torch

from alexnet.augment import RECIPES, BatchAugment
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
    from alexnet import checkpoint

    ck = checkpoint.load(tmp_path / "best.pth")  # a CUDA-trained checkpoint loads on the CPU
    assert all(v.device.type == "cpu" for v in ck["model"].values())


def test_split_copied_to_the_gpu_leaves_the_host_resident_set(tmp_path):
    from alexnet.loader import to_memory
    from tests.test_memory import mapped_split, rss_file_mib

    x, data = mapped_split(tmp_path)
    torch.zeros(1, device="cuda")  # CUDA's own start-up maps libraries: not what is measured
    before = rss_file_mib()
    t = to_memory(x, torch.device("cuda"))  # reads every page of the mapping
    assert rss_file_mib() - before < 16
    assert t.is_cuda and torch.equal(t[::997].cpu(), torch.from_numpy(data[::997]))


def test_settled_device_has_its_index_and_cudnn_timing_follows_determinism():
    from alexnet.train import settle_device

    before = torch.backends.cudnn.benchmark
    try:
        dev = settle_device(torch.device("cuda"))
        assert dev == torch.zeros(1, device="cuda").device and torch.backends.cudnn.benchmark
        assert settle_device(torch.device("cuda"), deterministic=True) == dev and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before
