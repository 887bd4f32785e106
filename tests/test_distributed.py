"""torchrun with 2 CPU processes (gloo): both ranks train, agree on every metric and weight,
count each val image once, and the checkpoint loads in a single process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alexnet.inference import run_evaluate
from tests.test_reliability import strip_times

ROOT = Path(__file__).resolve().parents[1]
# The drivers live in tmp_path, so Python puts that folder, not the checkout, on sys.path: name
# the checkout, so that the suite also runs where the project is not installed (a GPU machine).
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

DRIVER = textwrap.dedent("""
    import hashlib, json, os, sys, torch
    import alexnet.train as train
    from alexnet.config import TrainConfig
    from alexnet.train import fit
    cache, out, sync_bn = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    runs = []  # fit's Run, to read this rank's weights at the end
    build_run = train.build_run
    train.build_run = lambda *a, **k: runs.append(build_run(*a, **k)) or runs[-1]
    try:
        r = fit(TrainConfig(variant="combined_gap", data=cache, out=out, device="cpu", num_classes=4, bs=8, epochs=2,
                            lr=0.05, progress=False, sync_bn=sync_bn), log=lambda *a: None)
    except Exception as e:
        sys.exit(f"error: {e}")
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        weights = runs[0].model.state_dict()
        digest = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in weights.values())).hexdigest()
        json.dump({"history": r["history"], "weights": digest}, f)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sync_bn", [False, True], ids=["ddp", "sync-bn-refused-on-cpu"])
def test_torchrun_two_processes(learnable_cache, tmp_path, sync_bn):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(learnable_cache), str(out), "1" if sync_bn else "0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=ENV)
    if sync_bn:  # the driver trains on the CPU, where SyncBatchNorm cannot run
        assert r.returncode != 0 and "--sync-bn needs CUDA" in r.stderr  # SyncBatchNorm is GPU-only
        return
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert strip_times(ranks[0]["history"]) == strip_times(ranks[1]["history"])
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same bytes, every tensor
    n_val = len(__import__("numpy").load(learnable_cache / "val_y.npy"))
    assert all(row["val_n"] == n_val for row in ranks[0]["history"])
    ck = torch.load(out / "last.pth", weights_only=False)
    assert ck["config"]["sync_bn"] is sync_bn
    res = run_evaluate(None, out / "best.pth", data=learnable_cache, device="cpu", log=lambda *a: None)
    assert res["n"] == n_val
    best = max(r["val_top1"] for r in ranks[0]["history"])
    assert abs(res["top1"] - best) < 1e-6


STOP_DRIVER = textwrap.dedent("""
    import sys
    from alexnet.config import TrainConfig
    from alexnet.train import fit
    cache, out = sys.argv[1], sys.argv[2]
    fit(TrainConfig(variant="combined_gap", data=cache, out=out, device="cpu", num_classes=4, bs=8, epochs=50,
                    lr=0.05, progress=False), log=lambda *a: print(*a, flush=True))
""")


@pytest.mark.slow
def test_torchrun_stop_request_saves_once_every_rank_agrees(learnable_cache, tmp_path):
    """SIGTERM to the whole process group, as Ctrl-C in a terminal or a scheduler sends it:
    each worker gets it, and torchrun passes it on once more. Every rank finishes its step,
    rank 0 saves, all leave with 128 + SIGTERM, and the checkpoint resumes in one process."""
    driver = tmp_path / "driver.py"
    driver.write_text(STOP_DRIVER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(learnable_cache), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=ENV)
    seen = []
    for line in proc.stdout:  # until epoch 1 is over: the second epoch is under way
        seen.append(line)
        if line.startswith("epoch 1/50"):
            break
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)  # a hang guard, not a time limit on the work
    printed = "".join(seen) + rest
    # torchrun itself ends with its own traceback (SignalException); none may come from this project
    assert "stopped by SIGTERM at " in printed and "KeyboardInterrupt" not in printed, printed[-3000:]
    tracebacks = printed.split("Traceback", 1)[1] if "Traceback" in printed else ""
    assert "alexnet/" not in tracebacks, printed[-3000:]
    ck = torch.load(out / "last.pth", weights_only=False)
    assert ck["epoch"] >= 1 and ck["world"] == 2
    where = printed.split("stopped by SIGTERM at ")[1].split(";")[0]
    if ck["batch"] == 0:
        assert where == f"the end of epoch {ck['epoch']}"
    else:  # mid-epoch, or after its last step where the evaluation was under way and given up
        assert where in (f"epoch {ck['epoch'] + 1}, step {ck['batch']} of 12",
                         f"epoch {ck['epoch'] + 1}, step 12 of 12 (its evaluation was cut short and runs first on resume)")


