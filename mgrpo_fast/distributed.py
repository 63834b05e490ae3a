"""Multi-process training under ``torchrun``: process group set-up, collectives on python values, and
the FSDP2 engine (DeepSpeed ZeRO is in ``mgrpo_fast.deepspeed_engine``).

``torchrun --nproc_per_node=N -m mgrpo_fast.train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_distributed` then joins the group (NCCL on CUDA, gloo on CPU; ``parallel.backend``) and
binds each rank to ``cuda:LOCAL_RANK``. Without torchrun nothing is initialized and the trainer runs
the :class:`~mgrpo_fast.engine.LocalEngine`.

FSDP2 (:class:`FSDP2Engine`): ``fully_shard`` on every decoder layer, then on the
:class:`~mgrpo_fast.update.PackedPolicy` as the root unit, which owns the embedding, the final norm and
the lm_head (tied or not): the root forward all-gathers them and the fused loss reads the gathered
lm_head weight; their gradients are reduce-scattered after the backward. Mixed precision on CUDA:
bf16 parameters for compute, fp32 gradient reduction, fp32 sharded master weights (AdamW state is
sharded too). Gradients must be *summed* over ranks: every rank's loss already carries the global
normalization, so the sum is the one-process gradient of the same batch; FSDP averages, so the
backward scales the loss by the world size (a custom divide factor needs PREMUL_SUM, which gloo lacks).

Rollouts: ``generation()`` unshards every unit once (full parameters on each rank) and turns off
resharding after forward, so ``generate`` runs with no collective at all; ranks may then generate
different numbers of tokens without deadlocking. Checkpoints use ``torch.distributed.checkpoint``
(each rank writes its shards into the shared temporary directory, rank 0 renames it).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .engine import LocalEngine, build_adamw
from .packed_batch import build_microbatch
from .update import PackedPolicy

logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "FSDP2Engine", "RankCollectives", "init_distributed", "make_engine", "make_reference"]


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


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_floats(values: list[float], op: str, device: torch.device) -> list[float]:
    """Sum or max of python floats over all ranks (fp64, one collective)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def decoder_layers(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers causal LM (``model.model.layers``), the FSDP units."""
    from .model import decoder_of

    layers = getattr(decoder_of(policy), "layers", None)
    if layers is None:
        raise ValueError(f"{type(policy).__name__}: cannot find its decoder layers (model.model.layers)")
    return list(layers)


def _fsdp_kwargs(device: torch.device, parallel: Any) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    kw: dict[str, Any] = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    mp = parallel.mixed_precision
    if device.type == "cuda" and mp != "no":
        param = torch.float16 if mp == "fp16" else torch.bfloat16
        reduce = torch.float32 if parallel.reduce_dtype == "float32" else torch.bfloat16
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    return kw


def _shard(module: PackedPolicy, device: torch.device, parallel: Any) -> list:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kw = _fsdp_kwargs(device, parallel)
    for layer in decoder_layers(module.policy):
        fully_shard(layer, reshard_after_forward=parallel.reshard_after_forward, **kw)
    fully_shard(module, **kw)
    # FSDP2 initializes lazily at the first forward of the *root*; generate() calls the decoder layers
    # directly, so run the root once (a zero-weight padding micro-batch, a collective) right away.
    with torch.no_grad():
        module(build_microbatch([]))
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:  # the root keeps its parameters gathered after a forward: back to shards, so
        unit.reshard()  # the optimizer (built next) holds the sharded parameters
    return units


def engine_name(parallel: Any) -> str:
    return "fsdp2" if parallel.engine == "auto" else parallel.engine


def make_engine(
    policy: torch.nn.Module, module: PackedPolicy, config: Any, info: DistInfo | None, device: torch.device
):
    """The engine of a run: :class:`~mgrpo_fast.engine.LocalEngine` without torchrun, else
    ``parallel.engine`` (``auto`` = FSDP2)."""
    if info is None:
        return LocalEngine(policy, module, config.optim, torch.device(device))
    if engine_name(config.parallel) == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(policy, module, config.optim, info, config.parallel)
    return FSDP2Engine(policy, module, config.optim, info, config.parallel)


def make_reference(module: PackedPolicy, config: Any, info: DistInfo | None) -> PackedPolicy:
    """The frozen reference model, sharded the same way as the policy (forward only)."""
    if info is None:
        return module
    if engine_name(config.parallel) == "deepspeed":
        from .deepspeed_engine import deepspeed_reference

        return deepspeed_reference(module, info, config.parallel)
    _shard(module, info.device, config.parallel)
    return module


def _forget_forward_order(units: list) -> None:
    """Drop what FSDP2 recorded about the forwards run inside ``generation()``.

    FSDP2 records the order of post-forwards to prefetch all-gathers in the next backward. The decoder
    layers run a rank-dependent number of times while generating (each rank samples its own
    questions, one rank may have none), so without this the ranks would prefetch differently in the
    backward and their collectives would no longer match (a deadlock). Private FSDP2 state; checked
    by tests/test_distributed.py (a rank without questions).
    """
    for unit in units:
        state = unit._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            if group is not None:
                group._post_forward_indices.clear()
                group.comm_ctx.post_forward_order.clear()


class RankCollectives:
    """The engines' collectives on python values (both distributed engines inherit them)."""

    device: torch.device
    rank: int
    world_size: int
    is_main: bool

    def _set_rank(self, info: DistInfo) -> None:
        self.device, self.rank, self.world_size, self.is_main = (
            info.device,
            info.rank,
            info.world_size,
            info.rank == 0,
        )

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return all_reduce_floats(values, op, self.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


class FSDP2Engine(RankCollectives, LocalEngine):
    """The :mod:`~mgrpo_fast.engine` interface on FSDP2 (module docstring); the AdamW ``step``,
    ``zero_grad`` and ``skip_update`` are the one-process engine's (the optimizer holds the shards)."""

    def __init__(
        self, policy: torch.nn.Module, module: PackedPolicy, optim: Any, info: DistInfo, parallel: Any
    ) -> None:
        self.policy, self.module = policy, module
        self._set_rank(info)
        self.units = _shard(module, info.device, parallel)
        self.reshard_after_forward = parallel.reshard_after_forward
        self.optimizer = build_adamw(module.parameters(), optim, info.device)

    # the update
    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # FSDP averages gradients over ranks; every rank's loss already carries the global
        # normalization, so the wanted gradient is the *sum*: scale by W (exact for powers of two).
        (loss * self.world_size).backward()

    def clip_grad_norm(self, max_norm: float | None) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)

    @contextlib.contextmanager
    def generation(self):
        """Full parameters on every rank, no collective inside (module docstring)."""
        for unit in self.units:
            unit.set_reshard_after_forward(False)
            unit.unshard()
        try:
            yield
        finally:
            _forget_forward_order(self.units)
            for unit in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(
                    self.reshard_after_forward if unit is not self.module else True
                )

    # checkpoints
    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "model": get_model_state_dict(self.module),
            "optimizer": get_optimizer_state_dict(self.module, self.optimizer),
        }

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its shards to ``directory/dcp`` (a shared file system)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory / "dcp"))

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / "dcp"))
        set_model_state_dict(self.module, state["model"])
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])

    def export(self, out_dir: str | os.PathLike, tokenizer: Any) -> Path:
        """Collective: gather the full weights on rank 0, which writes ``save_pretrained``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.module, options=opts)
        out = Path(out_dir)
        if self.is_main:
            prefix = "policy."
            state = {k.removeprefix(prefix): v for k, v in full.items()}
            self.policy.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        dist.barrier()
        return out
