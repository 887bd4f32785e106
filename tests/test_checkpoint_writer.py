"""Checkpoints written in a background thread (alexnet.checkpoint.CheckpointWriter), as CUDA
runs write them: what lands is the state at the moment of `save`, in order, errors surface,
and a run stopped or finished with a write in flight still ends with it on disk."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from alexnet import checkpoint
from alexnet.cli import main
from tests.test_reliability import assert_same_run, run_args


def test_background_write_holds_the_state_at_save_time(tmp_path, monkeypatch):
    go, real = threading.Event(), checkpoint._write

    def held(*a):  # the write starts only after the caller has moved on and changed its state
        assert go.wait(10)
        real(*a)

    monkeypatch.setattr(checkpoint, "_write", held)
    w, history = torch.ones(4), [{"epoch": 1}]
    rng = np.random.RandomState(0).get_state()
    writer = checkpoint.CheckpointWriter(background=True)
    writer.save({"format": 1, "model": {"w": w}, "history": history, "numpy": rng}, tmp_path / "last.pth")
    w.add_(1)  # the next optimizer step, in place
    history.append({"epoch": 2})
    rng[1][0] += 1
    go.set()
    writer.close()
    saved = torch.load(tmp_path / "last.pth", weights_only=False)
    assert torch.equal(saved["model"]["w"], torch.ones(4))
    assert saved["history"] == [{"epoch": 1}]
    assert saved["numpy"][1][0] == np.random.RandomState(0).get_state()[1][0]


def test_background_writes_land_in_order_with_best_as_a_link(tmp_path, monkeypatch):
    real = checkpoint._write

    def slow(*a):
        time.sleep(0.1)
        real(*a)

    monkeypatch.setattr(checkpoint, "_write", slow)
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    writer = checkpoint.CheckpointWriter(background=True)
    writer.save({"format": 1, "model": {"w": torch.zeros(2)}}, last, best)
    writer.save({"format": 1, "model": {"w": torch.ones(2)}}, last)  # waits for the first
    writer.wait()
    assert torch.equal(torch.load(best, weights_only=False)["model"]["w"], torch.zeros(2))
    assert torch.equal(torch.load(last, weights_only=False)["model"]["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth"]  # no temporary left
    writer.close()


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_write_is_raised(tmp_path, background):
    writer = checkpoint.CheckpointWriter(background=background)
    missing = tmp_path / "gone" / "last.pth"
    with pytest.raises(FileNotFoundError):
        writer.save({"format": 1, "model": {}}, missing)
        writer.wait()  # a background write's error comes here (or at the next save)
    writer.wait()  # reported once
    writer.save({"format": 1, "model": {}}, tmp_path / "last.pth")
    writer.close()
    assert (tmp_path / "last.pth").is_file()
    # Without a wait in between, the next save reports it (before writing anything itself)
    writer = checkpoint.CheckpointWriter(background=background)
    with pytest.raises(FileNotFoundError):
        writer.save({"format": 1, "model": {}}, missing)
        writer.save({"format": 1, "model": {}}, tmp_path / "next.pth")
    writer.close()
    assert not (tmp_path / "next.pth").exists()


def test_a_wait_cut_short_keeps_the_write_and_its_error(tmp_path, monkeypatch):
    go, real = threading.Event(), checkpoint._write

    def held(*a):
        assert go.wait(10)
        real(*a)

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write", held)
    old = signal.signal(signal.SIGALRM, interrupt)
    writer = checkpoint.CheckpointWriter(background=True)
    try:
        writer.save({"format": 1, "model": {}}, tmp_path / "gone" / "last.pth")
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the run waits for its write
            writer.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert writer.busy
    go.set()
    with pytest.raises(FileNotFoundError):
        writer.close()


def test_host_copy_keeps_a_state_dicts_type_and_metadata():
    sd = torch.nn.BatchNorm2d(3).state_dict()
    out = checkpoint.host_copy(sd)
    assert type(out) is type(sd) and out._metadata == sd._metadata and list(out) == list(sd)
    assert all(torch.equal(out[k], sd[k]) and out[k].data_ptr() != sd[k].data_ptr() for k in sd)


@pytest.fixture
def background_slow_writes(monkeypatch):
    """Training on the CPU with the CUDA runs' background writes, each made slow: a run that
    failed to wait for its last write would end (or stop) before the file is there."""
    from alexnet import train

    monkeypatch.setattr(train, "background_writes", lambda device: True)
    real = checkpoint._write

    def slow(*a):
        time.sleep(0.3)
        real(*a)

    monkeypatch.setattr(checkpoint, "_write", slow)
    assert not writer_threads()
    yield
    assert not writer_threads()  # the writer's thread went with its run


def writer_threads() -> list[threading.Thread]:
    """The checkpoint writer's threads alive now, by their name: other threads come and stay
    (torch.compile's pool, started by whichever test of the process compiles first)."""
    return [t for t in threading.enumerate() if t.name.startswith("checkpoint")]


def test_run_with_background_writes_equals_one_without(learnable_cache, tmp_path, monkeypatch,
                                                      background_slow_writes):
    assert main(["train", *run_args(learnable_cache, tmp_path / "bg"), "--epochs", "2", "--save-every", "5"]) == 0
    for name in ("last.pth", "best.pth"):
        assert (tmp_path / "bg" / name).is_file()
    ck = torch.load(tmp_path / "bg" / "last.pth", weights_only=False)
    assert (ck["epoch"], ck["batch"], len(ck["history"])) == (2, 0, 2)
    # the same run written at once, as CPU runs are
    from alexnet import train

    monkeypatch.setattr(train, "background_writes", lambda device: False)
    assert main(["train", *run_args(learnable_cache, tmp_path / "fg"), "--epochs", "2", "--save-every", "5"]) == 0
    assert_same_run(tmp_path / "fg" / "last.pth", tmp_path / "bg" / "last.pth")


def test_stop_with_a_write_in_flight_then_resume(learnable_cache, tmp_path, monkeypatch, capsys,
                                                 background_slow_writes):
    """A stop request mid-epoch, right after the previous epoch's checkpoint went to the
    background: the stop's own checkpoint lands before the process says it is saved, and the
    resumed run ends where an uninterrupted one does."""
    from alexnet import train

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *run_args(learnable_cache, full), "--epochs", "2"]) == 0
    steps, real_step = [], train.train_step

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 14:  # epoch 2, step 2 (12 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **k)

    real_resume = train.resume_command

    def resume_command(cfg):  # part of the "saved" line: by then the stop's checkpoint is on disk
        on_disk = torch.load(cut / "last.pth", weights_only=False)
        assert (on_disk["epoch"], on_disk["batch"]) == (1, 2)
        seen.append(1)
        return real_resume(cfg)

    seen = []
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "resume_command", resume_command)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *run_args(learnable_cache, cut), "--epochs", "2"])
    assert stopped.value.code == 128 + signal.SIGTERM and seen
    assert f"stopped by SIGTERM at epoch 2, step 2 of 12; {cut / 'last.pth'} saved" in capsys.readouterr().out
    monkeypatch.setattr(train, "train_step", real_step)
    assert main(["train", *run_args(learnable_cache, cut), "--epochs", "2", "--resume"]) == 0
    assert_same_run(full / "last.pth", cut / "last.pth")


