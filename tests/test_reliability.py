"""Exact resume after SIGKILL, safe interruption, non-finite loss, determinism, and one clear
error per kind of bad input."""

import csv
import json
import os
import re
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.cli import main
from alexnet.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def run_args(cache, out, *extra):
    return ["--variant", "combined_gap", "--data", str(cache), "--out", str(out), "--device", "cpu",
            "--num_classes", "4", "--bs", "16", "--epochs", "3", "--lr", "0.05", "--deterministic",
            "--no-progress", "--seed", "7", *extra]


def strip_times(history):
    """History without what depends on the machine: times, rates, peak memory."""
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "images_per_s" and not k.startswith("peak_")}
            for r in history]


def assert_same_run(a: Path, b: Path):
    ca, cb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert strip_times(ca["history"]) == strip_times(cb["history"])
    assert ca["step"] == cb["step"]


def test_deterministic_runs_match(learnable_cache, tmp_path, monkeypatch):
    from alexnet import train

    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    seen, real = [], train.train_step

    def step(*a, **k):  # what the run's steps ran under: two equal runs on a CPU do not show it
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    assert main(["train", *run_args(learnable_cache, tmp_path / "a"), "--epochs", "1"]) == 0
    assert main(["train", *run_args(learnable_cache, tmp_path / "b"), "--epochs", "1"]) == 0
    assert_same_run(tmp_path / "a" / "last.pth", tmp_path / "b" / "last.pth")
    assert seen and all(seen)
    seen.clear()
    args = [a for a in run_args(learnable_cache, tmp_path / "c") if a != "--deterministic"]
    assert main(["train", *args, "--epochs", "1", "--max-steps", "1"]) == 0
    assert seen == [False]
    # The process-wide switches go back as they were (a study's next run, the caller's code).
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(learnable_cache, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *run_args(learnable_cache, full)]) == 0
    # The same run in a child process, saving every 3 steps, killed once it is past epoch 1.
    # It is given 50 epochs so that no machine is fast enough for it to finish first (the
    # plateau schedule does not depend on --epochs, and a resume may change it).
    cmd = [sys.executable, "-m", "alexnet", "train", *run_args(learnable_cache, cut, "--save-every", "3"),
           "--epochs", "50"]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in child.stdout:
        if line.startswith("epoch 1/50"):
            break
    # Killed as soon as a checkpoint from inside epoch 2 is there: resuming mid-epoch is the
    # harder case (the batch order, the augmentation draws and the meters carry over).
    hung = time.monotonic() + 600  # a guard against a hang, far beyond any machine's pace
    while child.poll() is None:
        try:
            if torch.load(cut / "last.pth", weights_only=False)["batch"] > 0:
                break
        except (OSError, RuntimeError, EOFError):  # not there yet
            pass
        if time.monotonic() > hung:
            child.kill()
            pytest.fail("the child wrote no mid-epoch checkpoint in 10 minutes: hung")
        time.sleep(0.01)
    child.kill()
    child.wait()
    assert child.returncode == -signal.SIGKILL
    saved = torch.load(cut / "last.pth", weights_only=False)
    assert 1 <= saved["epoch"] < 3 and saved["batch"] > 0
    assert main(["train", *run_args(learnable_cache, cut), "--resume"]) == 0
    assert_same_run(full / "last.pth", cut / "last.pth")


@pytest.fixture(scope="module")
def two_epochs_uninterrupted(learnable_cache, tmp_path_factory):
    """The run each stop-and-resume case must end equal to: trained once for all of them."""
    full = tmp_path_factory.mktemp("full")
    assert main(["train", *run_args(learnable_cache, full), "--epochs", "2"]) == 0
    return full


@pytest.mark.parametrize("when", ["step 5", "step 12", "evaluation", "evaluation's last batch", "last evaluation",
                                  "last evaluation's last batch", "last checkpoint"])
def test_stop_request_then_resume_equals_uninterrupted(learnable_cache, two_epochs_uninterrupted, tmp_path,
                                                       monkeypatch, capsys, when):
    """A stop request (the signal sent to this process) mid-epoch, at an epoch's last step
    (12 steps of 16 per epoch), as an evaluation starts (it is given up), during its last
    batch (it completes) or while the run waits for its last checkpoint to be written: the
    resumed run ends bit for bit where the uninterrupted one does, BatchNorm's running
    statistics included (combined_gap has BatchNorm: a position saved before a step whose
    forward pass had already run would apply that batch to them twice)."""
    from alexnet import checkpoint as ckpt_io
    from alexnet import evaluate as evaluation
    from alexnet import train

    full, cut = two_epochs_uninterrupted, tmp_path / "cut"
    steps, evals, real_step, real_eval, real_logits = [], [], train.train_step, train.evaluate, evaluation.logits_for

    def step(*a, **k):
        steps.append(1)
        if when == f"step {len(steps)}":
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step runs
        return real_step(*a, **k)

    def evaluate(*a, **k):
        evals.append(1)
        if (when, len(evals)) in {("evaluation", 1), ("last evaluation", 2)}:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_eval(*a, **k)

    def logits_for(*a, **k):  # the 48 val images are one batch: its last
        if (when, len(evals)) in {("evaluation's last batch", 1), ("last evaluation's last batch", 2)}:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_logits(*a, **k)

    def close(writer):  # the run's last wait for its checkpoint, after every other check
        if when == "last checkpoint":
            os.kill(os.getpid(), signal.SIGTERM)
        real_close(writer)

    real_close = ckpt_io.CheckpointWriter.close
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(evaluation, "logits_for", logits_for)
    monkeypatch.setattr(ckpt_io.CheckpointWriter, "close", close)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *run_args(learnable_cache, cut), "--epochs", "2"])
    assert stopped.value.code == 128 + signal.SIGTERM
    cut_short = "step 12 of 12 (its evaluation was cut short and runs first on resume)"
    where = {"step 5": "epoch 1, step 5 of 12", "step 12": "epoch 1, step 12 of 12",
             "evaluation": f"epoch 1, {cut_short}",
             "evaluation's last batch": "the end of epoch 1",
             "last evaluation": f"epoch 2, {cut_short}",
             # After the last evaluation: the run is complete, and still the stop is reported
             # (an ablation's Ctrl-C must end the study, not start its next run).
             "last evaluation's last batch": "the end of epoch 2, the last: the run is complete",
             "last checkpoint": "the end of epoch 2, the last: the run is complete"}[when]
    printed = capsys.readouterr().out
    assert f"stopped by SIGTERM at {where}; {cut / 'last.pth'} saved" in printed
    complete = when in ("last evaluation's last batch", "last checkpoint")
    assert ("Resume with:" in printed) == (not complete)
    saved = torch.load(cut / "last.pth", weights_only=False)
    assert (saved["epoch"], saved["batch"]) == {"step 5": (0, 5), "step 12": (0, 12), "evaluation": (0, 12),
                                                "evaluation's last batch": (1, 0), "last evaluation": (1, 12),
                                                "last evaluation's last batch": (2, 0),
                                                "last checkpoint": (2, 0)}[when]
    assert len(saved["history"]) == saved["epoch"]  # a given-up evaluation left no row
    monkeypatch.setattr(train, "train_step", real_step)
    monkeypatch.setattr(train, "evaluate", real_eval)
    monkeypatch.setattr(evaluation, "logits_for", real_logits)
    monkeypatch.setattr(ckpt_io.CheckpointWriter, "close", real_close)
    assert main(["train", *run_args(learnable_cache, cut), "--epochs", "2", "--resume"]) == 0
    assert_same_run(full / "last.pth", cut / "last.pth")
    assert any("running_mean" in k for k in saved["model"])  # the statistics were compared


@pytest.mark.parametrize("late", [False, True], ids=["double-press-only", "late-second-ctrl-c"])
def test_second_stop_request_stops_at_once(learnable_cache, tmp_path, monkeypatch, capfd, late):
    """The first request is acknowledged at once; further SIGTERMs (what launchers send) and a
    Ctrl-C right after it are ignored (the step completes and is saved); a second Ctrl-C a
    moment later stops without waiting for the step, leaving the last checkpoint as it was
    (exit 130, as for Ctrl-C)."""
    from alexnet import train

    steps, real = [], train.train_step

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            assert "SIGINT: stopping at the next step boundary" in capfd.readouterr().err
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # within a second of the first: a double press, or a launcher
            if late:
                time.sleep(1.05)
                os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "o"

    def own(signum, frame):  # what the run must put back (not Python's default: a shell may start us with SIG_IGN)
        raise AssertionError("the run's own handler should have run")

    before = {s: signal.signal(s, own) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if late:
            assert main(["train", *run_args(learnable_cache, out), "--save-every", "1"]) == 130
        else:  # the first request's own end: the step finished and saved, then exit status 130
            with pytest.raises(SystemExit) as stopped:
                main(["train", *run_args(learnable_cache, out), "--save-every", "1"])
            assert stopped.value.code == 130
        after = {s: signal.getsignal(s) for s in before}
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    said = capfd.readouterr()
    assert ("interrupted" in said.err) if late else ("stopped by SIGINT at epoch 1, step 3 of" in said.out + said.err)
    # step 3 saved at its end, or given up by the late Ctrl-C: step 2's --save-every checkpoint stays
    assert torch.load(out / "last.pth", weights_only=False)["batch"] == (2 if late else 3)
    assert after == {signal.SIGINT: own, signal.SIGTERM: own}  # the handlers are put back


def test_an_ignored_interrupt_stays_ignored(learnable_cache, tmp_path, monkeypatch):
    """A run started with SIGINT ignored (a shell's background job without job control) leaves
    it ignored, as Python does, and still stops cleanly on SIGTERM."""
    from alexnet import train

    steps, real = [], train.train_step

    def step(*a, **k):
        steps.append(1)
        if len(steps) == 2:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the run goes on
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "o"
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["train", *run_args(learnable_cache, out)])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    assert after is signal.SIG_IGN
    assert stopped.value.code == 128 + signal.SIGTERM
    assert torch.load(out / "last.pth", weights_only=False)["batch"] == 4  # the step the SIGTERM came in


