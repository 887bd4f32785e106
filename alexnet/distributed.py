"""Distribution decided once: torchrun's environment -> process group, or a no-op single process.

Under `torchrun --nproc_per_node=N`, each process trains on its own shard of every epoch
with DistributedDataParallel (NCCL on CUDA, gloo on CPU). Only rank 0 writes files and
prints. Without torchrun every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alexnet.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs = {}
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise UserError(f"this process is local rank {local_rank} (LOCAL_RANK), one GPU each, but this node has "
                            f"{n} GPU{'' if n == 1 else 's'}: give torchrun --nproc_per_node={n} or fewer")
        # The GPU is chosen before the group is made and named to it: NCCL then binds each
        # rank to its own GPU, instead of guessing from the rank at its first barrier.
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **kwargs)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_ranks(flags: list[bool], d: Dist, device: torch.device) -> list[bool]:
    """Several flags at once, each true on every rank if true on any (one all-reduce)."""
    if not d.enabled:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