GIVE_UP_DRIVER = textwrap.dedent("""
    import os, sys, torch
    from alexnet import distributed
    from alexnet.augment import RECIPES, BatchAugment
    from alexnet.evaluate import evaluate
    d = distributed.setup("cpu")
    x = torch.randint(0, 256, (40, 64, 64, 3), dtype=torch.uint8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 4))
    aug = BatchAugment(RECIPES["baseline"], 64, [0.5] * 3, [0.25] * 3)
    batches = []
    stop = lambda: batches.append(1) or (d.rank == 1 and len(batches) == 2)  # rank 1's request, before its batch 2
    whole = evaluate(model, x, torch.arange(40) % 4, aug, d, bs=4)
    cut = evaluate(model, x, torch.arange(40) % 4, aug, d, bs=4, stop=stop)
    print(f"rank {d.rank}: whole n {whole['n']}, cut {cut}, asked {len(batches)}", flush=True)
    distributed.cleanup(d)
""")


def test_torchrun_an_evaluation_given_up_on_one_rank_is_given_up_on_all(tmp_path):
    """A stop request seen by one rank during an evaluation: that rank gives it up, the other
    finishes its share, and both learn from the one all-reduce of the counts that there is no
    result (training then saves the epoch with its evaluation to run on resume)."""
    driver = tmp_path / "driver.py"
    driver.write_text(GIVE_UP_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    printed = r.stdout + r.stderr
    assert r.returncode == 0, printed[-3000:]
    assert "rank 0: whole n 40, cut None, asked 5" in printed, printed[-3000:]  # its 20 images: 5 batches
    assert "rank 1: whole n 40, cut None, asked 2" in printed, printed[-3000:]


UNSHARED_DRIVER = textwrap.dedent("""
    import os, sys
    from alexnet.config import TrainConfig
    from alexnet.errors import UserError
    from alexnet.train import fit
    rank = os.environ["RANK"]
    out = sys.argv[2] if rank == "0" else sys.argv[3]  # each node's --out: one of them has no last.pth
    try:
        fit(TrainConfig(variant="combined_gap", data=sys.argv[1], out=out, device="cpu", num_classes=4, bs=8,
                        epochs=2, max_steps=1, progress=False, resume="auto"), log=lambda *a: None)
        print(f"rank {rank}: trained", flush=True)
    except UserError as e:
        print(f"rank {rank}: {e}", flush=True)
""")


def test_torchrun_resume_where_a_rank_cannot_see_the_checkpoint_is_refused(tiny_cache, tmp_path):
    """Two nodes without a shared --out: rank 0 sees last.pth, rank 1 none. Both refuse,
    instead of rank 1 starting afresh beside a resumed rank 0."""
    ran = subprocess.run([sys.executable, "-m", "alexnet", "train", "--variant", "combined_gap", "--data",
                          str(tiny_cache), "--out", str(tmp_path / "seen"), "--device", "cpu", "--num_classes", "4",
                          "--bs", "8", "--epochs", "2", "--max-steps", "1", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert ran.returncode == 0, ran.stderr[-3000:]
    driver = tmp_path / "driver.py"
    driver.write_text(UNSHARED_DRIVER)
    for outs in (("seen", "unseen"), ("unseen", "seen")):  # rank 0's folder, rank 1's
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               str(tiny_cache), *(str(tmp_path / o) for o in outs)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
        printed = r.stdout + r.stderr
        for rank, out in enumerate(outs):
            there = "there" if out == "seen" else "not there"
            assert (f"rank {rank}: --resume: {tmp_path / out / 'last.pth'} is {there} for rank {rank} and "
                    in printed), printed[-3000:]
        assert "trained" not in printed
        assert not (tmp_path / "unseen").exists()  # rank 0 made it for the run, and took it away again


FAILED_WRITE_DRIVER = textwrap.dedent("""
    import os, sys
    import alexnet.checkpoint as ckpt_io
    from alexnet.config import TrainConfig
    from alexnet.train import fit
    rank, real_close = os.environ["RANK"], ckpt_io.CheckpointWriter.close

    def close(writer):  # rank 0's last checkpoint write fails, as on a full disk
        real_close(writer)
        if rank == "0":
            raise OSError(28, "No space left on device (simulated)")

    ckpt_io.CheckpointWriter.close = close
    try:
        fit(TrainConfig(variant="combined_gap", data=sys.argv[1], out=sys.argv[2], device="cpu", num_classes=4,
                        bs=8, epochs=1, lr=0.05, progress=False), log=lambda *a: None)
        print(f"rank {rank}: finished", flush=True)
    except OSError as e:
        print(f"rank {rank}: {e}", flush=True)
        sys.exit(1)
""")


@pytest.mark.slow
def test_torchrun_a_failed_last_write_on_rank_0_leaves_the_others_to_finish(learnable_cache, tmp_path):
    """The end of a run agrees across ranks on stop requests (one all-reduce): rank 0, whose
    last write failed, takes part before it raises, so rank 1 finishes instead of losing its
    connection in the middle of that all-reduce (or, with NCCL, waiting in it)."""
    driver = tmp_path / "driver.py"
    driver.write_text(FAILED_WRITE_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(learnable_cache), str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    printed = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 0: [Errno 28] No space left on device (simulated)" in printed, printed[-3000:]
    assert "rank 1: finished" in printed, printed[-3000:]


def test_more_processes_than_gpus_is_one_clear_line(monkeypatch):
    # Checked before the process group is made: otherwise a raw CUDA "invalid device ordinal".
    from alexnet import distributed
    from alexnet.errors import UserError

    for k, v in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("the group was made before the check"))
    with pytest.raises(UserError, match=r"local rank 3 \(LOCAL_RANK\).*this node has 2 GPUs: give torchrun "
                                        r"--nproc_per_node=2 or fewer"):
        distributed.setup("cuda")


@pytest.mark.parametrize("env,said", [
    ({"WORLD_SIZE": "abc"}, "$WORLD_SIZE must be a whole number (torchrun sets it for each process), got 'abc'"),
    ({"WORLD_SIZE": "2"}, "$WORLD_SIZE is 2 but $RANK, $MASTER_ADDR, $MASTER_PORT are not set: start the processes "
                          "with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_RANK": "x"},
     "$LOCAL_RANK must be a whole number"),
])
def test_a_torchrun_environment_that_is_not_one_is_one_clear_line(monkeypatch, env, said):
    # Left over in a shell, or set by hand: PyTorch would fail inside init_process_group, or wait.
    from alexnet import distributed
    from alexnet.errors import UserError

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("the group was made before the check"))
    with pytest.raises(UserError) as e:
        distributed.setup("cpu")
    assert str(e.value).startswith(said)


def test_a_process_group_made_by_the_caller_is_used_as_it_is(monkeypatch):
    # Made with its own init_method (tcp://...), without MASTER_ADDR: not refused, not made again.
    from alexnet import distributed

    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("made again"))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    assert distributed.setup("cpu") == distributed.Dist(1, 2, 0)
