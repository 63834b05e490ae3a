"""The FSDP2 engine (``parallel.engine: fsdp2``, the default under ``torchrun``).

:class:`FSDP2Engine`: ``fully_shard`` on every decoder layer, then on the trainer's ``PackedPolicy``
(``mgrpo_fast.rl.update``) as the root unit, which owns the embedding, the final norm and the lm_head
(tied or not): the root forward all-gathers them and the fused loss reads the gathered lm_head weight;
their gradients are reduce-scattered after the backward. Mixed precision on CUDA: bf16 parameters for
compute, fp32 gradient reduction, fp32 sharded master weights (AdamW state is sharded too). Gradients
must be *summed* over ranks: every rank's loss already carries the global normalization, so the sum is
the one-process gradient of the same batch; FSDP averages, so the backward scales the loss by the world
size (a custom divide factor needs PREMUL_SUM, which gloo lacks).

Rollouts: ``generation()`` unshards every unit once (full parameters on each rank) and turns off
resharding after forward, so ``generate`` runs with no collective at all; ranks may then generate
different numbers of tokens without deadlocking. Checkpoints use ``torch.distributed.checkpoint``
(each rank writes its shards into the shared temporary directory, rank 0 renames it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mgrpo_fast.engines.base import StepResult
from mgrpo_fast.engines.distributed import DistInfo, RankCollectives
from mgrpo_fast.engines.optim import AdamWUpdate
from mgrpo_fast.models.policy import decoder_of, tied_parameter_aliases
from mgrpo_fast.packing.microbatch import build_microbatch

__all__ = ["FSDP2Engine", "decoder_layers", "shard_packed_policy"]


def decoder_layers(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers causal LM (``model.model.layers``), the FSDP units."""

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


def shard_packed_policy(module: torch.nn.Module, device: torch.device, parallel: Any) -> list:
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


def _forget_forward_order(units: list) -> None:
    """Drop what FSDP2 recorded about the forwards run inside ``generation()``.

    FSDP2 records the order of post-forwards to prefetch all-gathers in the next backward. The decoder
    layers run a rank-dependent number of times while generating (each rank samples its own
    questions, one rank may have none), so without this the ranks would prefetch differently in the
    backward and their collectives would no longer match (a deadlock). Private FSDP2 state; checked
    by tests/engines/test_distributed.py (a rank without questions).
    """
    for unit in units:
        state = unit._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            if group is not None:
                group._post_forward_indices.clear()
                group.comm_ctx.post_forward_order.clear()


class FSDP2Engine(RankCollectives):
    """:class:`~mgrpo_fast.engines.base.Engine` on FSDP2 (module docstring). AdamW holds the local
    shards; clip / step / skip are the one-process engine's (:class:`~mgrpo_fast.engines.optim.AdamWUpdate`)
    with the gradient norm taken over all ranks.

    Args:
        policy: the transformers causal LM (``export`` writes it).
        module: the trainer's ``PackedPolicy`` around ``policy``; sharded in place here.
        optim: the ``optim`` config section; ``info``: this rank; ``parallel``: the ``parallel`` section.
    """

    def __init__(
        self, policy: torch.nn.Module, module: torch.nn.Module, optim: Any, info: DistInfo, parallel: Any
    ) -> None:
        super().__init__(info)
        self.policy, self.module = policy, module
        self.units = shard_packed_policy(module, info.device, parallel)
        self.reshard_after_forward = parallel.reshard_after_forward
        self.adamw = AdamWUpdate(module, optim, info.device)  # after sharding: the optimizer holds shards
        self.optimizer = self.adamw.optimizer

    # the update
    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # FSDP averages gradients over ranks; every rank's loss already carries the global
        # normalization, so the wanted gradient is the *sum*: scale by W (exact for powers of two).
        (loss * self.world_size).backward()

    def optimizer_step(self, lr: float, max_grad_norm: float | None, loss: float) -> StepResult:
        return self.adamw.step(lr, max_grad_norm, loss)

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
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

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: each parameter's shards all-gathered alone (one full tensor alive at a time)."""
        for name, p in self.policy.named_parameters():
            p = p.detach()
            yield name, p.full_tensor() if isinstance(p, DTensor) else p

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
            prefix, tied = "policy.", tied_parameter_aliases(self.policy)
            state = {k.removeprefix(prefix): v for k, v in full.items() if k.removeprefix(prefix) not in tied}
            self.policy.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        dist.barrier()
        return out
