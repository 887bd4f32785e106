"""Peak resident set of a full training run, estimated in a minute: a short run of a few
steps and two evaluations, which reach the high-water mark a full run reaches.

The process's own memory reaches its high-water mark within a few steps, and on the CPU the
training split's pages leave the resident set every 1,024 images (`loader.RELEASE_IMAGES`),
so a few steps see what a full run holds late in an epoch; where the process fits
`--memory-budget` with the whole split, the run reads it all in at its first release point
and keeps it (`loader.SplitResidency`), which the probe sees too as long as its steps read
1,024 images or more (--steps 40 at any batch size over 25). (Before that release, a full
run's peak came once every page of the mapped split had been read, and this script read the
whole split into the run's mapping first; since every CPU run releases or keeps the split
as above, and a CUDA run holds it on the GPU, that is no longer needed.)
It trains a few steps and evaluates, twice (the heap is laid out again after an evaluation),
and prints the run's peak. The README's per-variant memory tables came from it. Repeated, it
moves with glibc's heap layout, which differs from run to run: for the Baseline at batch 128
with bf16 on PyTorch 2.14.1+cu130 it printed 2.97-3.04 GB in 7 probes where a full run under
`/usr/bin/time -v` peaked at 2.99 GB (both before the release within an epoch); on
2.13.0+cpu, 2.66 GB (twice) where a full run peaked at 2.64 GB.

    python scripts/peak_memory.py --variant paper --steps 40 --data /tmp/tin_cache -- --bs 128 --amp

Arguments after `--` go to `alexnet train` as they are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


# Python puts scripts/ on sys.path, not the checkout: name it, so that the script also runs
# where the project is not installed (a GPU machine with its own PyTorch).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alexnet.cli import main as alexnet_main  # noqa: E402
from alexnet.memory import peak_rss_mib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="baseline")
    p.add_argument("--steps", type=int, default=40, help="training steps before each of the two evaluations")
    p.add_argument("--data", required=True, help="the cache directory (alexnet prepare)")
    p.add_argument("train_args", nargs="*", help="more `alexnet train` arguments, after --")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        rc = alexnet_main(["train", "--variant", a.variant, "--epochs", "2", "--max-steps", str(a.steps),
                           "--data", a.data, "--out", out, "--no-progress", *a.train_args])
    peak = peak_rss_mib()  # the training run's, which started from what was resident then
    print(f"{a.variant}: peak resident set {peak / 1024:.2f} GiB ({peak * 2**20 / 1e9:.2f} GB)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
