"""Multi-process training through PyTorch's own launcher (``torchrun``).

``DistributedContext.from_environment()`` reads torchrun's variables (WORLD_SIZE, RANK,
LOCAL_RANK); with more than one process it starts the process group (NCCL on GPUs, gloo
on CPUs) and gives each process its device. One process (rank 0) writes files and runs
validation; the others wait at ``barrier``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext"]


@dataclass
class DistributedContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "auto", environ=None) -> DistributedContext:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(world, rank, local, backend)

    def device(self, requested: torch.device) -> torch.device:
        """This process's device: cuda:LOCAL_RANK on GPUs under torchrun."""
        if self.enabled and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_true(self, flag: bool, device: torch.device) -> bool:
        """True on every process when ``flag`` is true on any."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
