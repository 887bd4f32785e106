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
    assert where == (f"epoch {ck['epoch'] + 1}, step {ck['batch']} of 12" if ck["batch"] else f"the end of epoch {ck['epoch']}")


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

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("the group was made before the check"))
    with pytest.raises(UserError, match=r"local rank 3 \(LOCAL_RANK\).*this node has 2 GPUs: give torchrun "
                                        r"--nproc_per_node=2 or fewer"):
        distributed.setup("cuda")
