"""Distributed setup, applied from outside the model (the model files never import torch.distributed).

Today: data parallelism under torchrun -- every rank holds the whole model, sees different sequences, and
gradients are averaged after backward. NCCL on GPU, gloo on CPU; without torchrun it is one process and every
helper here is a no-op. (Tensor, expert and FSDP2 parallelism build on this file; see the scale-up issue.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor; the input is untouched and keeps no autograd link)."""
        if self.world == 1:
            return t.detach().clone()
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Mean of every gradient over ranks; a parameter no token reached on this rank counts as zero."""
        if self.world == 1:
            return
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def pick_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen: "auto" is cuda when available, else cpu; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"bad device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
