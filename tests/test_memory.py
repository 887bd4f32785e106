"""What keeps a CPU run's resident set down: the cache's pages leave it between the phases that
read them and every 1,024 training images within an epoch, unless the run fits --memory-budget
with the training split kept; and the optimizer's buffers made up front (for the heap's sake)
change no number."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from alexnet import loader, train
from alexnet.augment import RECIPES, BatchAugment
from alexnet.cli import main
from alexnet.config import TrainConfig
from alexnet.loader import FastBatches, drop_resident, to_memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def rss_file_mib() -> int:
    """Resident pages of mapped files (RssShmem where tmp_path is a tmpfs). Skips the test
    where the kernel does not say (gVisor's /proc has no such lines): 0 would pass anything."""
    with open("/proc/self/status") as f:
        lines = [line for line in f if line.startswith(("RssFile", "RssShmem"))]
    if not lines:
        pytest.skip("/proc/self/status has no RssFile/RssShmem lines here")
    return sum(int(line.split()[1]) for line in lines) // 1024


def mapped_split(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 48 MiB split of 64x64 images saved as .npy: (its read-only mapping, the data)."""
    data = (np.arange(48 * 2**20, dtype=np.int64) % 251).astype(np.uint8).reshape(-1, 64, 64, 3)
    np.save(tmp_path / "x.npy", data)
    return np.load(tmp_path / "x.npy", mmap_mode="r"), data


@linux
def test_a_read_mapping_leaves_the_resident_set_and_reads_back_the_same(tmp_path):
    x, _ = mapped_split(tmp_path)
    before = rss_file_mib()
    total = int(x.sum(dtype=np.int64))  # every page read in
    read_in = rss_file_mib()
    assert read_in - before >= 40, (before, read_in)
    assert drop_resident(x[5:])  # a view finds its mapping
    assert read_in - rss_file_mib() >= 40
    assert int(x.sum(dtype=np.int64)) == total


def test_a_split_too_large_for_the_gpu_stays_on_the_host(monkeypatch):
    """A split over GPU_SPLIT_SHARE of the GPU's free memory is not copied there (where it
    would run out of memory before the first step): it stays a host tensor, and the run says
    so. The share is asked of the device the run uses."""
    x = np.zeros((10, 8, 8, 3), dtype=np.uint8)  # 1,920 bytes
    asked, logs = [], []

    def free(device):
        asked.append(device)
        return 3_000, 16_000

    monkeypatch.setattr(torch.cuda, "mem_get_info", free)
    t = to_memory(x, torch.device("cuda", 1), log=logs.append, what="training split")
    assert t.device.type == "cpu" and t.data_ptr() == x.ctypes.data  # not copied
    assert asked == [torch.device("cuda", 1)]
    assert logs == ["the training split (0.0 GB) is more than 50% of the free memory of this GPU (0.0 GB) or of "
                    "another process's: it stays in host memory and each batch is copied to the GPU"]
    # Under torchrun every process makes the choice one of them needs (`agree`, an all-reduce
    # there): one that has the room still keeps the split on the host if another lacks it.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**9, 10**9))
    asked_agree = []

    def another_lacks_room(host: bool) -> bool:
        asked_agree.append(host)
        return True

    t = to_memory(x, torch.device("cuda", 0), agree=another_lacks_room)
    assert t.device.type == "cpu" and asked_agree == [False]


def test_an_array_that_is_not_a_mapping_is_left_alone(tmp_path):
    a = np.ones((4, 8, 8, 3), dtype=np.uint8)
    assert drop_resident(a) is False and drop_resident(a[1:]) is False
    assert a.sum() == a.size
    # a copy-on-write mapping holds what was written to it only in its own pages
    np.save(tmp_path / "c.npy", a)
    c = np.load(tmp_path / "c.npy", mmap_mode="c")
    c[0] = 7
    assert drop_resident(c) is False and int(c[0].max()) == 7


def test_each_phase_holds_only_the_split_it_reads(tiny_cache, tmp_path, monkeypatch):
    events = []
    real_drop, real_eval = train.drop_resident, train.evaluate

    def drop(x):
        events.append(Path(x.filename).name)
        return real_drop(x)

    def evaluate(*args, **kwargs):
        events.append("evaluate")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train, "drop_resident", drop)  # around evaluation
    monkeypatch.setattr(loader, "drop_resident", drop)  # within an epoch
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(loader, "RELEASE_IMAGES", 24)  # every 3 batches of 8
    assert main(["train", "--variant", "baseline", "--data", str(tiny_cache), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--max-steps", "4", "--epochs", "2",
                 "--no-progress", "--memory-budget", "0"]) == 0
    # within an epoch, after batch 3; then before and after each evaluation
    assert events == ["train_x.npy", "train_x.npy", "evaluate", "val_x.npy"] * 2


@linux
def test_a_split_that_fits_the_budget_stays_for_the_run(tiny_cache, tmp_path, monkeypatch, capsys):
    events = []
    real_drop, real_eval, real_read_in = train.drop_resident, train.evaluate, loader.read_in

    def drop(x):
        events.append(Path(x.filename).name)
        return real_drop(x)

    def read_in(x):
        events.append("read in " + Path(x.filename).name)
        return real_read_in(x)

    monkeypatch.setattr(train, "drop_resident", drop)
    monkeypatch.setattr(loader, "drop_resident", drop)
    monkeypatch.setattr(loader, "read_in", read_in)
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (events.append("evaluate"), real_eval(*a, **k))[1])
    monkeypatch.setattr(loader, "RELEASE_IMAGES", 24)
    assert main(["train", "--variant", "baseline", "--data", str(tiny_cache), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--max-steps", "4", "--epochs", "2",
                 "--no-progress", "--memory-budget", "1000"]) == 0
    # released once at the first release point, read back in at once, then neither within
    # the epochs nor around evaluation; the validation split still leaves after each
    assert events == ["train_x.npy", "read in train_x.npy", "evaluate", "val_x.npy", "evaluate", "val_x.npy"]
    assert "training split kept in memory (--memory-budget 1000 GB)" in capsys.readouterr().out


def residency(x, budget, rss, reserve=0):
    return loader.SplitResidency(x, budget, reserve, rss=lambda: rss[0])


def populate_read_or_skip(x):
    if not loader.read_in(x):
        pytest.skip("no MADV_POPULATE_READ (Linux 5.14+) here")


@linux
def test_the_split_is_kept_only_where_it_fits(tmp_path):
    x, _ = mapped_split(tmp_path)  # 48 MiB
    populate_read_or_skip(x)
    path = tmp_path / "x.npy"
    rss = [100 * 2**20]  # what the process reads right after a release
    fits = residency(x, budget=160 * 2**20, rss=rss, reserve=10 * 2**20)
    assert fits() is True and fits.kept  # released, then read back in whole
    assert mapping_rss_kib(path) >= 48 * 1024
    assert [fits() for _ in range(3)] == [False] * 3 and mapping_rss_kib(path) >= 48 * 1024
    tight = residency(x, budget=150 * 2**20, rss=rss, reserve=10 * 2**20)  # 100 + 48 + 10 > 150
    assert [tight() for _ in range(3)] == [True] * 3 and not tight.kept
    assert mapping_rss_kib(path) < 48 * 1024
    never = residency(x, budget=0, rss=rss)
    assert [never() for _ in range(3)] == [True] * 3 and not never.kept


@linux
def test_a_kept_split_over_the_budget_is_released_for_good(tmp_path):
    x, _ = mapped_split(tmp_path)
    rss = [100 * 2**20]
    r = residency(x, budget=200 * 2**20, rss=rss)
    assert r() and r.kept and not r() and r.state == "kept"
    rss[0] = 201 * 2**20  # the process grew past the budget
    assert r() is True and not r.kept
    rss[0] = 100 * 2**20  # and shrank again: no second read-in
    assert [r() for _ in range(2)] == [True, True] and not r.kept and r.state == "kept, then released"


@linux
@pytest.mark.parametrize("others", [False, True], ids=["all fit", "another process does not"])
def test_processes_keep_the_split_all_or_none(tmp_path, others):
    x, _ = mapped_split(tmp_path)
    wishes = []

    def agree(want):  # as torchrun's all-reduce: keep only if no process wants to release
        wishes.append(want)
        return want and not others

    r = loader.SplitResidency(x, 2**40, rss=lambda: 0, agree=agree)
    assert r() and wishes == [True] and r.kept is (not others)
    r()
    assert wishes == [True]  # asked once, at the decision


def test_an_array_in_memory_is_never_kept_or_released():
    r = residency(np.zeros((4, 64, 64, 3), dtype=np.uint8), budget=2**40, rss=[0])
    assert r() is False and not r.kept and r() is False


def mapping_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
                inside = len(head) >= 6 and Path(head[5]) == path
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@linux
@pytest.mark.parametrize("release", [False, True], ids=["kept", "released"])
def test_an_epoch_keeps_only_recent_pages_of_the_mapped_split(tmp_path, release):
    x, data = mapped_split(tmp_path)  # 4,096 images of 12 KiB
    path = tmp_path / "x.npy"
    drop_resident(x)
    after_release = []

    def release_pages():
        drop_resident(x)
        after_release.append(mapping_rss_kib(path))

    aug = BatchAugment(RECIPES["randomcrop"], 64, [0.5] * 3, [0.25] * 3, generator=torch.Generator().manual_seed(0))
    batches = FastBatches(to_memory(x, torch.device("cpu")), torch.zeros(len(x), dtype=torch.long), aug, 64,
                          release=release_pages if release else None, release_images=128)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    seen = [xb for xb, _ in batches(order, 0)]
    read = mapping_rss_kib(path)
    # the same pixels either way: pages dropped mid-epoch read back the same
    aug.generator.manual_seed(0)
    plain = FastBatches(torch.from_numpy(data), torch.zeros(len(x), dtype=torch.long), aug, 64)
    assert all(torch.equal(a, b) for a, (b, _) in zip(seen, plain(order, 0)))
    if release:
        # every 2 batches the split leaves the resident set (how much a read maps back in
        # between depends on the kernel: 64 KiB around each read, or whole large folios)
        assert after_release == [0] * (len(x) // 128)
    else:
        assert read > 40 * 1024, read


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_buffers_made_up_front_give_the_same_steps(nesterov, fused):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    b = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(lr=0.05, momentum=0.9, wd=5e-4, nesterov=nesterov)
    ours = train.build_optimizer(cfg, a, fused=fused)
    assert all(torch.count_nonzero(ours.state[p]["momentum_buffer"]) == 0 for p in a.parameters())
    lazy = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov,
                           fused=fused or None)
    for step in range(3):
        x, y = torch.randn(5, 12), torch.randint(0, 3, (5,))
        for model, opt in ((a, ours), (b, lazy)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["momentum_buffer"], lazy.state[q]["momentum_buffer"])


def test_no_momentum_no_buffers():
    model = nn.Linear(4, 2)
    assert not train.build_optimizer(TrainConfig(momentum=0.0), model, fused=True).state
