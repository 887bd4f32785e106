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


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise UserError(f"${name} must be a whole number (torchrun sets it for each process), got {value!r}") from None


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return Dist()
    # A WORLD_SIZE left in the environment without the rest of what torchrun sets: PyTorch
    # would fail inside init_process_group, or wait for processes that never come.
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():  # a group the caller made its own way is used as it is
        raise UserError(f"$WORLD_SIZE is {world} but ${', $'.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        "set: start the processes with torchrun (train.py under torchrun --nproc_per_node=N), or "
                        "unset WORLD_SIZE for one process")
    _env_int("RANK", "0")
    local_rank = _env_int("LOCAL_RANK", "0")
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