@pytest.fixture
def sigint_heard():
    """SIGINT as a foreground job has it, whatever this suite was started with: a shell starts
    a background job (`pytest &`, nohup) with SIGINT ignored, and a run leaves an ignored
    SIGINT ignored (test_reliability), so the Ctrl-C this test sends would not reach it."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is not None:  # None: a handler installed outside Python, which cannot be put back
        signal.signal(signal.SIGINT, before)


def test_second_ctrl_c_waits_for_the_stops_write(learnable_cache, tmp_path, monkeypatch, capsys,
                                                 background_slow_writes, sigint_heard):
    """A second Ctrl-C, more than a second after the first, would stop at once, but not while
    the stop's own checkpoint is being written in the background."""
    from alexnet import train

    real = checkpoint._write

    def slower(*a):  # the second Ctrl-C arrives 1.2 s into the stop's write
        time.sleep(1.2)
        os.kill(os.getpid(), signal.SIGINT)
        real(*a)

    steps, real_step = [], train.train_step

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 3:
            monkeypatch.setattr(checkpoint, "_write", slower)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as stopped:
        main(["train", *run_args(learnable_cache, out)])
    assert stopped.value.code == 128 + signal.SIGINT
    assert f"stopped by SIGINT at epoch 1, step 3 of 12; {out / 'last.pth'} saved" in capsys.readouterr().out
    saved = torch.load(out / "last.pth", weights_only=False)
    assert (saved["epoch"], saved["batch"]) == (0, 3)


def test_nan_loss_with_a_write_in_flight_names_the_last_good_checkpoint(learnable_cache, tmp_path, monkeypatch,
                                                                        capsys, background_slow_writes):
    """test_reliability's NaN-loss run with background writes: the loss turns NaN while epoch
    1's checkpoint is still being written; the message names it, and it is there."""
    from tests.test_reliability import test_nan_loss_leaves_the_last_good_checkpoint as nan_loss_run

    nan_loss_run(learnable_cache, tmp_path, capsys, monkeypatch)


def test_a_save_within_an_epoch_is_not_counted_as_training_time(learnable_cache, tmp_path, monkeypatch):
    """train_seconds (and so images/s) is the steps' time: a --save-every write in the middle
    of an epoch is left out of it, as the end-of-epoch write is. A clock that moves only
    while a checkpoint is saved shows whether the epoch counted it."""
    import types

    from alexnet import train

    clock = types.SimpleNamespace(t=0.0)

    def perf_counter() -> float:  # a millisecond a reading, so that rates have a time to divide by
        clock.t += 0.001
        return clock.t

    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=perf_counter, monotonic=time.monotonic))
    real = checkpoint.CheckpointWriter.save

    def save(self, *a, **k):
        clock.t += 1000.0
        return real(self, *a, **k)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "save", save)
    assert main(["train", *run_args(learnable_cache, tmp_path / "o"), "--epochs", "1", "--save-every", "2"]) == 0
    row = torch.load(tmp_path / "o" / "last.pth", weights_only=False)["history"][0]
    assert 0 < row["train_seconds"] < 1000  # one save counted would be 1000 s
