"""Multi-process training under torchrun (DistributedDataParallel).

`torchrun --nproc_per_node=N run.py ...` starts N copies of run.py with RANK, LOCAL_RANK and
WORLD_SIZE in their environment; cli.main() joins them into one process group before Hydra
runs, and the rest of difflab asks this module who it is. Who does what:

- every rank trains: DDP averages the gradients, each rank takes its own slice of every global
  batch (train.batch_size is the global batch), all ranks keep identical weights and EMAs
  (buffers such as the VQ codebook's EMA or BatchNorm statistics are rank 0's: DDP copies them
  to the others before every forward);
- rank 0 alone writes: the run folder (.hydra/, train.log, metrics.json, tb/, checkpoints,
  samples), the artifact cache, validation and sample grids; sampling and evaluation after
  training are rank 0's too, the other ranks leave when training is done.

A plain `python run.py` (or torchrun with one process) never creates a process group: every
helper here then answers as the one and only process, and nothing changes.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor

from difflab.errors import UserError

T = TypeVar("T")

# Rank 0 may make the other ranks wait long for an answer: while it waits on an artifact's file
# lock for another job that trains the same model, or encodes the data set alone. The default
# 30 minutes would end such a run with a timeout, so objects travel on a group that waits longer.
PATIENT = timedelta(days=7)

_objects_group = None  # a gloo group for Python objects (CPU), created by init()


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process trains together with others (init() has run)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes (any process of a single-process run)."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> None:
    """Join the process group torchrun prepared (env://). Where a GPU is visible, NCCL carries
    CUDA tensors and gloo CPU ones (so device=cpu works there too) and each process owns the
    GPU of its LOCAL_RANK; elsewhere gloo carries everything."""
    global _objects_group
    backend = "gloo"
    if torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"torchrun started a process for GPU {local_rank()} but this node has "
                            f"{torch.cuda.device_count()}: use --nproc_per_node={torch.cuda.device_count()} or fewer.")
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    torch_dist.init_process_group(backend)
    _objects_group = torch_dist.new_group(backend="gloo", timeout=PATIENT)


def teardown() -> None:
    global _objects_group
    if active():
        torch_dist.destroy_process_group()
    _objects_group = None


def from_main(make: Callable[[], T]) -> T:
    """make() run on rank 0 and its (picklable) result handed to every rank: how the ranks take
    the same branch where only rank 0 may look (the artifact cache) or decide (the run folder's
    time). The other ranks wait for it, which makes this a barrier too. One process: make()."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    torch_dist.broadcast_object_list(box, src=0, group=_objects_group)
    return box[0]


def mean_over_ranks(value: Tensor) -> Tensor:
    """A scalar tensor averaged over the ranks (the tensor itself on one process)."""
    if not active():
        return value
    total = value.detach().clone()
    torch_dist.all_reduce(total)  # a sum: gloo has no average
    return total / world_size()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, `cuda` is the GPU of this process's LOCAL_RANK; a named GPU would put
    every rank on the same one."""
    if not active() or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"device={device} puts every torchrun process on one GPU: use device=cuda (or auto), "
                        "each process then takes the GPU of its LOCAL_RANK.")
    return torch.device("cuda", local_rank())
