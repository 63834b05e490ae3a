"""Choosing the engine of a run: one process, FSDP2 or DeepSpeed ZeRO (``parallel.engine``)."""

from __future__ import annotations

from typing import Any

import torch

from mgrpo_fast.engines.base import Engine
from mgrpo_fast.engines.distributed import DistInfo
from mgrpo_fast.engines.fsdp2 import FSDP2Engine, shard_packed_policy
from mgrpo_fast.engines.local import LocalEngine

__all__ = ["engine_name", "make_engine", "make_reference"]


def engine_name(parallel: Any) -> str:
    return "fsdp2" if parallel.engine == "auto" else parallel.engine


def make_engine(
    policy: torch.nn.Module, module: torch.nn.Module, config: Any, info: DistInfo | None, device: torch.device
) -> Engine:
    """The engine of a run: :class:`~mgrpo_fast.engines.local.LocalEngine` without torchrun, else
    ``parallel.engine`` (``auto`` = FSDP2)."""
    if info is None:
        return LocalEngine(policy, module, config.optim, torch.device(device))
    if engine_name(config.parallel) == "deepspeed":
        from mgrpo_fast.engines.deepspeed_zero import DeepSpeedEngine

        return DeepSpeedEngine(policy, module, config.optim, info, config.parallel)
    return FSDP2Engine(policy, module, config.optim, info, config.parallel)


def make_reference(module: torch.nn.Module, config: Any, info: DistInfo | None) -> torch.nn.Module:
    """The frozen reference model, sharded the same way as the policy (forward only)."""
    if info is None:
        return module
    if engine_name(config.parallel) == "deepspeed":
        from mgrpo_fast.engines.deepspeed_zero import deepspeed_reference

        return deepspeed_reference(module, info, config.parallel)
    shard_packed_policy(module, info.device, config.parallel)
    return module
