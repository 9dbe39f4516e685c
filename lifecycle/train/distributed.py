"""Process-group setup for ``torchrun``: DDP over NCCL on GPUs and gloo on CPUs.

``torchrun --nproc_per_node N -m lifecycle train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; without them the same code runs as a single process with no process group.
Multi-node runs follow from torchrun's own ``--nnodes``/``--rdzv-endpoint`` flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lifecycle.errors import ConfigError


@dataclass
class DistContext:
    """Where this process runs and who it is among its peers."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: Any = None  # torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that talks to MLflow and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is active."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor: Any) -> Any:
        """Sum ``tensor`` over ranks in place and return it."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def agree_step(self, loss: Any, stop: bool, save_due: bool, planned: int) -> tuple[float, bool, bool, int]:
        """What every rank acts on after a step's backward: (mean loss, stop, save now, planned total steps).

        Every rank must stop, save, evaluate and end on the same step, or the next collective would
        hang; so one small all-reduce per step carries all four. ``stop`` counts from any rank (a
        signal may reach one). ``save_due`` (a timed checkpoint) and ``planned`` (the budget
        planner's total) count from rank 0 only: its clock speaks for all, since DDP's gradient
        all-reduce and the save barrier make it wait for the slowest rank, and one decider means no
        two ranks can ever plan differently. Riding on this one all-reduce, the plan costs no
        collective of its own. A float64 holds step counts exactly (to 2**53).
        """
        if not self.distributed:
            return float(loss), stop, save_due, planned
        import torch

        main = 1.0 if self.is_main else 0.0
        flags = torch.tensor([0.0, float(stop), main * save_due, main * planned], dtype=torch.float64,
                             device=self.device)
        flags[0] = loss.double()  # on the device: no host round trip before the reduce
        self.all_reduce_sum(flags)
        return float(flags[0]) / self.world_size, bool(flags[1] > 0), bool(flags[2] > 0), int(flags[3])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Tear the process group down (idempotent)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> Any:
    """``auto`` means this rank's GPU when CUDA is present, else the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --set device=cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    import torch
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)
