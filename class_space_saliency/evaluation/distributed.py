"""Scale-out under ``torchrun``: process group from the environment, rank, barrier."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Which part of the work this process does.

    Attributes:
        rank: This process's rank (0 when not distributed).
        world_size: Number of processes.
        device: The device this rank computes on (NCCL barriers need it).
    """

    rank: int
    world_size: int
    device: torch.device

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.world_size == 1:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()


@contextlib.contextmanager
def shard_from_env(device: torch.device) -> Iterator[Shard]:
    """This process's :class:`Shard`, initialising ``torch.distributed`` if needed.

    With ``WORLD_SIZE`` > 1 (as ``torchrun`` sets it) a process group is initialised from the
    environment, NCCL on CUDA devices and gloo otherwise, unless one already exists; a
    group initialised here is destroyed on exit.

    Args:
        device: The device the model runs on.

    Yields:
        The shard.

    Example:
        >>> with shard_from_env(torch.device("cpu")) as shard:  # one process: all of them
        ...     my_indices = range(10)[shard.rank :: shard.world_size]
        >>> list(my_indices)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        yield Shard(0, 1, device)
        return
    initialised_here = not dist.is_initialized()
    if initialised_here:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield Shard(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if initialised_here:
            dist.destroy_process_group()
