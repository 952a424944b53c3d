"""Data-parallel runs under torchrun: joining the process group, and the rank that writes.

`torchrun --nproc_per_node N -m tessera.cli train ...` starts N processes with RANK,
LOCAL_RANK and WORLD_SIZE set. Each joins one process group (NCCL on GPUs, gloo on the CPU),
trains on its slice of every global batch (the Trainer), and averages gradients each step, so
the recipe's batch_size stays the global batch whatever N is. Files that every rank would
write alike (the tokenizer, checkpoints) are written by rank 0 alone while the others wait.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tessera.objectives.distributed import world_size_and_rank


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1), unless already joined; nothing
    in a plain run. On CUDA each process takes the GPU of its LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))


def is_main_process() -> bool:
    return world_size_and_rank()[1] == 0


def wait_for_everyone() -> None:
    """A barrier when running distributed; nothing otherwise."""
    if world_size_and_rank()[0] > 1:
        dist.barrier()
