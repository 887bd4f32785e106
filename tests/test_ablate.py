"""The ablation runner and its report on tiny synthetic data: the study table, the numbers
against each run's metrics.csv, resuming a killed study, and `alexnet report` reproducing the
table."""

from __future__ import annotations

import csv
import os
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet.ablate import ROWS, STUDY, selected_rows
from alexnet.augment import RECIPES
from alexnet.cli import main
from alexnet.errors import UserError
from alexnet.metrics import read_csv
from alexnet.models import VARIANTS, count_parameters, create_model
from alexnet.report import CSV_COLUMNS, MD_COLUMNS, build_report

ROOT = Path(__file__).resolve().parents[1]
# Two rows (Baseline: the reference for "Change from Baseline"; Combined-GAP: small and quick),
# two seeds, one short epoch each.
STUDY_ARGS = ["--variants", "baseline", "combined_gap", "--seeds", "2", "--epochs", "1", "--bs", "8",
              "--max-steps", "2", "--device", "cpu"]


def test_study_table_is_the_published_one():
    assert [r.key for r in STUDY] == ["baseline", "randomcrop", "pixel", "dropout", "batchnorm", "combined",
                                      "combined_small", "combined_gap", "paper"]
    for r in STUDY:
        assert r.variant in VARIANTS and r.recipe in RECIPES
    assert (ROWS["randomcrop"].variant, ROWS["randomcrop"].recipe) == ("baseline", "randomcrop")
    assert ROWS["combined_small"].title == "Combined-Small" and ROWS["combined_small"].published_top1 == 44.09
    assert ROWS["combined"].published_top1 is None
    # Rows run in study order whatever the order given.
    assert [r.key for r in selected_rows(["paper", "baseline"])] == ["baseline", "paper"]
    assert len(selected_rows(["all"])) == 9
    with pytest.raises(UserError, match="unknown row"):
        selected_rows(["nope"])


@pytest.mark.parametrize("args, amp, channels_last", [
    ([], False, False), (["--amp"], True, True), (["--channels-last"], False, True),
    (["--amp", "--no-channels-last"], True, False),
])
def test_study_runs_get_the_layout_train_would(args, amp, channels_last):
    import argparse

    from alexnet.ablate import add_ablate_args, run_config

    p = argparse.ArgumentParser()
    add_ablate_args(p)
    cfg = run_config(p.parse_args(args), ROWS["baseline"], seed=0, num_classes=200)
    assert (cfg.amp, cfg.channels_last) == (amp, channels_last)


def test_report_without_finished_runs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such study folder"):
        build_report(tmp_path / "missing")
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(UserError, match="is a file, not a study folder"):
        build_report(tmp_path / "results.csv")
    (tmp_path / "runs" / "baseline" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "baseline" / "seed0" / "last.pth").write_bytes(b"")  # interrupted, not finished
    with pytest.raises(UserError, match="no finished runs"):
        build_report(tmp_path / "runs")
    assert main(["report", str(tmp_path / "missing")]) == 2


