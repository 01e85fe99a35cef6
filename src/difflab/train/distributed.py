"""Multi-process training under `torchrun` (DistributedDataParallel), and nothing at all otherwise.

torchrun starts one process per device with RANK, WORLD_SIZE and LOCAL_RANK in the environment.
Every rank trains; rank 0 alone writes the run folder, checkpoints, TensorBoard and the artifact
cache, and after the last training it alone samples and evaluates while the others exit. A
single process (no WORLD_SIZE, or 1) never creates a process group, so its numbers, files and
cache keys are those of a plain run.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# Stages whose loss calls the network once per step through its forward, which is what
# DistributedDataParallel hooks to average gradients.
DDP_STAGES = ("diffusion", "classifier")
# Artifacts rank 0 makes alone while the others wait (no training: the encoded latent cache).
RANK0_STAGES = ("latents",)


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """A process group is up (between start() and finish())."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a single process. Before start() it reads torchrun's RANK."""
    return rank() == 0 if active() else int(os.environ.get("RANK", "0")) == 0


def start() -> None:
    """Join the process group torchrun describes: gloo for CPU tensors, NCCL for CUDA ones, and
    each rank on the GPU of its LOCAL_RANK (so device=auto/cuda means that GPU)."""
    if active() or not launched():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def finish(wait: bool = True) -> None:
    """Wait for every rank, then leave the group; after this rank 0 works alone. (wait=False on
    the way out after an error, when the other ranks may never arrive: torchrun stops them.)"""
    if active():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a tensor over the ranks (in place; a no-op in a single process)."""
    if active():
        dist.all_reduce(value)
        value /= world_size()
    return value


def run_dir_for_all_ranks() -> str:
    """One run folder name for every rank: Hydra's default includes microseconds, which each
    process would read from its own clock."""
    name = datetime.datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S.%f")
    return broadcast(name)


def seed_offset(step: int = 0) -> int:
    """A per-rank, per-resume offset for the noise and timestep stream, so ranks do not draw the
    same noise for their different images (rank 0 of a fresh run keeps offset 0)."""
    return rank() * 1_000_003 + step * 7919 if rank() else 0
