"""Multi-process training under ``torchrun``: joining the process group and collectives on python values.

``torchrun --nproc_per_node=N -m mgrpo_fast.train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_distributed` then joins the group (NCCL on CUDA, gloo on CPU; ``parallel.backend``) and
binds each rank to ``cuda:LOCAL_RANK``. Without torchrun nothing is initialized and the trainer runs
the one-process :class:`~mgrpo_fast.engines.local.LocalEngine`.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from mgrpo_fast.engines.base import check_reduce_op

__all__ = ["DistInfo", "RankCollectives", "all_reduce_floats", "finish_distributed", "init_distributed"]


class DistInfo:
    """Rank facts of a ``torchrun`` process."""

    def __init__(
        self, rank: int, world_size: int, local_rank: int, device: torch.device, backend: str
    ) -> None:
        self.rank, self.world_size, self.local_rank, self.device, self.backend = (
            rank,
            world_size,
            local_rank,
            device,
            backend,
        )


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo | None:
    """Join the ``torchrun`` process group (None when not launched with more than one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("parallel.backend: 'nccl' needs CUDA GPUs; use 'gloo' (or 'auto') on CPU")
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device, backend)


def finish_distributed() -> None:
    """Leave the ``torchrun`` process group cleanly (a no-op outside one): a barrier, so no rank tears
    down while another still talks to it, then ``destroy_process_group``. Without it the gloo
    backend's worker threads can still be running at interpreter exit, which aborts the process
    ("terminate called without an active exception", SIGABRT) after the work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_floats(values: list[float], op: str, device: torch.device) -> list[float]:
    """Sum or max (``op``) of python floats over all ranks (fp64, one collective)."""
    check_reduce_op(op)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


class RankCollectives:
    """The rank facts and the collectives on python values of an :class:`~mgrpo_fast.engines.base.Engine`
    under ``torchrun`` (the base class of the FSDP2 and DeepSpeed engines)."""

    def __init__(self, info: DistInfo) -> None:
        self.device, self.rank, self.world_size = info.device, info.rank, info.world_size
        self.is_main = info.rank == 0

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return all_reduce_floats(values, op, self.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()