def _table(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def _expected(out: Path, row: str) -> dict:
    """The row's figures computed independently from the runs' metrics.csv."""
    per_seed = []
    for seed in (0, 1):
        hist = read_csv(out / row / f"seed{seed}" / "metrics.csv")
        best = max(hist, key=lambda r: r["val_top1"])
        per_seed.append({"top1": best["val_top1"], "top5": best["val_top5"], "epoch": best["epoch"],
                         "loss": min(r["train_loss"] for r in hist),
                         "ips": statistics.mean(r["images_per_s"] for r in hist)})
    top1 = [s["top1"] for s in per_seed]
    return {"top1_mean": statistics.mean(top1), "top1_std": statistics.stdev(top1),
            "top5_mean": statistics.mean(s["top5"] for s in per_seed),
            "epoch_of_best": statistics.mean(s["epoch"] for s in per_seed),
            "train_loss_best": statistics.mean(s["loss"] for s in per_seed),
            "images_per_s": statistics.mean(s["ips"] for s in per_seed)}


@pytest.mark.slow
def test_killed_study_resumes_and_report_reproduces_the_table(tiny_cache, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["ablate", "--data", str(tiny_cache), "--out", str(out), *STUDY_ARGS]
    first = out / "baseline" / "seed0" / "done.json"

    # 1. Start the study in a process of its own and SIGKILL it once the first run is done.
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alexnet", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            hung = time.monotonic() + 900  # a guard against a hang, far beyond any machine's pace
            while not first.exists():
                assert proc.poll() is None, (tmp_path / "first.log").read_text()
                if time.monotonic() > hung:
                    pytest.fail("the study's first run did not finish in 15 minutes: hung")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.md").exists()
    first_mtime = first.stat().st_mtime_ns

    # 2. The same command again: the first run is skipped, the rest done, the table written.
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Baseline seed 0: skipped (done)" in printed
    assert first.stat().st_mtime_ns == first_mtime
    for row in ("baseline", "combined_gap"):
        for seed in (0, 1):
            d = json.loads((out / row / f"seed{seed}" / "done.json").read_text())
            assert d["seed"] == seed and d["config"]["seed"] == seed and d["wall_seconds"] > 0
            assert d["config"]["variant"] == ROWS[row].variant and d["config"]["recipe"] == ROWS[row].recipe
            assert d["best_top1"] == max(r["val_top1"] for r in read_csv(out / row / f"seed{seed}" / "metrics.csv"))
    for f in ("results.md", "results.csv", "results.json", "val_top1.png", "best_top1.png"):
        assert (out / f).stat().st_size > 0, f

    # 3. The table: its rows and columns, and numbers equal to those of the runs' metrics.csv.
    md = (out / "results.md").read_text()
    table = _table(md)
    assert table[0] == MD_COLUMNS
    assert [r[0] for r in table[1:]] == ["Baseline", "Combined-GAP"]
    col = {name: i for i, name in enumerate(MD_COLUMNS)}
    assert table[1][col["Published top-1 (%)"]] == "30.32" and table[2][col["Published top-1 (%)"]] == "—"
    assert table[1][col["Change from Baseline (points)"]] == "+0.00"
    assert "1 epoch" in md and "2 seeds" in md and "batch 8" in md and "device cpu" in md

    with (out / "results.csv").open() as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert list(next(csv.reader((out / "results.csv").open()))) == CSV_COLUMNS
    results = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in results["rows"]] == ["baseline", "combined_gap"]
    assert results["budget"]["epochs"] == 1 and results["budget"]["seeds"] == 2 and results["budget"]["bs"] == 8
    expected = {row: _expected(out, row) for row in ("baseline", "combined_gap")}
    for jr in results["rows"]:
        e, cr = expected[jr["row"]], rows[jr["row"]]
        for k, v in e.items():
            assert jr[k] == pytest.approx(v, abs=1e-9), k
            assert float(cr[k]) == pytest.approx(v, abs=1e-9), k
        assert jr["val_error"] == pytest.approx(100 - e["top1_mean"])
        assert jr["change_from_baseline"] == pytest.approx(e["top1_mean"] - expected["baseline"]["top1_mean"])
        assert jr["params"] == count_parameters(create_model(ROWS[jr["row"]].variant, 4))
        i = 1 if jr["row"] == "baseline" else 2
        assert table[i][col["Top-1 (%)"]] == f"{e['top1_mean']:.2f} ± {e['top1_std']:.2f}"
        assert table[i][col["Val error (%)"]] == f"{100 - e['top1_mean']:.2f}"
        assert table[i][col["Epoch of best"]] == "1"  # 1 epoch, both seeds: a whole number, not "1.0"

    # 4. Other settings in the same folder are refused instead of mixed into one table.
    assert main([*args, "--lr", "0.02"]) == 2
    assert "other settings" in capsys.readouterr().err

    # 5. An interrupted run (last.pth, no done.json) is resumed, not redone.
    gap1 = out / "combined_gap" / "seed1"
    before = json.loads((gap1 / "done.json").read_text())
    (gap1 / "done.json").unlink()
    alias = tmp_path / "same_cache"  # --data as another path to the same cache is the same study
    alias.symlink_to(tiny_cache)
    assert main([str(alias) if a == str(tiny_cache) else a for a in args]) == 0
    printed = capsys.readouterr().out
    assert "Combined-GAP seed 1: resumed" in printed and printed.count("skipped (done)") == 3
    after = json.loads((gap1 / "done.json").read_text())
    assert after["history"] == before["history"] and after["resumed"]

    # 6. `alexnet report` rebuilds the same table from the finished runs.
    md = (out / "results.md").read_text()
    (out / "results.md").unlink()
    r = subprocess.run([sys.executable, "-m", "alexnet", "report", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "results.md").read_text() == md
    assert "| Combined-GAP |" in r.stdout


def test_stop_during_a_runs_last_evaluation_ends_the_study(tiny_cache, tmp_path, monkeypatch, capsys):
    """A Ctrl-C (here SIGTERM) that lands in a run's last evaluation ends the study there, as
    one mid-epoch does, instead of counting the run finished and starting the next; the same
    command then finishes that run (the evaluation given up runs: nothing retrained) and the rest."""
    from alexnet import train

    out = tmp_path / "runs"
    args = ["ablate", "--data", str(tiny_cache), "--out", str(out), "--variants", "combined_gap", "--seeds", "2",
            "--epochs", "1", "--bs", "8", "--max-steps", "2", "--device", "cpu"]
    real_eval = train.evaluate

    def evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the evaluation
        return real_eval(*a, **k)

    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "Combined-GAP seed 0: interrupted" in capsys.readouterr().out
    seed0, seed1 = out / "combined_gap" / "seed0", out / "combined_gap" / "seed1"
    assert (seed0 / "last.pth").exists() and not (seed0 / "done.json").exists() and not seed1.exists()
    monkeypatch.setattr(train, "evaluate", real_eval)
    assert main(args) == 0
    assert "Combined-GAP seed 0: resumed from last.pth" in capsys.readouterr().out
    assert "epoch 1, step 2 of 2" in (seed0 / "train.log").read_text()  # after the last step: only the evaluation
    assert (seed0 / "done.json").exists() and (seed1 / "done.json").exists()


def test_interrupted_runs_named_by_the_study_and_its_report(tiny_cache, tmp_path, capsys):
    out = tmp_path / "runs"
    folder = out / "combined_gap" / "seed0"
    folder.mkdir(parents=True)
    (folder / "last.pth").write_bytes(b"cut short by a full disk")
    args = ["ablate", "--data", str(tiny_cache), "--out", str(out), "--variants", "combined_gap", "--seeds", "1",
            "--epochs", "1", "--bs", "8", "--max-steps", "2", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'last.pth'}: not a readable checkpoint" in err
    assert f"(the study's run combined_gap/seed0: delete {folder} to train it again from the start)" in err
    shutil.rmtree(folder)
    assert main(args) == 0  # as it says
    # A run folder without done.json (a study with more seeds, interrupted): named under the
    # table, not silently left out of it.
    (out / "combined_gap" / "seed1").mkdir()
    (out / "combined_gap" / "seed1" / "last.pth").write_bytes(b"")
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    note = "Not in the table, unfinished (no done.json): combined_gap/seed1"
    assert note in capsys.readouterr().out and note in (out / "results.md").read_text()


def test_a_study_run_folder_with_a_lone_best_pth_says_how_to_redo_it(tiny_cache, tmp_path, capsys):
    """A run folder holding best.pth but neither last.pth nor done.json (the user removed them):
    the study does not replace the checkpoint, and says to delete that run's folder, not to
    pick another --out, which would start the whole study again."""
    out = tmp_path / "runs"
    folder = out / "combined_gap" / "seed0"
    folder.mkdir(parents=True)
    (folder / "best.pth").write_bytes(b"kept")
    assert main(["ablate", "--data", str(tiny_cache), "--out", str(out), "--variants", "combined_gap", "--seeds", "1",
                 "--epochs", "1", "--bs", "8", "--max-steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint (best.pth) that a new run would replace" in err
    assert f"(the study's run combined_gap/seed0: delete {folder} to train it again from the start)" in err
    assert (folder / "best.pth").read_bytes() == b"kept"


def test_a_study_folder_refuses_runs_of_other_settings_in_rows_left_out(tiny_cache, tmp_path, capsys):
    """A second command with other --variants adds rows to the same table: its settings must
    match the runs already there, not only those of its own rows."""
    out = tmp_path / "runs"
    args = ["ablate", "--data", str(tiny_cache), "--out", str(out), "--seeds", "1", "--epochs", "1", "--bs", "8",
            "--max-steps", "1", "--device", "cpu"]
    assert main([*args, "--variants", "combined_gap"]) == 0
    capsys.readouterr()
    assert main([*args, "--variants", "batchnorm", "--lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'combined_gap' / 'seed0'} was trained with other settings (lr 0.01 there, 0.02 now)" in err
    assert not (out / "batchnorm").exists()


def test_a_study_refuses_runs_of_a_model_the_variant_no_longer_is(tiny_cache, tmp_path, capsys):
    """Combined-GAP's head changed (pool5 to conv5): a study folder whose runs were of the old
    head is refused before anything trains, not averaged with new seeds into one row."""
    import torch

    out = tmp_path / "runs"
    args = ["ablate", "--data", str(tiny_cache), "--out", str(out), "--epochs", "1", "--bs", "8", "--max-steps", "1",
            "--device", "cpu", "--variants", "combined_gap"]
    assert main([*args, "--seeds", "1"]) == 0
    seed0 = out / "combined_gap" / "seed0"
    c = torch.load(seed0 / "best.pth", weights_only=False)
    del c["model_cfg"]["gap_input"]  # as written before the setting existed
    (seed0 / "best.pth").unlink()  # a hard link to last.pth: each gets the old checkpoint
    for name in ("best.pth", "last.pth"):
        torch.save(c, seed0 / name)
    capsys.readouterr()
    assert main([*args, "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert (f"{seed0} was trained as another model than 'combined_gap' is now (gap_input 'pool5' there, "
            f"'conv5' now); delete {seed0} to train it again") in err
    assert not (out / "combined_gap" / "seed1").exists()


def test_failed_runs_are_named_as_failed_and_not_retried_as_they_were(tiny_cache, tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["ablate", "--data", str(tiny_cache), "--out", str(out), "--variants", "combined_gap", "--seeds", "1",
            "--epochs", "1", "--bs", "8", "--max-steps", "2", "--device", "cpu", "--lr", "1e30"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 run(s) failed with a non-finite loss (combined_gap/seed0); no run finished, so there is no table" in err
    assert "delete them to train them again (with a lower --lr: in a new --out" in err
    failed = json.loads((out / "combined_gap" / "seed0" / "failed.json").read_text())
    assert "non-finite" in failed["error"] or "nan" in failed["error"]
    assert main(args) == 2  # again: skipped, not resumed into the same failure
    printed = capsys.readouterr()
    assert "skipped (failed: " in printed.out and f"delete {out / 'combined_gap' / 'seed0'} to train it again" in printed.out
    # beside a finished run: the report names it as failed, not as unfinished
    good = tmp_path / "good"
    assert main([*args[:4], str(good), *args[5:-2]]) == 0
    shutil.copytree(out / "combined_gap" / "seed0", good / "combined_gap" / "seed1")
    capsys.readouterr()
    assert main(["report", str(good)]) == 0
    md = (good / "results.md").read_text()
    assert "Not in the table, failed on a non-finite loss (failed.json): combined_gap/seed1" in md
    assert "unfinished" not in md


def test_report_plots_get_ordinary_permissions(tiny_cache, tmp_path):
    out = tmp_path / "runs"
    old = os.umask(0o022)
    try:
        assert main(["ablate", "--data", str(tiny_cache), "--out", str(out), "--variants", "combined_gap", "--seeds",
                     "1", "--epochs", "1", "--bs", "8", "--max-steps", "1", "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    for name in ("val_top1.png", "best_top1.png", "results.md"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_a_study_folder_that_cannot_be_made_is_refused_before_anything_runs(tiny_cache, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    for out, said in ((blocker, f"--out {blocker}: is a file, not a folder"),
                      (blocker / "study", f"--out {blocker / 'study'}: {blocker} is a file, not a folder")):
        assert main(["ablate", "--data", str(tiny_cache), "--out", str(out), "--variants", "combined_gap",
                     "--seeds", "1", "--epochs", "1", "--bs", "8", "--max-steps", "1", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    assert blocker.read_text() == "mine"
    for flag in ("--out", "--data"):  # empty: an unset shell variable, refused before any data is prepared
        args = ["ablate", "--data", str(tiny_cache), "--out", str(tmp_path / "s"), "--variants", "combined_gap",
                "--seeds", "1", "--epochs", "1", "--device", "cpu", flag, ""]
        assert main(args) == 2
        assert f"{flag} must name a folder, got an empty path" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    # a folder where the report writes a file: refused before the study, and by `report`
    study = tmp_path / "study"
    (study / "results.md").mkdir(parents=True)
    assert main(["ablate", "--data", str(tiny_cache), "--out", str(study), "--variants", "combined_gap",
                 "--seeds", "1", "--epochs", "1", "--bs", "8", "--max-steps", "1", "--device", "cpu"]) == 2
    assert (f"--out {study}: {study / 'results.md'} is a folder, where the report writes its file results.md"
            in capsys.readouterr().err)
    assert not (study / "combined_gap").exists()
    assert main(["report", str(study)]) == 2
    assert f"report {study}: {study / 'results.md'} is a folder" in capsys.readouterr().err