def test_sigterm_to_the_whole_job_saves_with_dataloader_workers(learnable_cache, tmp_path):
    """A scheduler (Slurm, `kill -- -PGID`) signals every process of the job, the DataLoader
    workers of a per-image transforms file too: the main process still stops at the next step
    with last.pth saved (the workers used to die first, and the run failed saving nothing)."""
    from tests.procs import children, end_within, kill_all

    out = tmp_path / "o"
    cmd = [sys.executable, "train.py", "models/alexnet_combined_gap.py", *run_args(learnable_cache, out)[2:],
           "--epochs", "50", "--transforms", "examples/transforms_torchvision.py", "--workers", "2"]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and child.poll() is None and time.monotonic() < deadline:
            workers = children(child.pid)
            time.sleep(0.01)
        assert len(workers) >= 2, "the run's DataLoader workers were never seen"
        os.killpg(child.pid, signal.SIGTERM)
        printed = child.communicate(timeout=120)[0]
    finally:
        child.kill()
        kill_all(workers)
    assert child.returncode == 128 + signal.SIGTERM, printed[-2000:]
    assert "stopped by SIGTERM at" in printed and "Resume with:" in printed
    assert torch.load(out / "last.pth", weights_only=False)["step"] >= 0
    assert end_within(workers, 60), "the workers outlived the run"


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="signal masks are POSIX")
def test_dataloader_workers_start_with_the_stop_signals_held_until_their_handlers_are_in(tmp_path, monkeypatch):
    """PyTorch's worker sets a SIGTERM handler that kills it, and only later calls the project's
    worker_init_fn: a job-wide SIGTERM in between failed the run (seen under load). The workers
    start with the stop signals blocked, and `_worker_init` unblocks them once its own
    handlers are in; the main process's mask is put back after the start."""
    import multiprocessing

    import numpy as np

    from alexnet import loader
    from alexnet.augment import BatchAugment, Recipe

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the patched worker_init_fn reaches the workers only through fork")
    seen = tmp_path / "masks"
    real = loader._worker_init

    def recording(i: int) -> None:
        at_start = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        real(i)
        after = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with open(seen, "a") as f:
            f.write(f"{int(signal.SIGTERM in at_start)}{int(signal.SIGHUP in at_start)}{int(signal.SIGINT in at_start)} "
                    f"{int(bool(loader.WORKER_STOP_SIGNALS & after))}\n")

    monkeypatch.setattr(loader, "_worker_init", recording)
    x, y = np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int64)
    aug = BatchAugment(Recipe(), 8, [0.5] * 3, [0.25] * 3)
    batches = loader.PerImageBatches(x, y, lambda img: img, aug, bs=2, workers=2, seed=0, source="t")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert len(list(batches(torch.arange(8), 0))) == 4
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main process's mask as it was
    assert seen.read_text().splitlines() == ["111 0", "111 0"]  # blocked at the start, open after the handlers


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "plateau", "constant"])
def test_more_epochs_continue_only_a_schedule_whose_curve_does_not_span_the_run(learnable_cache, tmp_path, capsys,
                                                                               schedule):
    """cosine, onecycle and step fit their lr curve to --epochs: a resume with another number
    would restart it (OneCycleLR raised deep inside PyTorch); plateau and constant continue."""
    out = tmp_path / "o"
    args = [*run_args(learnable_cache, out), "--max-steps", "3", "--schedule", schedule]
    assert main(["train", *args, "--epochs", "2"]) == 0
    before = (out / "config.json").read_bytes()
    capsys.readouterr()
    code = main(["train", *args, "--epochs", "3", "--resume"])
    if schedule in ("plateau", "constant"):
        assert code == 0 and len(torch.load(out / "last.pth", weights_only=False)["history"]) == 3
        return
    err = capsys.readouterr().err
    assert code == 2 and f"(--epochs 2 -> 3 (the {schedule} schedule's lr curve spans the run's epochs" in err
    assert (out / "config.json").read_bytes() == before
    capsys.readouterr()
    assert main(["train", *args, "--epochs", "2", "--resume"]) == 0  # the same run: complete
    assert f"nothing to do (its {schedule} schedule ended with it)" in capsys.readouterr().out


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_onecycle_runs_as_short_as_a_smoke_test(tiny_cache, tmp_path, steps):
    """At 4 steps OneCycleLR divided by zero (its rising quarter was 0 steps long)."""
    out = tmp_path / "o"
    assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", str(steps), "--lr", "0.05",
                 "--schedule", "onecycle", "--no-progress"]) == 0
    lr = float(next(csv.DictReader((out / "metrics.csv").open()))["lr"])
    assert 0 < lr <= 0.05


def test_an_epoch_cut_short_before_its_best_link_gets_it_on_resume(learnable_cache, tmp_path, capsys):
    """A kill between an improving epoch's last.pth and its best.pth link left best.pth missing
    (or older): the resume links that epoch's checkpoint, which is the run's best."""
    out = tmp_path / "o"
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--max-steps", "2"]) == 0
    for leftover in (None, b"an older best"):
        (out / "best.pth").unlink()
        if leftover:  # an earlier epoch's best, written before this last.pth
            (out / "best.pth").write_bytes(leftover)
            before = (out / "last.pth").stat().st_mtime_ns - 10**9
            os.utime(out / "best.pth", ns=(before, before))
        capsys.readouterr()
        assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--max-steps", "2", "--resume"]) == 0
        assert "made the checkpoint of epoch 1, the best" in capsys.readouterr().out
        assert os.path.samefile(out / "best.pth", out / "last.pth")
    capsys.readouterr()
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--max-steps", "2", "--resume"]) == 0
    assert "made the checkpoint" not in capsys.readouterr().out  # linked already: nothing to do
    # Where the file system has no hard links best.pth is a copy, written just after last.pth: kept.
    copy = out / "copy.pth"
    shutil.copyfile(out / "last.pth", copy)
    os.replace(copy, out / "best.pth")
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--max-steps", "2", "--resume"]) == 0
    assert "made the checkpoint" not in capsys.readouterr().out


@pytest.mark.parametrize("args,warning", [
    ([], "--warmup-epochs 1 has no effect: it applies to --schedule cosine, step, constant, not plateau"),
    (["--schedule", "onecycle"], "not onecycle (onecycle warms up over its first quarter itself)"),
    (["--schedule", "cosine", "--epochs", "1"], "--warmup-epochs 1 takes the whole run of --epochs 1: the lr never "
                                                "reaches --lr"),
])
def test_a_warm_up_that_cannot_be_meant_is_warned_of(tiny_cache, tmp_path, capsys, args, warning):
    """Warned of, not refused: a run made with it before must still resume with it."""
    assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--epochs", "2", "--max-steps", "5",
                 "--no-progress", "--warmup-epochs", "1", *args]) == 0
    printed = capsys.readouterr().out
    assert "warning: --warmup-epochs 1 " in printed and warning in printed


def test_a_hang_up_stops_the_run_with_its_checkpoint(learnable_cache, tmp_path):
    """A closed terminal: its descriptors fail (EIO) before SIGHUP comes, and isatty() is then
    False; the run still saves, and ends with 128 + SIGHUP, not with its next write's error."""
    import fcntl
    import pty
    import termios

    out = tmp_path / "o"
    master, slave = pty.openpty()
    cmd = [sys.executable, "train.py", "models/alexnet_combined_gap.py", *run_args(learnable_cache, out)[2:],
           "--epochs", "50", "--progress"]
    def own_terminal() -> None:  # the pty as the run's controlling terminal, as a login shell's
        _as_in_a_terminal()
        fcntl.ioctl(1, termios.TIOCSCTTY, 0)

    child = subprocess.Popen(cmd, cwd=ROOT, stdout=slave, stderr=slave, start_new_session=True,
                             preexec_fn=own_terminal)
    os.close(slave)
    seen = b""
    try:
        while b"epoch 1/50:" not in seen:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert b"epoch 1/50:" in seen, seen[-2000:]
    finally:
        os.close(master)  # the terminal goes away: the kernel hangs it up and sends SIGHUP
    assert child.wait(timeout=120) == 128 + signal.SIGHUP
    ck = torch.load(out / "last.pth", weights_only=False)
    assert ck["epoch"] >= 1 and ck["step"] > 0


