"""torchrun / DistributedDataParallel: the same ``tledge finetune`` on one process or several.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on its shard of every epoch with DDP averaging the
gradients (NCCL on GPUs, gloo on CPUs); validation runs whole on every rank (the weights are the same on all of
them, so are the scores and every decision taken on them), and only rank 0 logs progress and writes files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes files and logs."""
        return self.rank == 0


def world_from_env() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, world: World):
    """``auto``: this rank's GPU when there is one, else the CPU; ``cuda`` under torchrun means ``cuda:LOCAL_RANK``."""
    import torch

    from tledge.errors import TledgeError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TledgeError(f"device {name!r} asked for, but torch sees no CUDA device here; use --device cpu")
        if name == "cuda":
            name = f"cuda:{world.local_rank if world.distributed else torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(name))
    elif name != "cpu":
        raise TledgeError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def init(world: World, device) -> bool:
    """Join the process group when launched by torchrun; returns True if this call created it."""
    if not world.distributed:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def finish(created: bool) -> None:
    if created:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_sum(values: list[float], world: World, device) -> list[float]:
    """Sum ``values`` over the ranks (training loss and hits of each rank's shard)."""
    if not world.distributed:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def log(world: World, message: str) -> None:
    if world.writer:
        print(message, file=sys.stderr, flush=True)
