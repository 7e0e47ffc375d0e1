"""Data-parallel training on torch.distributed, as launched by torchrun.

`torchrun --nproc-per-node N -m recur.cli train ...` (or `recur train --nproc N`) starts N
processes; each reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) and joins one process group: gloo on CPU, nccl on GPU. The model is
wrapped in DistributedDataParallel, which averages gradients across ranks.

What each rank trains on: a language model's stream is laid out in `batch_size` columns
as in one process, and rank r owns columns [r*B/N, (r+1)*B/N); tagging and classification
batches are split by rows. Each step's loss is rescaled by the global number of loss terms
(one all_reduce per step), so N ranks compute the same gradient as one process with the
same global batch. The same all_reduce carries the stop flags (Ctrl-C, SIGTERM, time
budget), so every rank stops after the same step and none waits forever on the others.
Only rank 0 writes checkpoints, logs and the progress bar.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    """The world torchrun describes in the environment; a single process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device) -> torch.device:
    """Joins the process group; on CUDA each local rank takes its own GPU."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(world: World, wait: bool = True) -> None:
    """Leaves the process group; `wait` first lets every rank finish (not after an error,
    when the others may never arrive)."""
    if world.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # the adaptive softmax skips a cluster none of a batch's targets is in, so its weights
    # may have no gradient on a rank: DDP must look for them, or it fails the next step
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=getattr(model, "adaptive", False))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def check_batch_size(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the number "
                         f"of processes ({world.size})")


def own_slice(world: World, rows: int) -> slice:
    """This rank's share of `rows` rows (columns of a language model's stream)."""
    share = rows // world.size
    return slice(world.rank * share, (world.rank + 1) * share)


def sum_across(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (in float64, so token counts stay exact)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(world: World, tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    """Every rank's slice concatenated along `dim` (the full carried state, for a checkpoint
    that a run with any number of processes can resume)."""
    if not world.distributed or tensor is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def gather_objects(world: World, value) -> list:
    if not world.distributed:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def from_main(world: World, value):
    """Rank 0's value on every rank (decisions that must agree, such as the schedule's)."""
    if not world.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
