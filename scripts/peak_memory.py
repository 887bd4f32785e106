"""Peak resident set of a full training run, estimated in a minute: a short run whose cache
is read into the process first.

A full run's peak comes late, once every page of the memory-mapped cache has been read;
the process's own memory reaches its high-water mark within a few steps. So this maps the
whole cache before training (the mapping the run then reads from), trains a few steps and
evaluates once, and prints the run's peak. The README's per-variant memory table came from
it. It reads low: for the Baseline at batch 128 with bf16 it printed 3.09 GB where full runs
under `/usr/bin/time -v` peaked at 3.16 and 3.30 GB (PyTorch 2.14.1+cu130), and 2.71-2.79 GB
where a full run peaked at 2.76 GB (2.13.0+cpu): glibc's heap fragments differently from
run to run and over a longer run.

    python scripts/peak_memory.py --variant paper --steps 40 --data /tmp/tin_cache -- --bs 128 --amp

Arguments after `--` go to `alexnet train` as they are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from alexnet import train
from alexnet.cli import main as alexnet_main
from alexnet.loader import to_memory
from alexnet.memory import peak_rss_mib


def read_first(x: np.ndarray, device):
    """The run's own mapping of the cache, with every page read in."""
    np.asarray(x).max()
    print(f"read in: {x.nbytes / 2**20:.1f} MiB of cache")
    return to_memory(x, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="baseline")
    p.add_argument("--steps", type=int, default=40, help="training steps before the evaluation")
    p.add_argument("--data", required=True, help="the cache directory (alexnet prepare)")
    p.add_argument("train_args", nargs="*", help="more `alexnet train` arguments, after --")
    a = p.parse_args(argv)
    train.to_memory = read_first
    with tempfile.TemporaryDirectory() as out:
        rc = alexnet_main(["train", "--variant", a.variant, "--epochs", "1", "--max-steps", str(a.steps),
                           "--data", a.data, "--out", out, "--no-progress", *a.train_args])
    peak = peak_rss_mib()  # the training run's, which started from what was resident then
    print(f"{a.variant}: peak resident set {peak / 1024:.2f} GiB ({peak * 2**20 / 1e9:.2f} GB)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
