"""Host time per batch of the eager data path (the one CUDA runs), at a batch so small that
its arithmetic is negligible: what the data path adds to a GPU step that is bound by kernel
launches (README, "On a GPU"), measured on any machine.

    python scripts/host_overhead.py                   # every recipe, batch 4
    python scripts/host_overhead.py combined --bs 16

Each step does what training does before the model: reseed the augmentation generator and
the dropout seed from the step, then take the next batch from `FastBatches`. At a revision
without `alexnet.loader.seed_torch`, the dropout seed goes through torch.manual_seed, as
training did then. One thread; the median of 7 rounds of 500 batches. The two choices the
eager path makes by device are CUDA's (the saturation as one batched matmul, the noise
window copied), and it also prints the ops per batch that would launch a kernel on a GPU
(alexnet/stepprofile.py: ATen ops not called by another, views left out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
os.environ["ALEXNET_FUSED_AUGMENT"] = "0"  # the eager ops, as on CUDA

import torch  # noqa: E402

from alexnet import augment, loader  # noqa: E402
from alexnet.augment import RECIPES, BatchAugment  # noqa: E402
from alexnet.distributed import Dist  # noqa: E402
from alexnet.loader import FastBatches, epoch_order, step_seed  # noqa: E402
from alexnet.stepprofile import profiled  # noqa: E402

seed_torch = getattr(loader, "seed_torch", lambda seed, device=None: torch.manual_seed(seed))

# CUDA's side of the eager path's two device-dependent choices
_saturate, _window = BatchAugment.saturate, augment._window
BatchAugment.saturate = lambda self, x, s, per_image_matrix=None: _saturate(self, x, s, True)
augment._window = lambda *a, copy=False: _window(*a, copy=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--batches", type=int, default=500)
    a = p.parse_args()
    torch.set_num_threads(1)
    n = 20_000
    x = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    y = torch.randint(0, 200, (n,))
    print(f"host time of the eager data path per batch of {a.bs} (torch {torch.__version__}, 1 thread)")
    for name in a.recipes:
        gen = torch.Generator()
        aug = BatchAugment(RECIPES[name], 64, [0.5] * 3, [0.25] * 3, [0.2, 0.02, 0.004], torch.eye(3).tolist(),
                           generator=gen)
        batches = FastBatches(x, y, aug, a.bs)

        def forever():
            epoch = 0
            while True:
                yield from batches(epoch_order(n, 0, epoch, Dist(), a.bs), 0)
                epoch += 1

        it, step = forever(), [0]

        def one():
            s = step_seed(0, 0, step[0])
            step[0] += 1
            gen.manual_seed(s)
            seed_torch(s, torch.device("cpu"))
            next(it)

        for _ in range(200):  # warm-up: the constants, the allocator
            one()
        ops = profiled(one, 10, torch.device("cpu"))[0]
        rounds = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(a.batches):
                one()
            rounds.append((time.perf_counter() - t) / a.batches * 1e6)
        print(f"{name:12s} {statistics.median(rounds):8.1f} us/batch (min {min(rounds):.1f}), {ops:.0f} ops")


if __name__ == "__main__":
    main()