def test_a_run_that_fails_with_dataloader_workers_ends_without_waiting_for_them(tiny_cache, tmp_path):
    """An error out of the process kept the DataLoader alive in its traceback; the exit then
    waited for its workers, which leave a SIGTERM to the main process (a minute, then an
    'Alarm clock' error on top of the run's own)."""
    m = tmp_path / "m.py"
    m.write_text("from alexnet.models import create_model\n\ncalls = [0]\n\n"
                 "def build_model(num_classes):\n    model = create_model('combined_gap', num_classes)\n"
                 "    model.register_forward_pre_hook(fail_later)\n    return model\n\n"
                 "def fail_later(module, args):\n    if module.training:\n        calls[0] += 1\n"
                 "        if calls[0] > 3:\n            raise RuntimeError('out of memory, say')\n")
    from tests.procs import children

    proc = subprocess.Popen([sys.executable, "train.py", str(m), "--data", str(tiny_cache), "--out", str(tmp_path / "o"),
                             "--device", "cpu", "--num_classes", "4", "--bs", "2", "--epochs", "1", "--no-progress",
                             "--transforms", "examples/transforms_torchvision.py", "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        printed = ""
        for line in proc.stderr:  # the traceback is printed as the process begins to exit
            printed += line
            if "RuntimeError: out of memory, say" in line:
                break
        assert "RuntimeError: out of memory, say" in printed, printed[-2000:]
        assert not children(proc.pid), "the DataLoader workers outlived the error (the exit waits for them)"
        assert proc.wait(timeout=120) == 1
    finally:
        proc.kill()


def test_resume_of_a_finished_run_says_so(learnable_cache, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1"]) == 0
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "the run is already complete (1 of 1 epochs); nothing to do" in printed and "training" not in printed
    assert (out / "last.pth").read_bytes() == before


def test_resume_alone_starts_a_run_that_has_no_checkpoint_yet(learnable_cache, tmp_path, capsys):
    """`--resume` alone (OUT/last.pth) is what a requeued job passes every time, its first
    start included; a checkpoint named by path must exist."""
    out = tmp_path / "o"
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--max-steps", "2", "--resume"]) == 0
    assert f"--resume: no {out / 'last.pth'} yet; starting the run from the beginning" in capsys.readouterr().out
    assert torch.load(out / "last.pth", weights_only=False)["step"] == 2
    missing = tmp_path / "elsewhere" / "last.pth"
    assert main(["train", *run_args(learnable_cache, tmp_path / "p"), "--resume", str(missing)]) == 2
    assert f"{missing}: checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_resume_on_other_data_is_refused(learnable_cache, tiny_cache, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", *run_args(learnable_cache, out), "--epochs", "1", "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", *run_args(tiny_cache, out), "--epochs", "2", "--max-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the run was trained on other data than the cache in" in err and "--data" in err


def _as_in_a_terminal() -> None:
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_saves_and_prints_resume_command(learnable_cache, tmp_path, sig):
    out = tmp_path / "o"
    cmd = [sys.executable, "train.py", "models/alexnet_combined_gap.py", *run_args(learnable_cache, out)[2:],
           "--epochs", "50"]
    # SIGINT and SIGHUP as a foreground job has them, whatever this suite was started with (a
    # shell's background job has SIGINT ignored, nohup SIGHUP, and a run leaves them ignored)
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=_as_in_a_terminal)
    for line in child.stdout:
        if line.startswith("epoch 1/50"):
            break
    child.send_signal(sig)
    rest = child.stdout.read()
    child.wait(timeout=60)
    assert child.returncode == 128 + sig
    assert f"stopped by {signal.Signals(sig).name}" in rest
    assert "Resume with: python train.py models/alexnet_combined_gap.py" in rest and rest.rstrip().endswith("--resume")
    ck = torch.load(out / "last.pth", weights_only=False)
    assert ck["epoch"] >= 1 and ck["step"] > 0


def test_nan_loss_stops_with_reason(learnable_cache, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", "--variant", "baseline", "--data", str(learnable_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "16", "--epochs", "2", "--lr", "1e12", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "loss became" in err and "learning rate" in err and "step" in err
    assert not (out / "best.pth").exists()


def test_weights_blown_up_in_an_epochs_last_step_are_not_saved(learnable_cache, tmp_path, capsys):
    """One step per epoch: its loss is finite, the update it makes is not. The evaluation's
    loss shows it, and neither checkpoint is written from those weights."""
    out = tmp_path / "nan"
    code = main(["train", "--variant", "baseline", "--data", str(learnable_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "16", "--epochs", "2", "--max-steps", "1", "--lr", "1e30",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "val loss became nan after epoch 1" in err and "no checkpoint had been saved yet" in err
    assert not (out / "best.pth").exists() and not (out / "last.pth").exists()


def test_weights_blown_up_before_a_save_every_save_are_not_saved(learnable_cache, tmp_path, capsys, monkeypatch):
    """The update of step 3 leaves a NaN in the weights; its loss was finite, and the save that
    --save-every 1 makes right after it is refused."""
    from alexnet import train

    real, steps = train.train_step, []

    def step(model, opt, *a, **k):
        out = real(model, opt, *a, **k)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "nan"
    code = main(["train", "--variant", "baseline", "--data", str(learnable_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "16", "--epochs", "1", "--save-every", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "the weights became non-finite by epoch 1, step 3" in err and "were not saved" in err
    assert f"the last good checkpoint is {out / 'last.pth'}" in err
    assert torch.load(out / "last.pth", weights_only=False)["batch"] == 2


def test_nan_loss_leaves_the_last_good_checkpoint(learnable_cache, tmp_path, capsys, monkeypatch):
    from alexnet import train

    real, steps = train.train_step, []

    def step(model, opt, x, y, cfg, device, check=None):  # the loss turns NaN after epoch 1
        steps.append(1)
        if len(steps) > 12 and check is not None:
            return real(model, opt, x, y, cfg, device, lambda loss: check(loss * float("nan")))
        return real(model, opt, x, y, cfg, device, check)

    monkeypatch.setattr(train, "train_step", step)
    out = tmp_path / "o"
    assert main(["train", *run_args(learnable_cache, out)]) == 2  # 12 steps of 16 per epoch
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2, step 1 of 12" in err and f"the last good checkpoint is {out / 'last.pth'}" in err
    last = torch.load(out / "last.pth", weights_only=False)
    assert (last["epoch"], last["batch"], len(last["history"])) == (1, 0, 1)  # epoch 1, whole
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert torch.load(out / "best.pth", weights_only=False)["history"] == last["history"]


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from alexnet import checkpoint

    path = tmp_path / "last.pth"
    checkpoint.save_atomic({"format": 1, "model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def torn(obj, f):
        f.write(b"the first bytes of a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C (or a full disk) halfway through the write

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"format": 1, "model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]  # no temporary left


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """Not mkstemp's private 0600: a checkpoint is as readable as the run's other files."""
    from alexnet import checkpoint

    old = os.umask(0o027)
    try:
        checkpoint.save_atomic({"format": 1, "model": {}}, tmp_path / "a.pth")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("hard_links", [True, False])
def test_best_checkpoint_is_last_one_written_once(tmp_path, monkeypatch, hard_links):
    """best.pth of an improving epoch is last.pth's file (one write, not two), and stays as it
    was when the next last.pth replaces it; without hard links, a copy."""
    from alexnet import atomic, checkpoint

    if not hard_links:
        def no_link(src, dst):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(atomic.os, "link", no_link)
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    best.write_bytes(b"an older best")
    checkpoint.save_atomic({"format": 1, "model": {"w": torch.ones(3)}}, last)
    atomic.link_atomic(last, best)
    assert best.read_bytes() == last.read_bytes()
    assert os.path.samefile(best, last) == hard_links
    checkpoint.save_atomic({"format": 1, "model": {"w": torch.zeros(3)}}, last)
    assert torch.equal(torch.load(best, weights_only=False)["model"]["w"], torch.ones(3))
    assert torch.equal(torch.load(last, weights_only=False)["model"]["w"], torch.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth"]  # no temporary left


def test_checkpoint_of_a_cpu_run_does_not_start_cuda(monkeypatch):
    # On a GPU machine, a CPU run's first checkpoint must not create a CUDA context to ask
    # for generator states it never used.
    from alexnet import checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("CUDA was started"))
    assert checkpoint.rng_state(None)["cuda"] is None


def test_plot_redrawn_at_most_every_interval_and_at_the_end(tmp_path, monkeypatch):
    from alexnet import metrics

    drawn = []
    monkeypatch.setattr(metrics, "plot_curves", lambda path, history, title="", **kw: drawn.append(len(history)))
    log = metrics.MetricsLog(tmp_path)
    rows = [{"epoch": e, "val_top1": 1.0} for e in (1, 2, 3, 4)]
    log.write(rows[:1])
    log.write(rows[:2])  # within PLOT_EVERY_S of the last draw: the CSV only
    assert drawn == [1] and len(metrics.read_csv(tmp_path / "metrics.csv")) == 2
    log.flush()  # a run that stops here draws what it has
    log.write(rows[:3])
    log.write(rows[:4], final=True)
    assert drawn == [1, 2, 4]
    log.flush()  # nothing left to draw
    assert drawn == [1, 2, 4]


def test_the_curves_say_when_the_train_loss_is_smoothed(tmp_path, monkeypatch):
    """With label smoothing the train loss is not the val loss's plain cross-entropy: the
    plot's legend names it, so the two curves are not read as one scale."""
    import matplotlib

    from alexnet import metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legends = []
    monkeypatch.setattr(plt, "close", lambda fig: legends.append(
        [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]))
    rows = [{"epoch": 1, "train_loss": 3.0, "val_loss": 2.5, "train_top1": 10.0, "val_top1": 12.0, "val_top5": 30.0}]
    for run, smoothing in (("a", 0.1), ("b", 0.0)):
        (tmp_path / run).mkdir()
        metrics.MetricsLog(tmp_path / run, label_smoothing=smoothing).write(rows, final=True)
    assert legends[0][:2] == ["train (label smoothing 0.1)", "val"] and legends[1][:2] == ["train", "val"]


# ---- bad input: one line, non-zero exit, nothing overwritten ------------------------------

@pytest.fixture
def out_with_files(tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"precious")  # a user's file; a checkpoint there would refuse any new run
    return out


def _bad(cache, out, capsys, *args):
    code = main(["train", "--data", str(cache), "--out", str(out), "--device", "cpu", "--num_classes", "4",
                 "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_bytes() == b"precious"
    return err


@pytest.mark.parametrize("args,match", [
    (["models/nope.py"], "models/nope.py: file not found"),
    (["--variant", "alexnet9000"], "unknown variant 'alexnet9000'; known variants: baseline"),
    (["--variant", "baseline", "--bs", "0"], "--bs must be at least 1, got 0"),
    (["--variant", "baseline", "--lr", "0"], "--lr must be a positive finite number, got 0.0"),
    (["--variant", "baseline", "--lr", "-0.1"], "--lr must be a positive finite number"),
    (["--variant", "baseline", "--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--variant", "baseline", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--variant", "baseline", "--wd", "inf"], "--wd must be a finite number >= 0, got inf"),
    (["--variant", "baseline", "--warmup-epochs", "inf"], "--warmup-epochs must be a finite number >= 0"),
    (["--variant", "baseline", "--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--variant", "baseline", "--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--variant", "baseline", "--momentum", "0", "--nesterov"], "--nesterov needs --momentum above 0"),
    (["--variant", "baseline", "--max-steps", "-1"], "--max-steps must be >= 0, got -1"),
    (["--variant", "baseline", "--save-every", "-2"], "--save-every must be >= 0, got -2"),
    (["--variant", "baseline", "--out", ""], "--out must name a folder, got an empty path"),
    (["--variant", "baseline", "--data", " "], "--data must name a cache folder (or be left out for the default)"),
    (["--variant", "batchnorm", "--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA"),  # one process too
    (["--variant", "baseline", "--img-size", "32"], "--img-size must be at least 63"),
    # a model file's model is run at the size asked for: AlexNet's own says what fails
    (["models/alexnet_baseline.py", "--img-size", "32"],
     "models/alexnet_baseline.py: the model does not take a batch of 32x32 RGB images"),
    (["models/alexnet_baseline.py", "--img-size", "1"], "--img-size must be at least 2, got 1"),
    (["--variant", "baseline", "--recipe", "pixel", "--transforms", "utils/transforms_pixel.py"],
     "give --recipe or --transforms, not both"),
    (["models/alexnet_baseline.py", "--variant", "baseline"], "give exactly one of a model file"),
    (["--variant", "baseline", "--epochs", "0"], "--epochs must be at least 1"),
    (["--variant", "baseline", "--memory-budget", "-1"], "--memory-budget must be a number of GB >= 0, got -1.0"),
    (["--variant", "baseline", "--memory-budget", "inf"], "--memory-budget must be a number of GB >= 0, got inf"),
    (["--variant", "baseline", "--num_classes", "7"],
     "--num_classes 7 does not match the data in {cache} (4 classes): train with --num-classes 4"),
])
def test_bad_options(tiny_cache, out_with_files, capsys, args, match):
    assert match.format(cache=tiny_cache) in _bad(tiny_cache, out_with_files, capsys, *args)  # later options win


@pytest.mark.parametrize("content,match", [
    ('{"epochs": "two"}', "epochs must be an integer, got 'two'"),
    ('{"lr": "0.1"}', "lr must be a number, got '0.1'"),
    ('{"bs": 16.5}', "bs must be an integer, got 16.5"),
    ('{"bs": true}', "bs must be an integer, got True"),
    ('{"amp": "no"}', "amp must be true or false, got 'no'"),
    ('{"channels_last": 1}', "channels_last must be true or false or null, got 1"),
    ('{"data": 5}', "data must be a string or null, got 5"),
    ('{"epochs": 2, "bogus": 1}', "unknown key(s) bogus"),
    ('{"epochs": 2', "not valid JSON"),
    ('[1, 2]', "expected a JSON object of settings, like {\"epochs\": 10}; got a JSON array"),
    ('"epochs"', "got a JSON string"),
])
def test_config_file_values_are_checked(tiny_cache, out_with_files, capsys, tmp_path, content, match):
    """A JSON value of the wrong type is refused by name, not converted or passed on: a
    non-empty string would switch a flag on, a string epoch count fail inside training."""
    f = tmp_path / "c.json"
    f.write_text(content)
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--config", str(f))
    assert err.startswith(f"error: {f}: ") and match in err


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_config_file_that_cannot_be_read(tiny_cache, out_with_files, capsys, tmp_path, kind):
    f = tmp_path / "c.json"
    f.mkdir() if kind == "directory" else f.write_bytes(b"\xff\xfe\x00{")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--config", str(f))
    assert err.startswith(f"error: {f}: ") and {"directory": "cannot read the config file",
                                                 "binary": "not a text file"}[kind] in err


def test_resume_before_the_model_file_says_what_it_took(tiny_cache, out_with_files, capsys):
    """--resume takes an optional path: placed before the model file, it takes the model file."""
    err = _bad(tiny_cache, out_with_files, capsys, "--resume", "models/alexnet_baseline.py")
    assert "--resume took models/alexnet_baseline.py as the checkpoint to resume from" in err
    assert "train.py models/alexnet_baseline.py --resume" in err


def test_config_file_ints_are_accepted_as_floats(tmp_path):
    from alexnet.config import TrainConfig

    cfg = TrainConfig.from_dict({"variant": "baseline", "lr": 1, "momentum": 0, "amp": True, "data": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.momentum == 0.0 and cfg.amp is True


@pytest.mark.parametrize("body,match", [
    ("return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 200))",
     "the model returns (2, 200) for a batch of 2 images; expected logits of shape (2, 4) for --num_classes 4"),
    ("return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))",
     "the model does not take a batch of 64x64 RGB images (shape (2, 3, 64, 64) on cpu): RuntimeError"),
    ("return nn.Identity()", "the model returns (2, 3, 64, 64) for a batch of 2 images"),
    ("return nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(num_classes))",
     "the model has no trainable parameters (none, or requires_grad=False on every one)"),
    ("return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, num_classes)).requires_grad_(False)",
     "the model has no trainable parameters"),
    ("return Zeros(num_classes)\n\nclass Zeros(nn.Linear):\n    def __init__(self, n):\n        super().__init__(1, n)\n"
     "    def forward(self, x):\n        return x.new_zeros(len(x), self.out_features)",
     "the model's output in training mode does not depend on any trainable parameter"),
    ("return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, num_classes), Long())\n\nclass Long(nn.Module):\n"
     "    def forward(self, x):\n        return x.long()", "the model returns torch.int64 values; expected floating-point logits"),
    ("import sys; sys.exit(3)", "build_model(num_classes) called sys.exit(3) (line 4)"),
])
def test_model_file_with_wrong_outputs_or_input(tiny_cache, out_with_files, capsys, tmp_path, body, match):
    m = tmp_path / "m.py"
    m.write_text(f"from torch import nn\n\ndef build_model(num_classes):\n    {body}\n")
    err = _bad(tiny_cache, out_with_files, capsys, str(m))
    assert err.startswith(f"error: {m}: ") and match in err


@pytest.mark.parametrize("layer", ["Squeeze()", "nn.BatchNorm1d(4, track_running_stats=False)"])
def test_a_model_that_fails_on_one_image_still_evaluates_and_predicts_one(tiny_cache, tmp_path, capsys, layer):
    """A model that cannot take a batch of one image (a `.squeeze()` that drops the batch
    dimension; BatchNorm without running statistics, which uses the batch's in eval mode too)
    trains, evaluates with a last batch of one and predicts a single file: one image is run as
    two copies of it, and its scores are the copy's."""
    m = tmp_path / "m.py"
    m.write_text("from torch import nn\n\nclass Squeeze(nn.Module):\n    def forward(self, x):\n"
                 "        return x.squeeze()\n\ndef build_model(num_classes):\n"
                 f"    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, num_classes), {layer})\n")
    ck = tmp_path / "o" / "best.pth"
    assert main(["train", str(m), "--data", str(tiny_cache), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress"]) == 0
    from alexnet.inference import run_evaluate, run_predict

    whole = run_evaluate(m, ck, data=str(tiny_cache), device="cpu", bs=16, log=lambda *_: None)
    short = run_evaluate(m, ck, data=str(tiny_cache), device="cpu", bs=5, log=lambda *_: None)  # 5, 5, 5, 1
    assert short["n"] == whole["n"] == 16
    image = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    (alone,) = run_predict(ck, [image], model_file=m, device="cpu", log=lambda *_: None)
    _, among = run_predict(ck, [image, image], model_file=m, device="cpu", log=lambda *_: None)
    assert [q for _, _, q in alone] == pytest.approx([q for _, _, q in among], abs=1e-5)
    err = capsys.readouterr().err
    if layer == "Squeeze()":  # a model whose images do not depend on each other: the same figures
        assert short == pytest.approx(whole) and "warning" not in err
    else:  # batch statistics in eval mode: an image's scores depend on the batch, said once per command
        assert err.count("the model has BatchNorm without running statistics (track_running_stats=False)") == 4


def test_model_file_placed_and_cast_as_the_run_uses_it(tiny_cache, tmp_path):
    """The output check runs the model where and how training does: a model that only works
    under bf16 autocast, or in bf16 itself, trains with --amp."""
    m = tmp_path / "m.py"
    m.write_text("from alexnet.models import create_model\n\n"
                 "def build_model(num_classes):\n    return create_model('combined_gap', num_classes).bfloat16()\n")
    assert main(["train", str(m), "--data", str(tiny_cache), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--amp", "--no-progress"]) == 0


def test_checkpoint_of_a_custom_model_asks_for_its_file(tiny_cache, tmp_path, capsys):
    m = tmp_path / "linear.py"
    m.write_text("from torch import nn\n\n"
                 "def build_model(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, num_classes))\n")
    assert main(["train", str(m), "--data", str(tiny_cache), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress"]) == 0
    ck = tmp_path / "o" / "best.pth"
    capsys.readouterr()
    for args in (["evaluate", str(ck), "--data", str(tiny_cache)], ["predict", str(ck), str(m)]):
        assert main([*args, "--device", "cpu"]) == 2
        assert capsys.readouterr().err == (f"error: {ck}: holds a custom model (trained from {m}); pass its model file "
                                           "too (`evaluate MODEL_FILE CHECKPOINT`, `predict --model MODEL_FILE`)\n")
    assert main(["evaluate", str(m), str(ck), "--data", str(tiny_cache), "--device", "cpu"]) == 0


def test_checkpoint_of_an_edited_variant_asks_for_its_file(tiny_cache, tmp_path, capsys):
    """A model file that edits a registered variant's modules (GELU for ReLU: no weights
    change) is not rebuilt from the variant's settings without it: that would load the weights
    into the unedited model and report its figures as the run's."""
    m = tmp_path / "gelu.py"
    m.write_text("from torch import nn\nfrom alexnet.models import create_model\n\n"
                 "def build_model(num_classes):\n    model = create_model('combined_gap', num_classes)\n"
                 "    for i, layer in enumerate(model.features):\n"
                 "        if isinstance(layer, nn.ReLU):\n            model.features[i] = nn.GELU()\n"
                 "    return model\n")
    assert main(["train", str(m), "--data", str(tiny_cache), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress"]) == 0
    ck = tmp_path / "o" / "best.pth"
    capsys.readouterr()
    assert main(["evaluate", str(ck), "--data", str(tiny_cache), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {ck}: holds a custom model (trained from {m}); pass its model file")
    assert main(["evaluate", str(m), str(ck), "--data", str(tiny_cache), "--device", "cpu"]) == 0


def test_model_output_check_leaves_each_module_as_it_was():
    from alexnet.userfiles import check_model_output

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(3 * 64 * 64, 4))
    model[1].eval()  # frozen on purpose
    check_model_output("m.py", model, 4, 64, torch.device("cpu"), False, False)
    assert [m.training for m in model] == [True, False, True]


def test_model_with_another_output_in_training_mode(tiny_cache, out_with_files, capsys, tmp_path):
    """A model that returns a tuple only while training (an auxiliary head, as torchvision's
    Inception has) is refused before training, not by a traceback in the first step."""
    m = tmp_path / "aux.py"
    m.write_text("from torch import nn\n\n"
                 "class Aux(nn.Module):\n"
                 "    def __init__(self, n):\n"
                 "        super().__init__()\n"
                 "        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, n))\n\n"
                 "    def forward(self, x):\n"
                 "        y = self.fc(x)\n"
                 "        return (y, y) if self.training else y\n\n"
                 "def build_model(num_classes):\n    return Aux(num_classes)\n")
    err = _bad(tiny_cache, out_with_files, capsys, str(m))
    assert (f"{m}: the model returns tuple in training mode for a batch of 2 images; expected logits of shape "
            f"(2, 4) for --num_classes 4") in err


def test_model_output_check_in_training_mode_moves_nothing():
    """The training-mode pass leaves BatchNorm's statistics and the random stream as they were:
    a seeded run draws the same numbers with the check as without it."""
    from alexnet.userfiles import check_model_output

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.LazyLinear(4))
    model(torch.ones(2, 3, 64, 64))  # statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    check_model_output("m.py", model, 4, 64, torch.device("cpu"), False, False, training=True)
    assert torch.equal(torch.rand(4), expected)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.training for m in model)
    lazy = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LazyBatchNorm2d(), torch.nn.Flatten(),
                               torch.nn.LazyLinear(4))  # buffers without a shape until a first forward
    check_model_output("m.py", lazy, 4, 64, torch.device("cpu"), False, False, training=True)
    assert torch.equal(lazy[1].running_mean, torch.zeros(4)) and int(lazy[1].num_batches_tracked) == 0


def test_transforms_file_that_raises(tiny_cache, out_with_files, capsys, tmp_path):
    t = tmp_path / "t.py"
    t.write_text("def build_transforms():\n    raise RuntimeError('no such recipe')\n")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--transforms", str(t))
    assert f"{t}: build_transforms() raised RuntimeError (line 2): no such recipe" in err


def test_model_file_imports_a_module_beside_it(tiny_cache, tmp_path, monkeypatch):
    """A model file may keep its building blocks in a module next to it, as a script would,
    whatever the working directory; sys.path is as it was afterwards."""
    from alexnet.userfiles import load_model_file

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "blocks_for_the_test.py").write_text(
        "from torch import nn\n\ndef head(n):\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, n))\n")
    m = tmp_path / "m" / "uses_blocks.py"
    m.write_text("from blocks_for_the_test import head\n\ndef build_model(num_classes):\n    return head(num_classes)\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert load_model_file(m, 4)(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    assert sys.path == path_before


def test_transforms_file_whose_recipe_is_refused_is_named(tiny_cache, out_with_files, capsys, tmp_path):
    t = tmp_path / "t.py"
    t.write_text("from alexnet.augment import Recipe\n\ndef build_transforms():\n    return Recipe(brightness=1.5)\n")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--transforms", str(t))
    assert err == f"error: {t}: build_transforms() (line 4): brightness must be in [0, 1), got 1.5"


def test_transforms_file_whose_crops_reach_past_the_image(tiny_cache, out_with_files, capsys, tmp_path):
    """Training pads periodically and would take any crop_pad; the ten-crop test reflect-pads,
    which cannot mirror more than the image: refused before training, with the file named."""
    t = tmp_path / "t.py"
    t.write_text("from alexnet.augment import Recipe\n\ndef build_transforms():\n    return Recipe(crop_pad=64)\n")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--transforms", str(t))
    assert err == f"error: {t}: crop_pad must be less than the image size 64, got 64"


def test_resume_given_the_run_folder_asks_for_the_file(tiny_cache, out_with_files, capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "combined_gap", "--resume", str(run))
    assert f"--resume {run}: is a directory; give the checkpoint in it ({run / 'last.pth'})" in err


def test_a_new_run_does_not_replace_the_record_of_one_whose_checkpoints_were_deleted(tiny_cache, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
            "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress"]
    assert main(["train", *args]) == 0
    for f in ("last.pth", "best.pth"):
        (out / f).unlink()
    record = (out / "metrics.csv").read_bytes()
    capsys.readouterr()
    assert main(["train", *args, "--lr", "0.02"]) == 2
    assert "holds a previous run's metrics.csv (1 epoch) that a new run would replace" in capsys.readouterr().err
    assert (out / "metrics.csv").read_bytes() == record


def test_a_transform_that_fails_on_a_later_image_is_one_line(tiny_cache, capsys, tmp_path):
    t = tmp_path / "t.py"
    t.write_text("import torch\n\ndef build_transforms():\n    return Flaky()\n\nclass Flaky:\n"
                 "    calls = 0\n\n    def __call__(self, img):\n        Flaky.calls += 1\n"
                 "        if Flaky.calls > 3:\n            raise ValueError('bad pixel')\n        return img\n")
    for workers in ("0", "2"):
        code = main(["train", "--variant", "combined_gap", "--transforms", str(t), "--workers", workers, "--data",
                     str(tiny_cache), "--out", str(tmp_path / workers), "--device", "cpu", "--num_classes", "4",
                     "--bs", "8", "--epochs", "1", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "Traceback" not in err
        assert re.search(rf"error: {re.escape(str(t))}: the transform raised ValueError on training image \d+ of the "
                         r"cache: bad pixel$", err), (workers, err)


def _per_image(tiny_cache, t, bs=8, workers=0):
    from alexnet.augment import RECIPES, BatchAugment
    from alexnet.data import open_cache
    from alexnet.loader import PerImageBatches
    from alexnet.userfiles import load_transforms_file

    cache = open_cache(tiny_cache)
    aug = BatchAugment(RECIPES["baseline"], 64, cache.stats["mean"], cache.stats["std"])
    return PerImageBatches(cache.train.x, cache.train.y, load_transforms_file(t), aug, bs, workers, 0, str(t), t)


def test_a_transform_failing_in_a_worker_leaves_no_worker_behind(tiny_cache, tmp_path):
    """The error's traceback holds the batches' frame: the workers must be stopped there, not
    left to the process's exit, which signals them and waits a minute (and may print a
    traceback of its own)."""
    import multiprocessing

    t = tmp_path / "t.py"
    t.write_text("def build_transforms():\n    return Flaky()\n\nclass Flaky:\n    calls = 0\n\n"
                 "    def __call__(self, img):\n        Flaky.calls += 1\n"
                 "        if Flaky.calls > 3:\n            raise ValueError('bad pixel')\n        return img\n")
    batches = _per_image(tiny_cache, t, workers=2)
    before = set(multiprocessing.active_children())
    with pytest.raises(UserError, match="the transform raised ValueError on training image") as failed:
        for _ in batches(torch.arange(16), 0):
            pass
    assert failed.value.__traceback__ is not None  # still held, as a traceback on its way out holds it
    assert set(multiprocessing.active_children()) - before == set()


def test_a_worker_killed_outright_is_one_line(tiny_cache, tmp_path):
    """SIGKILL, as the kernel's out-of-memory killer sends it, to a worker: one line that says
    what died and what helps, not the DataLoader's traceback."""
    t = tmp_path / "t.py"
    t.write_text("import os, signal\nfrom torch.utils.data import get_worker_info\n\n"
                 "def build_transforms():\n    return Killed()\n\nclass Killed:\n    def __call__(self, img):\n"
                 "        if get_worker_info() is not None:\n            os.kill(os.getpid(), signal.SIGKILL)\n"
                 "        return img\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(t))}: a DataLoader worker died "
                                        r"\(DataLoader worker \(pid.*; out of memory\?\): fewer --workers or a smaller "
                                        r"--bs need less$"):
        for _ in _per_image(tiny_cache, t, workers=2)(torch.arange(16), 0):
            pass


def test_a_worker_killed_during_a_training_step_is_one_line(tiny_cache, tmp_path, capsys, monkeypatch):
    """PyTorch reports a dead worker in the main thread wherever it is: inside a training step
    as often as in the loader. Either way one line, exit status 2."""
    from alexnet import train

    real = train.train_step

    def slow(*a, **k):  # the main thread busy in the step when the worker dies, as in a real run
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", slow)
    t = tmp_path / "t.py"
    t.write_text("import os, signal\nfrom torch.utils.data import get_worker_info\n\n"
                 "def build_transforms():\n    return Later()\n\nclass Later:\n    n = 0\n\n"
                 "    def __call__(self, img):\n        Later.n += 1\n"
                 "        if get_worker_info() is not None and get_worker_info().id == 0 and Later.n > 20:\n            os.kill(os.getpid(), signal.SIGKILL)\n"
                 "        return img\n")
    code = main(["train", "--variant", "baseline", "--transforms", str(t), "--workers", "2", "--data", str(tiny_cache),
                 "--out", str(tmp_path / "o"), "--device", "cpu", "--num_classes", "4", "--bs", "4", "--epochs", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: a DataLoader worker died (DataLoader worker (pid"), err
    assert err.endswith("; out of memory?): fewer --workers or a smaller --bs need less; the last checkpoint is "
                        "whole, continue with --resume\n")
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_transform_that_scales_some_images_to_float_gets_them_all_at_one_scale(tiny_cache, tmp_path):
    """v2.RandomApply([ToDtype(float, scale=True), GaussianNoise]): some images float in
    0..1, the others uint8. Stacked as they are, the uint8 ones would become 0..255 floats
    read as 0..1: 255 times the input. They are brought to 0..1 first."""
    t = tmp_path / "t.py"
    t.write_text("import torch\n\ndef build_transforms():\n    return Half()\n\nclass Half:\n"
                 "    def __call__(self, img):\n"
                 "        return img.float() / 255 if torch.rand(()) < 0.5 else img\n")
    xb, _ = next(iter(_per_image(tiny_cache, t)(torch.arange(8), 0)))
    plain = tmp_path / "plain.py"
    plain.write_text("def build_transforms():\n    return lambda img: img\n")
    want, _ = next(iter(_per_image(tiny_cache, plain)(torch.arange(8), 0)))
    torch.testing.assert_close(xb, want, atol=1e-4, rtol=1e-4)


def test_a_transform_returning_out_of_range_floats_for_some_images_is_refused(tiny_cache, tmp_path):
    t = tmp_path / "t.py"  # the first image (the probe's) in range, a later one at 0..255
    t.write_text("import torch\n\ndef build_transforms():\n    return Later()\n\nclass Later:\n    n = 0\n\n"
                 "    def __call__(self, img):\n        Later.n += 1\n"
                 "        return img.float() / (255 if Later.n < 3 else 1)\n")
    batches = _per_image(tiny_cache, t)
    batches.probe()
    with pytest.raises(UserError, match=r"the transform returned float pixels in \[\d+, \d+\]; expected uint8"):
        next(iter(batches(torch.arange(8), 0)))


def test_a_transforms_python_and_numpy_draws_are_seeded_per_image(tiny_cache, tmp_path):
    """torchvision v1's RandomChoice draws from Python's `random`, a user's code may use
    numpy's: the batches are the same for any --workers and from any start, as with torch's."""
    t = tmp_path / "t.py"
    t.write_text("import random\nimport numpy as np\n\ndef build_transforms():\n    return Draw()\n\n"
                 "class Draw:\n    def __call__(self, img):\n"
                 "        return (img // random.choice([1, 2, 3]) // int(np.random.randint(1, 4))).to(img.dtype)\n")
    runs = [torch.cat([xb for xb, _ in _per_image(tiny_cache, t, bs=4, workers=w)(torch.arange(16), 0)]) for w in (0, 2)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    later, _ = next(iter(_per_image(tiny_cache, t, bs=4)(torch.arange(16), 2)))  # resumed at batch 2
    torch.testing.assert_close(later, runs[0][8:12], atol=0, rtol=0)
    # With --workers 0 the images are made in the training process: its own streams go on untouched.
    import random

    random.seed(5)
    np.random.seed(5)
    want = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    for _ in _per_image(tiny_cache, t, bs=4, workers=0)(torch.arange(16), 0):
        pass
    assert (random.random(), np.random.rand()) == want


def test_a_transform_of_integer_pixels_other_than_uint8_is_refused(tiny_cache, out_with_files, capsys, tmp_path):
    # Read as 0..1 floats, 0..255 integers would train at 255 times the input scale.
    t = tmp_path / "t.py"
    t.write_text("import torch\nfrom torchvision.transforms import v2\n\n"
                 "def build_transforms():\n    return v2.ToDtype(torch.int32)\n")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "combined_gap", "--transforms", str(t))
    assert err == (f"error: {t}: the transform returned torch.int32 pixels; expected uint8, or float in [0, 1] "
                   "(v2.ToDtype(torch.float32, scale=True))")


@pytest.mark.parametrize("dtype", ["uint8", "float"])
def test_a_transform_that_gives_each_image_its_own_size(tiny_cache, tmp_path, dtype):
    """v2.RandomResize: a batch of images of several sizes is resized image by image to the
    training size (keeping their dtype), in workers or not, instead of failing to stack."""
    from alexnet.augment import RECIPES, BatchAugment
    from alexnet.loader import PerImageBatches

    t = tmp_path / "t.py"
    scale = "" if dtype == "uint8" else ", v2.ToDtype(torch.float32, scale=True)"
    t.write_text("import torch\nfrom torchvision.transforms import v2\n\n"
                 f"def build_transforms():\n    return v2.Compose([v2.RandomResize(40, 90){scale}])\n")
    for workers in ("0", "2"):
        assert main(["train", "--variant", "combined_gap", "--transforms", str(t), "--workers", workers, "--data",
                     str(tiny_cache), "--out", str(tmp_path / workers), "--device", "cpu", "--num_classes", "4",
                     "--bs", "8", "--epochs", "1", "--no-progress"]) == 0
    # The batch: each image as torchvision would resize it to 64, then normalised.
    from alexnet.userfiles import load_transforms_file
    from alexnet.data import open_cache
    import torchvision.transforms.v2.functional as TF
    cache = open_cache(tiny_cache)
    aug = BatchAugment(RECIPES["baseline"], 64, cache.stats["mean"], cache.stats["std"])
    transform = load_transforms_file(t)
    batches = PerImageBatches(cache.train.x, cache.train.y, transform, aug, 4, 0, 0, str(t), t)
    xb, yb = next(iter(batches(torch.arange(8), 0)))
    want, sizes = [], set()
    for i in range(4):
        torch.manual_seed(i)  # each image seeded by its position (base 0)
        img = transform(torch.from_numpy(np.array(cache.train.x[i])).permute(2, 0, 1))
        sizes.add(img.shape)
        img = TF.resize(img.float()[None], [64, 64], antialias=True)[0]
        want.append(img.round().clamp(0, 255) / 255 if dtype == "uint8" else img)
    assert len(sizes) > 1  # the batch's images came out of the transform in several sizes
    want = TF.normalize(torch.stack(want), cache.stats["mean"], cache.stats["std"])
    torch.testing.assert_close(xb, want, atol=1e-4, rtol=1e-4)
    assert yb.tolist() == [int(v) for v in cache.train.y[:4]]


def test_a_model_file_that_exits_or_is_a_checkpoint(tiny_cache, out_with_files, capsys, tmp_path, small_ckpt):
    m = tmp_path / "m.py"
    m.write_text("import sys\nsys.exit(3)\n")
    err = _bad(tiny_cache, out_with_files, capsys, str(m))
    assert f"{m}: called sys.exit(3) (line 2) while loading; it must define build_model" in err
    err = _bad(tiny_cache, out_with_files, capsys, str(small_ckpt))
    assert f"{small_ckpt}: a zip archive (a checkpoint?), not a Python file; it must define build_model" in err


def test_model_or_transforms_path_that_is_a_directory(tiny_cache, out_with_files, capsys, tmp_path):
    assert _bad(tiny_cache, out_with_files, capsys, str(tmp_path)) == (
        f"error: {tmp_path}: is a directory, not a .py file; the file must define build_model(num_classes) "
        "returning a torch.nn.Module")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--transforms", str(tmp_path))
    assert err.startswith(f"error: {tmp_path}: is a directory, not a .py file; the file must define build_transforms()")


def test_evaluate_with_its_paths_swapped(capsys):
    assert main(["evaluate", "results/best.pth", "models/alexnet_baseline.py"]) == 2
    assert capsys.readouterr().err == ("error: evaluate takes [MODEL_FILE] CHECKPOINT, and the model file is a .py file; "
                                       "got results/best.pth; swapped? evaluate models/alexnet_baseline.py results/best.pth\n")


def test_prepare_needs_a_decoding_process(tmp_path, capsys):
    assert main(["prepare", "--source", str(tmp_path), "--data", str(tmp_path / "c"), "--workers", "-1"]) == 2
    assert "--workers must be >= 0 (decoding processes; 0 or 1 decodes in this process), got -1" in capsys.readouterr().err


def test_unreadable_model_file(tiny_cache, out_with_files, capsys, tmp_path):
    m = tmp_path / "m.py"
    m.write_bytes(b"\xff\xfe\x00garbage")
    assert f"{m}: cannot read it" in _bad(tiny_cache, out_with_files, capsys, str(m))


def test_run_that_never_started_leaves_no_out_folder(tmp_path, capsys):
    out = tmp_path / "new_out"
    assert main(["train", str(tmp_path / "nope.py"), "--data", str(tmp_path), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 2
    assert "nope.py: file not found" in capsys.readouterr().err and not out.exists()


def test_out_not_writable(tiny_cache, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, said in ((blocker / "sub", f"--out {blocker / 'sub'}: {blocker} is a file, not a folder"),
                      (blocker, f"--out {blocker}: is a file, not a folder")):
        code = main(["train", "--variant", "baseline", "--data", str(tiny_cache), "--out", str(out),
                     "--device", "cpu", "--num_classes", "4", "--no-progress"])
        assert code == 2 and said in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_the_default_data_folder_is_named_as_where_it_came_from(tiny_zip, out_with_files, capsys, monkeypatch,
                                                                tmp_path):
    # $ALEXNET_DATA, not ./data, is what leaving --data out uses when it is set.
    monkeypatch.setenv("ALEXNET_DATA", str(tmp_path / "cache"))
    err = _bad(tmp_path / "typo", out_with_files, capsys, "--variant", "baseline")
    assert err.endswith(f"or leave --data out to use $ALEXNET_DATA ({tmp_path / 'cache'})")
    monkeypatch.setenv("ALEXNET_DATA", str(tiny_zip))
    code = main(["train", "--variant", "baseline", "--out", str(out_with_files), "--device", "cpu", "--num_classes", "4",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: $ALEXNET_DATA ({tiny_zip}): is a file, not a cache directory" in err


def test_a_cache_label_out_of_range_is_named(tiny_cache, tmp_path, capsys):
    """A label file edited in place with its time kept is not re-hashed: its range is still
    checked when the cache is opened, instead of an IndexError deep inside the loss."""
    cache = shutil.copytree(tiny_cache, tmp_path / "cache")
    y = cache / "val_y.npy"
    st = y.stat()
    labels = np.load(y)
    labels[3] = 7  # 4 classes
    with open(y, "r+b") as f:  # in place, the same size
        f.seek(st.st_size - labels.nbytes)
        f.write(labels.tobytes())
    os.utime(y, ns=(st.st_atime_ns, st.st_mtime_ns))
    from alexnet.data import open_cache
    from alexnet.errors import DataError
    with pytest.raises(DataError, match=rf"{re.escape(str(y))}: labels from 0 to 7, expected 0 to 3 \(4 classes\)"):
        open_cache(cache)


def test_data_that_is_the_data_set_itself_or_a_file(tiny_layout, tiny_zip, out_with_files, capsys, monkeypatch,
                                                    tmp_path):
    """--data at the extracted data set or at its zip: told to run prepare, no download is
    started (the source is poisoned so that one would fail differently)."""
    monkeypatch.setenv("ALEXNET_SOURCE", "http://127.0.0.1:9/never.zip")
    err = _bad(tiny_layout, out_with_files, capsys, "--variant", "baseline")
    assert f"--data {tiny_layout}: holds no cache (no manifest.json) but what looks like a data set" in err
    assert f"alexnet prepare --source {tiny_layout} --data DIR" in err
    assert not (tiny_layout / "downloads").exists() and not (tiny_layout / ".prepare.lock").exists()
    err = _bad(tiny_zip, out_with_files, capsys, "--variant", "baseline")
    assert f"--data {tiny_zip}: is a file, not a cache directory" in err
    # What `unzip -d data` makes, as the default ./data: the data set one folder down.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_layout, tmp_path / "data" / tiny_layout.name)
    monkeypatch.delenv("ALEXNET_DATA", raising=False)
    code = main(["train", "--variant", "baseline", "--out", str(out_with_files), "--device", "cpu", "--num_classes", "4",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"data (the default --data): holds no cache (no manifest.json) but what looks like a data set" \
        f" ({tiny_layout.name}/wnids.txt)" in err
    assert f"alexnet prepare --source {Path('data', tiny_layout.name)} --data DIR" in err
    # A folder that holds the zip: the command named is one that prepare takes (the zip, not
    # the folder), and it does.
    (tmp_path / "dl").mkdir()
    shutil.copy(tiny_zip, tmp_path / "dl" / tiny_zip.name)
    err = _bad(tmp_path / "dl", out_with_files, capsys, "--variant", "baseline")
    source = tmp_path / "dl" / tiny_zip.name
    assert f"alexnet prepare --source {source} --data DIR" in err
    assert main(["prepare", "--source", str(source), "--data", str(tmp_path / "cache"), "--counts", "any"]) == 0


def test_prepare_from_a_missing_source_makes_no_folder(tmp_path, capsys):
    data = tmp_path / "new_cache"
    assert main(["prepare", "--source", str(tmp_path / "no_such_source"), "--data", str(data)]) == 2
    assert "no_such_source: no such file or folder" in capsys.readouterr().err
    assert not data.exists()  # so that a later --data names a missing folder, not an empty one


def test_data_folder_with_other_files_is_a_place_to_prepare(tmp_path, monkeypatch):
    """lost+found, a killed prepare's leftovers: not a data set, so the cache is made there."""
    from alexnet import data as data_mod

    folder = tmp_path / "vol"
    (folder / "lost+found").mkdir(parents=True)
    (folder / "train_x.npy.tmp").write_bytes(b"x")
    (folder / ".prepare.lock").write_bytes(b"")
    calls = []
    monkeypatch.setattr(data_mod, "ensure_cache", lambda d, log: calls.append(d) or "prepared")
    assert data_mod.cache_for(str(folder)) == "prepared" and calls == [folder]


def test_missing_data_path(out_with_files, capsys, tmp_path):
    err = _bad(tmp_path / "no_such_dir", out_with_files, capsys, "--variant", "baseline")
    assert "no_such_dir" in err and "does not exist" in err


def test_corrupted_cache(tiny_cache, tmp_path, out_with_files, capsys):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    with open(copy / "val_x.npy", "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\x00\xff" * 5)
    err = _bad(copy, out_with_files, capsys, "--variant", "baseline")
    assert "val_x.npy" in err


@pytest.fixture(scope="module")
def small_ckpt(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck")
    assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress"]) == 0
    return out / "best.pth"


def test_truncated_checkpoint(small_ckpt, tiny_cache, tmp_path, capsys):
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(small_ckpt.read_bytes()[:1000])
    assert main(["evaluate", str(bad), "--data", str(tiny_cache), "--device", "cpu"]) == 2
    assert f"{bad}: not a readable checkpoint" in capsys.readouterr().err
    for out in (tmp_path / "r", tmp_path / "new" / "runs" / "r"):
        code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out),
                     "--device", "cpu", "--num_classes", "4", "--bs", "8", "--no-progress", "--resume", str(bad)])
        assert code == 2 and "not a readable checkpoint" in capsys.readouterr().err
        assert os.listdir(tmp_path) == ["trunc.pth"]  # the run never started: no empty --out (or parent) left behind


@pytest.mark.parametrize("argv, script, said", [
    (["train", "models/alexnet_baseline.py", "--bogus", "2"], "train.py", "python train.py: error: unrecognized arguments: --bogus 2"),
    (["evaluate", "models/alexnet_baseline.py", "results/best.pth", "--num_classes", "100"], "evaluate.py",
     "python evaluate.py: error: unrecognized arguments: --num_classes 100"),
    (["summary", "--bogus"], None, "alexnet summary: error: unrecognized arguments: --bogus"),
])
def test_unknown_option_is_named_by_its_command(capsys, argv, script, said):
    """An unknown option gets the usage of the command it was given to, not the top level's
    list of commands."""
    with pytest.raises(SystemExit) as stopped:
        main(argv, script=script)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and said in err and "{prepare,train" not in err
    assert err.startswith(f"usage: {said.split(':')[0]} ")


def test_a_reader_that_goes_away_ends_the_output_quietly(small_ckpt, tmp_path):
    """`alexnet predict ... | head`: when the pipe's reader is gone the command stops without
    a traceback, with status 141 (128 + SIGPIPE) as a shell reports for such a writer."""
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as stdout to a pipe is
    proc = subprocess.Popen([sys.executable, "-m", "alexnet", "predict", str(small_ckpt), str(tmp_path), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    proc.stdout.close()  # the reader leaves before the first line
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


def test_evaluate_needs_a_checkpoint(capsys):
    assert main(["evaluate", "models/alexnet_baseline.py"]) == 2
    err = capsys.readouterr().err
    assert "got only the model file models/alexnet_baseline.py" in err and "results/best.pth" in err


def test_per_class_tables(small_ckpt, tiny_cache, tmp_path, capsys):
    """--per-class: one CSV per table (a reader takes each as it is), "\\n" line ends, every
    class once with its val count, accuracies that add up to the printed top-1, and the
    confused pairs as counts of off-diagonal predictions."""
    import csv

    path = tmp_path / "per_class.csv"
    assert main(["evaluate", str(small_ckpt), "--data", str(tiny_cache), "--device", "cpu", "--per-class", str(path)]) == 0
    printed = capsys.readouterr().out
    top1 = float(re.search(r"top-1 ([\d.]+)%", printed).group(1))
    pairs = tmp_path / "per_class_confused.csv"
    assert f"per-class accuracy written to {path}, the most-confused class pairs to {pairs}" in printed
    for f in (path, pairs):
        assert b"\r" not in f.read_bytes()
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["class", "wnid", "name", "top1", "n"]
    assert sorted(int(r["class"]) for r in rows) == [0, 1, 2, 3] and all(int(r["n"]) == 4 for r in rows)
    assert [float(r["top1"]) for r in rows] == sorted(float(r["top1"]) for r in rows)  # worst first
    assert sum(float(r["top1"]) * int(r["n"]) for r in rows) / 16 == pytest.approx(top1, abs=0.01)
    confused = list(csv.DictReader(pairs.open()))
    assert all(list(r) == ["true_wnid", "true_name", "predicted_wnid", "predicted_name", "count"] for r in confused)
    assert all(r["true_wnid"] != r["predicted_wnid"] and int(r["count"]) > 0 for r in confused)
    assert sum(int(r["count"]) for r in confused) == round(16 * (100 - top1) / 100)  # 12 pairs of 4 classes, under the 20 written: every error


def test_per_class_tables_are_written_before_anything_is_printed(small_ckpt, tiny_cache, tmp_path):
    """A reader that left (`evaluate ... --per-class F | head -0`) fails the first print: the
    evaluation's tables are written by then, not lost with it."""
    from alexnet.inference import run_evaluate

    def gone(*_):
        raise BrokenPipeError

    path = tmp_path / "per_class.csv"
    with pytest.raises(BrokenPipeError):
        run_evaluate(None, small_ckpt, data=str(tiny_cache), device="cpu", per_class=str(path), log=gone)
    assert path.is_file() and (tmp_path / "per_class_confused.csv").is_file()


def test_output_tables_never_land_on_a_checkpoint(small_ckpt, tiny_cache, tmp_path, capsys):
    """--per-class and --csv refuse a checkpoint's or model file's name, and any path that is
    one of the command's inputs under another name (best.pth and last.pth are one file, so
    writing through either would lose both); a table written over a hard link replaces the link,
    not the file it shared."""
    run = shutil.copytree(small_ckpt.parent, tmp_path / "run")
    ck = run / "best.pth"
    before = ck.read_bytes()
    alias = tmp_path / "looks_like_a_table.csv"
    os.link(ck, alias)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    cases = [
        (["evaluate", str(ck), "--data", str(tiny_cache), "--per-class", str(run / "last.pth")],
         f"--per-class {run / 'last.pth'}: names a checkpoint or model file (.pth); give the path of a CSV file"),
        (["evaluate", str(ck), "--data", str(tiny_cache), "--per-class", str(alias)],
         f"--per-class {alias}: is one of this command's input files (or a link to one)"),
        (["predict", str(ck), str(image), "--csv", str(run / "best.pth")],
         f"--csv {run / 'best.pth'}: names a checkpoint or model file (.pth); give the path of a CSV file to write, "
         f"e.g. predictions.csv"),
        (["predict", str(ck), str(image), "--csv", str(alias)],
         f"--csv {alias}: is one of this command's input files (or a link to one)"),
        (["evaluate", str(ck), "--data", str(tiny_cache), "--per-class", ""],
         "--per-class must name a CSV file to write, got an empty path"),
        (["predict", str(ck), str(image), "--csv", " "], "--csv must name a CSV file to write, got an empty path"),
    ]
    for args, expected in cases:
        assert main([*args, "--device", "cpu"]) == 2
        assert expected in capsys.readouterr().err
    assert ck.read_bytes() == before and (run / "last.pth").read_bytes() == before
    kept = tmp_path / "kept.csv"
    kept.write_text("class,wnid,name,top1,n\nan earlier table\n")
    table = tmp_path / "table.csv"
    os.link(kept, table)
    assert main(["evaluate", str(ck), "--data", str(tiny_cache), "--per-class", str(table), "--device", "cpu"]) == 0
    assert kept.read_text() == "class,wnid,name,top1,n\nan earlier table\n"
    assert table.read_text().startswith("class,wnid,name,top1,n\n") and "an earlier table" not in table.read_text()


def test_output_tables_replace_only_earlier_tables_of_their_kind(small_ckpt, tiny_cache, tmp_path, capsys):
    """A mistyped --per-class or --csv must not replace a run's metrics.csv, a cache's files or
    a device (replaced by rename, /dev/null would become a file): only an earlier table of
    the same kind, or an empty file, is replaced."""
    ck, cache = small_ckpt, shutil.copytree(tiny_cache, tmp_path / "cache")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,train_loss\n1,2.0\n")
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    evaluate = ["evaluate", str(ck), "--data", str(cache), "--device", "cpu", "--per-class"]
    predict = ["predict", str(ck), str(image), "--device", "cpu", "--csv"]
    for command in (evaluate, predict):
        flag = command[-1]
        for target in (metrics, cache / "manifest.json", cache / "val_y.npy"):
            before = target.read_bytes()
            assert main([*command, str(target)]) == 2
            assert f"{flag} {target}: holds a file this command did not write" in capsys.readouterr().err
            assert target.read_bytes() == before
        assert main([*command, str(pipe)]) == 2
        assert f"{flag} {pipe}: exists and is not a regular file" in capsys.readouterr().err
        assert pipe.is_fifo()
    # An earlier table of its kind (predictions of another --topk too, or one a spreadsheet saved
    # again with a byte-order mark), or an empty file: replaced.
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfclass,wnid,name,top1,n\r\n")
    assert main([*evaluate, str(tmp_path / "bom.csv")]) == 0
    (tmp_path / "pc.csv").write_text("")
    assert main([*evaluate, str(tmp_path / "pc.csv")]) == 0
    assert main([*evaluate, str(tmp_path / "pc.csv")]) == 0
    assert main([*predict, str(tmp_path / "p.csv"), "--topk", "2"]) == 0
    assert main([*predict, str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().startswith("image,wnid1,name1,prob1,wnid2,name2,prob2,wnid3")


def test_per_class_table_of_a_class_without_val_images(tmp_path):
    """An image folder may give a class no val images: its row says n 0 and no accuracy
    (not 0% of a made-up 1), and it is not listed as the worst class."""
    import csv

    from alexnet.evaluate import write_per_class

    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    path = tmp_path / "pc.csv"
    write_per_class(path, confusion, ["a", "b", "c"], ["A", "B", "C"])
    rows = [(r["wnid"], r["top1"], r["n"]) for r in csv.DictReader(path.open())]
    assert rows == [("c", "50.00", "4"), ("a", "75.00", "4"), ("b", "", "0")]


@pytest.mark.parametrize("kind", ["directory", "unmakeable folder", "pairs' file a directory"])
def test_per_class_path_is_checked_before_evaluating(small_ckpt, tiny_cache, tmp_path, capsys, monkeypatch, kind):
    from alexnet import inference

    monkeypatch.setattr(inference, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --per-class"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = {"directory": tmp_path, "unmakeable folder": blocker / "sub" / "per_class.csv",
            "pairs' file a directory": tmp_path / "pc.csv"}[kind]
    (tmp_path / "pc_confused.csv").mkdir()
    assert main(["evaluate", str(small_ckpt), "--data", str(tiny_cache), "--device", "cpu", "--per-class", str(path)]) == 2
    err = capsys.readouterr().err
    expected = {"directory": f"--per-class {path}: is a directory",
                "unmakeable folder": f"--per-class {path}: {blocker} is a file, not a folder",
                # the file the user did not name is named as what it is
                "pairs' file a directory": f"--per-class {path}: its confused pairs' file "
                                           f"{tmp_path / 'pc_confused.csv'}: is a directory"}[kind]
    assert expected in err


@pytest.mark.parametrize("kind", ["directory", "foreign", "old format"])
def test_checkpoint_that_is_not_one(small_ckpt, tiny_cache, tmp_path, capsys, kind):
    path = tmp_path / "x.pth"
    if kind == "directory":
        path.mkdir()
        match = f"{path}: is a directory; give the checkpoint file in it"
    elif kind == "foreign":
        torch.save({"model": {}, "epoch": 3}, path)  # the shape of many other projects' checkpoints
        match = f"{path}: not a checkpoint written by this project"
    else:
        c = torch.load(small_ckpt, weights_only=False)
        torch.save({**c, "format": 0}, path)
        match = f"{path}: written by another version of this project (checkpoint format 0; this version reads format"
    assert main(["evaluate", str(path), "--data", str(tiny_cache), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["evaluate", "ablate"])
def test_missing_data_path_other_commands(small_ckpt, tmp_path, capsys, command):
    """A mistyped --data is an error, not a folder to download the data set into."""
    missing = tmp_path / "no_such_dir"
    args = [str(small_ckpt)] if command == "evaluate" else ["--out", str(tmp_path / "study")]
    assert main([command, *args, "--data", str(missing), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--data {missing}: directory does not exist" in err and not missing.exists()


def test_checkpoint_of_other_variant_or_classes(small_ckpt, tiny_cache, tmp_path, capsys):
    assert main(["evaluate", str(ROOT / "models/alexnet_bn.py"), str(small_ckpt), "--data", str(tiny_cache),
                 "--device", "cpu"]) == 2
    assert "trained as variant 'combined_gap', but the model here is 'batchnorm'" in capsys.readouterr().err
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "x"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--no-progress", "--resume", str(small_ckpt),
                 "--epochs", "2", "--max-steps", "1"])
    assert code == 0  # the same variant resumes
    from alexnet import checkpoint

    c = checkpoint.load(small_ckpt)
    with pytest.raises(Exception, match="trained for 4 classes, but the model here has 10"):
        checkpoint.check_compatible(c, small_ckpt, "combined_gap", 10)


def test_a_gap_checkpoint_from_before_gap_input_keeps_its_pool5(small_ckpt, tiny_cache, tmp_path, capsys):
    """Checkpoints record the model's settings. One written before `gap_input` existed was
    trained with pool5 before the average: rebuilt so from the checkpoint alone, and refused
    by a model file (or a resume) that builds the conv5 head, whose weights would fit it."""
    import torch

    from alexnet import checkpoint
    from alexnet.inference import load_trained

    c = checkpoint.load(small_ckpt)
    assert c["model_cfg"]["gap_input"] == "conv5"
    del c["model_cfg"]["gap_input"]
    old = tmp_path / "old.pth"
    checkpoint.save_atomic(c, old)
    model, _, _ = load_trained(old, None, torch.device("cpu"))
    assert model.cfg.gap_input == "pool5" and isinstance(model.features[-1], torch.nn.MaxPool2d)
    assert main(["evaluate", str(old), "--data", str(tiny_cache), "--device", "cpu"]) == 0
    capsys.readouterr()
    why = f"{old}: trained with gap_input='pool5', but the model here has gap_input='conv5'"
    assert main(["evaluate", str(ROOT / "models/alexnet_combined_gap.py"), str(old), "--data", str(tiny_cache),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {why}")
    assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "x"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--no-progress", "--resume", str(old),
                 "--epochs", "2", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert why in err and ("a model file returning create_model('combined_gap', num_classes, gap_input='pool5') "
                           "builds it; evaluate and predict rebuild it from the checkpoint alone") in err
    # That model file: the same model under another name, so it evaluates and resumes the old run.
    pool5 = tmp_path / "pool5.py"
    pool5.write_text("from alexnet.models import create_model\n\n\ndef build_model(num_classes):\n"
                     "    return create_model('combined_gap', num_classes, gap_input='pool5')\n")
    assert main(["evaluate", str(pool5), str(old), "--data", str(tiny_cache), "--device", "cpu"]) == 0
    assert main(["train", str(pool5), "--data", str(tiny_cache), "--out", str(tmp_path / "y"), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--no-progress", "--resume", str(old), "--epochs", "2",
                 "--max-steps", "1"]) == 0


def test_predict_non_image(small_ckpt, tmp_path, capsys):
    txt = tmp_path / "notes.jpg"
    txt.write_text("not an image")
    assert main(["predict", str(small_ckpt), str(txt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{txt}: not an image PIL can read" in err and "1 of 1 files skipped, not readable as images (none was" in err
    # With --csv, an earlier table is left as it was: there is nothing to replace it with.
    table = tmp_path / "pred.csv"
    table.write_text("image,wnid1,name1,prob1\nold.jpg,n0,a,1.0\n")
    assert main(["predict", str(small_ckpt), str(txt), "--device", "cpu", "--csv", str(table)]) == 2
    assert table.read_text() == "image,wnid1,name1,prob1\nold.jpg,n0,a,1.0\n"
    assert "written to" not in capsys.readouterr().out


def test_predict_an_image_too_large_for_pil_says_so(small_ckpt, tmp_path, capsys, monkeypatch):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)  # 10,000 pixels: over twice the limit, refused
    assert main(["predict", str(small_ckpt), str(big), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{big}: Image size (10000 pixels) exceeds limit" in err and "Image.MAX_IMAGE_PIXELS" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tiny_cache, out_with_files, capsys):
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--device", "cuda")
    assert "--device cuda: CUDA is not available" in err


def test_resume_command_for_each_entry_point(monkeypatch):
    from alexnet.train import resume_command

    monkeypatch.setattr(sys, "argv", ["/usr/bin/alexnet", "train", "--variant", "bn", "--resume", "x.pth", "--bs", "8"])
    assert resume_command(None) == "alexnet train --variant bn --bs 8 --resume"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/alexnet", "ablate", "--variants", "bn", "--out", "study"])
    assert resume_command(None) == "alexnet ablate --variants bn --out study"  # a run of a study: the study again
    monkeypatch.setattr(sys, "argv", ["train.py", "models/alexnet_bn.py", "--out", "r"])
    assert resume_command(None) == "python train.py models/alexnet_bn.py --out r --resume"
    monkeypatch.setattr(sys, "argv", ["train.py", "models/alexnet_bn.py", "--out", "my runs/it's"])
    assert resume_command(None) == """python train.py models/alexnet_bn.py --out 'my runs/it'"'"'s' --resume"""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(None).startswith("torchrun --nproc_per_node=2 train.py models/alexnet_bn.py")
    monkeypatch.setenv("WORLD_SIZE", "16")  # two nodes of 8: the command must start 16 processes again
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(None) == ("torchrun --nnodes=2 --node_rank=$NODE_RANK <this run's --rdzv options> "
                                    "--nproc_per_node=8 train.py models/alexnet_bn.py --out "
                                    "'my runs/it'\"'\"'s' --resume (on every node)")


@pytest.mark.parametrize("args,change", [
    (["--seed", "1"], "--seed 0 -> 1"),
    (["--lr", "0.02"], "--lr 0.01 -> 0.02"),
    (["--momentum", "0.8"], "--momentum 0.9 -> 0.8"),
    (["--wd", "0"], "--wd 0.0005 -> 0.0"),
    (["--nesterov"], "--nesterov False -> True"),
    (["--schedule", "cosine"], "--schedule plateau -> cosine"),
    (["--schedule", "constant", "--warmup-epochs", "1"], "--schedule plateau -> constant; --warmup-epochs 0.0 -> 1.0"),
    (["--label-smoothing", "0.1"], "--label-smoothing 0.0 -> 0.1"),
    (["--recipe", "baseline"], "--recipe None -> baseline"),
    (["--transforms", "utils/transforms_combined.py"], "--transforms None -> utils/transforms_combined.py"),
    (["--img-size", "72"], "--img-size 64 -> 72"),
    (["--max-steps", "2"], "--max-steps 1 -> 2"),
    (["--amp"], "--amp False -> True"),
    (["--deterministic"], "--deterministic False -> True"),
])
def test_resume_refuses_each_setting_that_shapes_the_run(small_ckpt, tiny_cache, tmp_path, capsys, args, change):
    from alexnet.train import TRAJECTORY

    assert change.split()[0][2:].replace("-", "_") in TRAJECTORY
    base = ["--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "r"), "--device", "cpu",
            "--num_classes", "4", "--bs", "8", "--epochs", "2", "--max-steps", "1", "--no-progress"]
    code = main(["train", *base, *args, "--resume", str(small_ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and f"made with other settings ({change}" in err


def test_resume_takes_the_same_transforms_file_under_another_name(tiny_cache, tmp_path, monkeypatch):
    """The transforms file named from another folder, or by its absolute path, is the same
    file: resumed, not refused as another setting."""
    t = tmp_path / "tf" / "t.py"
    t.parent.mkdir()
    t.write_text("def build_transforms():\n    return lambda img: img\n")
    monkeypatch.chdir(t.parent)
    base = ["--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "r"), "--device", "cpu",
            "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--no-progress", "--workers", "0"]
    assert main(["train", *base, "--epochs", "1", "--transforms", "t.py"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", *base, "--epochs", "2", "--transforms", str(t), "--resume"]) == 0
    assert torch.load(tmp_path / "r" / "last.pth", weights_only=False)["epoch"] == 2


def test_every_setting_that_shapes_the_run_is_tested():
    from alexnet.train import TRAJECTORY

    tested = {w[2:].replace("-", "_") for _, c in test_resume_refuses_each_setting_that_shapes_the_run.pytestmark[0].args[1]
              for w in c.split() if w.startswith("--")}
    assert set(TRAJECTORY) == tested | {"bs", "channels_last", "sync_bn"}  # those: the tests below


def test_resume_refuses_a_run_trained_with_other_batchnorm_statistics(small_ckpt, tiny_cache, tmp_path, capsys):
    # --sync-bn needs CUDA: the run's checkpoint says it was made with it, this CPU run is not.
    c = torch.load(small_ckpt, weights_only=False)
    c["config"]["sync_bn"] = True
    torch.save(c, tmp_path / "synced.pth")
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--no-progress",
                 "--resume", str(tmp_path / "synced.pth")])
    assert code == 2 and "made with other settings (--sync-bn True -> False)" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(small_ckpt, tiny_cache, tmp_path, capsys):
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "16", "--max-steps", "1", "--no-progress",
                 "--resume", str(small_ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "made with other settings (--bs 8 -> 16)" in err
    # The layout changes the rounding: a run trained in fp32 NCHW does not continue in channels_last.
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "r2"),
                 "--device", "cpu", "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--no-progress",
                 "--channels-last", "--resume", str(small_ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "made with other settings (--channels-last False -> True)" in err


def test_fresh_run_does_not_overwrite_a_previous_one(small_ckpt, tiny_cache, tmp_path, capsys):
    out = shutil.copytree(small_ckpt.parent, tmp_path / "previous")  # the fixture's run stays as it is
    before = (out / "best.pth").read_bytes()
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--no-progress"])
    assert code == 2 and "holds a previous run" in capsys.readouterr().err
    assert (out / "best.pth").read_bytes() == before
    (out / "last.pth").unlink()  # a checkpoint kept there on its own (results/best.pth, evaluate's default path)
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--no-progress"])
    assert code == 2 and (f"--out {out}: holds a checkpoint (best.pth) that a new run would replace"
                          in capsys.readouterr().err)
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--no-progress", "--resume"])  # nothing to resume
    assert code == 2 and (f"--out {out}: holds best.pth but no last.pth to continue from; continue from best.pth "
                          f"with --resume {out / 'best.pth'}") in capsys.readouterr().err
    assert (out / "best.pth").read_bytes() == before
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--max-steps", "1", "--epochs", "2", "--no-progress",
                 "--resume", str(out / "best.pth")])  # what it says works
    assert code == 0 and torch.load(out / "last.pth", weights_only=False)["epoch"] == 2


def test_a_run_folder_in_use_by_another_process_is_refused(small_ckpt, tiny_cache, tmp_path, capsys):
    """Two runs into one --out would replace each other's checkpoints and metrics: the second
    is refused while the first holds the folder; the lock goes with its process."""
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(120)\n", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        args = ["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(out), "--device", "cpu",
                "--num_classes", "4", "--bs", "8", "--epochs", "1", "--max-steps", "1", "--no-progress"]
        assert main(args) == 2
        assert f"--out {out}: in use by another training run" in capsys.readouterr().err
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0 and (out / "last.pth").is_file()


def test_resume_into_another_runs_folder_is_refused_and_temporaries_are_cleared(small_ckpt, tiny_cache, tmp_path,
                                                                              capsys):
    a = shutil.copytree(small_ckpt.parent, tmp_path / "a")
    b = shutil.copytree(small_ckpt.parent, tmp_path / "b")
    (b / "last.pth").unlink()
    shutil.copy(a / "last.pth", b / "last.pth")  # another run's checkpoint, not a's file
    before = (b / "last.pth").read_bytes()
    args = ["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--device", "cpu", "--num_classes", "4",
            "--bs", "8", "--epochs", "2", "--max-steps", "1", "--no-progress"]
    assert main([*args, "--out", str(b), "--resume", str(a / "last.pth")]) == 2
    assert f"--out {b}: holds another run's last.pth" in capsys.readouterr().err
    assert (b / "last.pth").read_bytes() == before
    assert main([*args, "--out", str(b), "--resume", str(b / "best.pth")]) == 0  # a run's own checkpoint: its own run
    assert f"resumed from {b / 'best.pth'}" in capsys.readouterr().out
    left = a / ".last.pth.k1ll3d.tmp"  # what a save killed mid-write leaves
    left.write_bytes(b"half a checkpoint")
    assert main([*args, "--out", str(a), "--resume"]) == 0
    assert not left.exists() and f"removed 1 temporary file(s) that a killed run left in {a}" in capsys.readouterr().out


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_ckpt, tiny_cache, tmp_path, capsys, monkeypatch):
    import errno

    from alexnet import atomic

    run = shutil.copytree(small_ckpt.parent, tmp_path / "run")
    before = (run / "last.pth").read_bytes()

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    code = main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(run), "--device", "cpu",
                 "--num_classes", "4", "--bs", "8", "--epochs", "2", "--max-steps", "1", "--no-progress", "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: No space left on device") and "\n" not in err, err
    assert "run the command again (a training run continues with --resume)" in err
    assert (run / "last.pth").read_bytes() == before and not list(run.glob(".*.tmp"))


def test_config_json_is_replaced_whole_not_rewritten_in_place(small_ckpt, tiny_cache, tmp_path):
    """Readers of config.json (report, ablate's settings check) never see half a file: a resume
    writes a new one and moves it into place, so a copy opened before still reads whole."""
    run = shutil.copytree(small_ckpt.parent, tmp_path / "run")
    with open(run / "config.json") as before:
        assert main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(run), "--device",
                     "cpu", "--num_classes", "4", "--bs", "8", "--epochs", "2", "--max-steps", "1", "--no-progress",
                     "--resume"]) == 0
        old = json.load(before)
    assert old["epochs"] == 1 and json.loads((run / "config.json").read_text())["epochs"] == 2


def test_torchvision_transform_that_fails_when_applied(tiny_cache, out_with_files, capsys, tmp_path):
    t = tmp_path / "t.py"
    t.write_text("def build_transforms():\n    return lambda img: img.float() / 0 + undefined_name\n")
    err = _bad(tiny_cache, out_with_files, capsys, "--variant", "baseline", "--transforms", str(t), "--workers", "0")
    assert f"{t}: the transform raised NameError" in err


def test_rng_state_from_another_device_is_skipped():
    from alexnet import checkpoint

    g = torch.Generator()
    state = checkpoint.rng_state(g)
    state["aug"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 3
    torch.rand(5)  # moves the global state on
    checkpoint.set_rng_state(state, g)  # no error: training reseeds these every step anyway
    assert torch.equal(torch.get_rng_state(), state["torch"])  # the CPU's own state is restored


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc settings")
def test_free_heap_memory_is_handed_back_between_phases():
    # In a fresh process: with the settings applied, a freed 256 MiB block stays resident
    # (that is their point); release_free_memory() gives its pages back.
    code = """
import torch
from alexnet.allocator import keep_freed_memory, release_free_memory
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024
assert keep_freed_memory()
x = torch.ones(64 * 2**20); del x
kept = anon()
release_free_memory()
print(kept, anon())
"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "ALEXNET_MALLOC")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    kept, released = map(int, out.split())
    assert kept - released >= 200, (kept, released)


def test_allocator_settings_respect_the_user(monkeypatch):
    from alexnet.allocator import keep_freed_memory

    monkeypatch.setenv("ALEXNET_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv("ALEXNET_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user tunes glibc: leave it alone
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert keep_freed_memory() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    """An allocation that fails (a huge --img-size, a batch too large for the GPU) is said in
    one line with what to change, not as PyTorch's traceback."""
    from alexnet import summary

    monkeypatch.setattr(summary, "print_summary", lambda *a, **k: torch.empty(2**62, dtype=torch.uint8))
    assert main(["summary", "combined_gap"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory (the CPU: 4,294,967,296.0 GiB asked for at once): a smaller --bs or "
                          "--img-size needs less") and "\n" not in err

    def gpu(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                          "of 79.1 GiB of which 1.2 GiB is free.\nmore")

    monkeypatch.setattr(summary, "print_summary", gpu)
    assert main(["summary", "combined_gap"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                          "capacity of 79.1 GiB of which 1.2 GiB is free): a smaller --bs") and "\n" not in err
    monkeypatch.setattr(summary, "print_summary", lambda *a, **k: 1 / 0)  # any other error is not hidden
    with pytest.raises(ZeroDivisionError):
        main(["summary", "combined_gap"])


def test_a_checkpoint_whose_recipe_cannot_be_used_is_named(small_ckpt, tiny_cache, tmp_path, capsys):
    c = torch.load(small_ckpt, weights_only=False)
    c["recipe"] = {**(c["recipe"] or {}), "flip": "yes"}
    torch.save(c, tmp_path / "odd.pth")
    assert main(["evaluate", str(tmp_path / "odd.pth"), "--data", str(tiny_cache), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'odd.pth'}: its augmentation recipe ") and "\n" not in err
    assert err.endswith("cannot be used: flip must be True or False, got 'yes'")


def test_an_evaluation_given_up_leaves_the_plot_of_the_epochs_done(tiny_cache, tmp_path, monkeypatch):
    # Epoch 2's plot waits for PLOT_EVERY_S; the stop during epoch 3's evaluation draws it.
    from alexnet import metrics as metrics_module
    from alexnet import train

    plotted, evals = [], []
    real_plot, real_eval = metrics_module.plot_curves, train.evaluate
    monkeypatch.setattr(metrics_module, "plot_curves", lambda path, history, **k: plotted.append(len(history)))

    def evaluate(*a, **k):
        evals.append(1)
        if len(evals) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_eval(*a, **k)

    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(SystemExit):
        main(["train", "--variant", "combined_gap", "--data", str(tiny_cache), "--out", str(tmp_path / "o"),
              "--device", "cpu", "--num_classes", "4", "--bs", "8", "--epochs", "4", "--max-steps", "1",
              "--no-progress"])
    assert plotted[0] == 1 and plotted[-1] == 2
