"""Training on several processes (GPUs) with ``torch.distributed``, set up from the
environment ``torchrun`` gives each process: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``.

``train_stage`` asks ``rank_and_world()`` whether a process group is up; when it is (and
holds more than one process) it trains a ``DistributedDataParallel`` model: every
process draws its own ``batch_size`` sub-volumes (seeded by ``rank_seed``), the
gradients are averaged across processes, and rank 0 alone writes checkpoints.

Nothing here touches CUDA unless a CUDA device is asked for. Tested with gloo processes
on the CPU; the NCCL path (GPUs) has not run here, no GPU being available.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

#: Stream that ``rank_seed`` mixes into a seed (apart from the trainer's own streams).
_RANK_STREAM = 0x52414E4B


def world_size_from_env(env: dict | None = None) -> int:
    """``WORLD_SIZE`` of the environment (``torchrun`` sets it), 1 where unset.
    ``ValueError`` for a value that is not a positive integer."""
    text = (os.environ if env is None else env).get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {text!r}")
    return world


def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes, when ``WORLD_SIZE`` > 1:
    backend NCCL for a CUDA ``device`` (the process's GPU becomes ``cuda:LOCAL_RANK``),
    gloo otherwise; ``init_method="env://"`` reads ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT``. Blocks until every process has joined.

    Returns ``(rank, world_size, device)``; ``(0, 1, device)`` unchanged where
    ``WORLD_SIZE`` is 1 or unset (nothing is initialised). A group already up is used.
    """
    device = torch.device(device)
    world = world_size_from_env()
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group that is up, ``(0, 1)`` where none is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s data (its source, sampler and augmentations):
    ``seed`` itself for rank 0 (one process trains as it always did), a seed derived
    from ``(seed, rank)`` with NumPy's ``SeedSequence`` for the others.

    >>> rank_seed(7, 0)
    7
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), _RANK_STREAM, int(rank)]).generate_state(1)[0])


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``all_gather_object``; picklable objects,
    tensors among them on the CPU). A one-element list where no group is up."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a copy; ``value`` itself where no group is up)."""
    rank, world = rank_and_world()
    if world == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world


def barrier() -> None:
    """Wait for every rank (nothing where no group is up)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
