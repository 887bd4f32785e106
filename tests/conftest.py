"""Shared fixtures: a synthetic TinyImageNet layout, its zip, its prepared cache, and the
real archive when $TINYIMAGENET_ZIP points to it. Session-scoped fixtures are shared:
tests must not modify them (copy first)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`-n auto`, the README's command) the workers share the machine's cores,
# so each worker, and each process a test starts, gets its share of them as torch's threads:
# with every worker running one thread per core, the threads waited on each other (2 cores:
# user time 1.6x, the suite no faster than without xdist). Set before torch is imported, which
# reads it then; an OMP_NUM_THREADS of the caller's own is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))

from alexnet.data import prepare  # noqa: E402  (after OMP_NUM_THREADS: imports torch)
from tests.synth import make_tiny_imagenet, make_zip

TINY_COUNTS = (4, 12, 4)  # classes, train per class, val per class of the synthetic set

# torch.compile's CPU backend builds C++ with $CXX, else g++ (clang++ on macOS). Without one
# the augmentation kernel (alexnet/fused.py) cannot exist and the eager ops run instead: the
# tests that expect the kernel skip; the fallback is tested by faking a failing compiler.
_CXX = shlex.split(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++"))
needs_compiler = pytest.mark.skipif(not _CXX or not shutil.which(_CXX[0]),
                                    reason="no C++ compiler for torch.compile's CPU backend")


def quiet(*args: object) -> None:
    """A `log` that prints nothing."""


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees bf16 as native to the device, so that `--amp` runs the same configs and
    checkpoints on a CPU without it (AVX2 only: bf16 emulated there, slower, still correct).
    The fp32 fallback that training, evaluation and the bench take on such a CPU, and the
    detection itself, are tested in test_precision.py."""
    monkeypatch.setattr("alexnet.precision.bf16_emulated", lambda device: None)


@pytest.fixture(autouse=True)
def no_default_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default cache ($ALEXNET_DATA, else ./data) is a folder that holds none: a command
    given no --data (the bench, which then reads the cache training would) must not find a
    user's real cache, or the tests would run on it. Tests of the default set their own."""
    monkeypatch.setenv("ALEXNET_DATA", str(tmp_path_factory.getbasetemp() / "no_default_cache"))


@pytest.fixture(autouse=True)
def onednn_fp32_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 convolutions keep oneDNN's weight gradient in every test, as on an AVX512 CPU,
    so that the suite runs the same paths on any CPU; the products that an AVX2 CPU takes in
    fp32 are tested in test_smallconv.py with this switched on."""
    monkeypatch.setattr("alexnet.smallconv.FP32_PAYS", False)


@pytest.fixture(scope="session")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-imagenet-200/ folder of a 4-class synthetic set (12 train, 4 val per class)."""
    classes, train, val = TINY_COUNTS
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny_layout"), classes, train, val)


@pytest.fixture(scope="session")
def tiny_zip(tiny_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zip(tiny_layout, tmp_path_factory.mktemp("tiny_zip") / "tiny-imagenet-200.zip")


@pytest.fixture(scope="session")
def tiny_cache(tiny_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory prepared from tiny_zip (open it with alexnet.data.open_cache)."""
    return prepare(tiny_zip, tmp_path_factory.mktemp("tiny_cache"), counts=TINY_COUNTS, workers=1, log=quiet)


@pytest.fixture(scope="session")
def real_zip() -> Path:
    """The real TinyImageNet-200 archive; skips unless $TINYIMAGENET_ZIP names a file."""
    path = os.environ.get("TINYIMAGENET_ZIP")
    if not path or not Path(path).is_file():
        pytest.skip("set TINYIMAGENET_ZIP to the real tiny-imagenet-200.zip to run this test")
    return Path(path)


@pytest.fixture(scope="session")
def learnable_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger synthetic cache (4 classes, 48 train and 12 val each) for training tests that
    must learn: enough images for a few batches of 16 per epoch."""
    layout = make_tiny_imagenet(tmp_path_factory.mktemp("learnable_layout"), 4, 48, 12, seed=3)
    return prepare(layout, tmp_path_factory.mktemp("learnable_cache"), counts=(4, 48, 12), workers=1, log=quiet)
