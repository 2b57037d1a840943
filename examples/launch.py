"""What every example launched by torchrun does first: join the process group, pick this rank's device."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_ranks() -> tuple[int, int, torch.device]:
    """(rank, world size, device): NCCL and this rank's GPU (``LOCAL_RANK``) when CUDA is there, else gloo
    and the CPU."""
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
