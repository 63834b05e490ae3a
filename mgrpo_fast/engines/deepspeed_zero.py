"""The DeepSpeed ZeRO engine (``parallel.engine: deepspeed``, stage 2 or 3 from ``parallel.zero_stage``).

``deepspeed.initialize`` wraps the trainer's ``PackedPolicy`` (``mgrpo_fast.rl.update``), with a torch AdamW
(``optim`` section) that ZeRO shards (stage 2: optimizer state and gradients; stage 3: parameters too).
On CPU it runs with ``DS_ACCELERATOR=cpu`` and gloo (set automatically when no GPU is visible).

* Gradient accumulation over a varying number of packed micro-batches: the accumulation boundary is
  set explicitly (``set_gradient_accumulation_boundary``) so that only the last micro-batch of an
  update reduces and ``step`` applies; the loss is not divided by DeepSpeed's accumulation count
  (``scale_wrt_gas=False``) and is multiplied by the world size, since DeepSpeed averages gradients
  over ranks and each rank's loss already carries the global normalization (``mgrpo_fast.rl.update``).
* Clipping is DeepSpeed's, inside its ``step`` (the ZeRO optimizer's ``clip_grad``, set to the
  ``max_grad_norm`` of every ``optimizer_step``); the reported norm is its global norm. An update
  with a NaN/Inf loss cannot be discarded from ZeRO's reduced gradient buffers, so under DeepSpeed
  it stops the run with :class:`~mgrpo_fast.engines.base.NonFiniteLossError` (resume from the last
  checkpoint) instead of being skipped as with the other engines. A finite loss whose gradient norm
  is not finite is skipped by ZeRO itself (its overflow check); ``StepResult.skipped`` reports it.
* ZeRO-3: the lm_head weight is registered as an external parameter of the ``PackedPolicy`` (the fused
  loss reads it outside ``lm_head.forward``); rollouts run inside ``GatheredParameters`` (full weights).
* Checkpoints: DeepSpeed's own (``save_checkpoint`` / ``load_checkpoint``, tag ``ds``, into the shared
  temporary checkpoint directory); the export gathers the full weights on rank 0.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mgrpo_fast.engines.base import NonFiniteLossError, StepResult
from mgrpo_fast.engines.distributed import DistInfo, RankCollectives
from mgrpo_fast.engines.optim import build_adamw
from mgrpo_fast.models.policy import lm_head_of, tied_parameter_aliases

__all__ = ["DeepSpeedEngine", "deepspeed_reference"]

_TAG = "ds"


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "parallel.engine: 'deepspeed' needs the deepspeed package: pip install 'mgrpo-fast[deepspeed]' "
            "(or use parallel.engine: fsdp2)"
        ) from e
    if not torch.cuda.is_available():
        # DeepSpeed's CPU comm backend JIT-builds a shared-memory all-reduce op at every initialize (ninja,
        # under a file lock in the torch extensions cache); only its inference all-reduce uses it, training
        # does not. Skipped: no compiler needed, and no hang behind a lock left by a killed process.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _ds_config(parallel: Any, optim: Any | None, device: torch.device) -> dict[str, Any]:
    mp = parallel.mixed_precision
    half = device.type == "cuda" and mp != "no"
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": parallel.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "bf16": {"enabled": half and mp in ("auto", "bf16")},
        "fp16": {"enabled": half and mp == "fp16"},
        "communication_data_type": "fp32" if parallel.reduce_dtype == "float32" else "bf16",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if optim is not None:
        cfg["gradient_clipping"] = float(optim.grad_clip or 0.0)
    return cfg


class DeepSpeedEngine(RankCollectives):
    """:class:`~mgrpo_fast.engines.base.Engine` on DeepSpeed ZeRO-2/3 (module docstring).

    Args:
        policy: the transformers causal LM (rollouts gather it under ZeRO-3; ``export`` writes it).
        module: the trainer's ``PackedPolicy`` around ``policy``, wrapped by ``deepspeed.initialize``.
        optim: the ``optim`` config section; ``info``: this rank; ``parallel``: the ``parallel`` section.
    """

    def __init__(
        self, policy: torch.nn.Module, module: torch.nn.Module, optim: Any, info: DistInfo, parallel: Any
    ) -> None:
        super().__init__(info)
        ds = _import_deepspeed()
        self.deepspeed, self.policy = ds, policy
        self.stage = parallel.zero_stage
        if self.stage == 3:
            ds.zero.register_external_parameter(module, lm_head_of(policy).weight)
        optimizer = build_adamw(module.parameters(), optim, info.device)
        self.engine, self.optimizer, _, _ = ds.initialize(
            model=module, optimizer=optimizer, config=_ds_config(parallel, optim, info.device)
        )
        if not hasattr(self.optimizer, "clip_grad"):
            raise RuntimeError(
                f"deepspeed {ds.__version__}: its ZeRO optimizer {type(self.optimizer).__name__} has no "
                "clip_grad; this engine needs a DeepSpeed whose ZeRO-2/3 optimizers clip with it"
            )
        self.module = self.engine  # its forward runs PackedPolicy.forward under ZeRO's hooks

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """``last``: the update's last micro-batch, whose backward reduces the accumulated gradients."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def optimizer_step(self, lr: float, max_grad_norm: float | None, loss: float) -> StepResult:
        if not math.isfinite(loss):  # the same on every rank: ``loss`` is the all-rank loss
            raise NonFiniteLossError(
                "a NaN/Inf loss under parallel.engine: deepspeed (ZeRO cannot discard reduced gradients); "
                "resume from the last checkpoint with a lower optim.lr, or use parallel.engine: fsdp2"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.clip_grad = float(max_grad_norm or 0.0)  # 0 = no clipping (DeepSpeed's)
        self.engine.step()  # global norm, overflow check, clip, AdamW; skips itself on overflow
        norm = self.engine.get_global_grad_norm()
        skipped = bool(getattr(self.optimizer, "overflow", False))
        self.engine.zero_grad()
        return StepResult(grad_norm=math.nan if norm is None else float(norm), skipped=skipped, lr=lr)

    def generation(self) -> contextlib.AbstractContextManager[Any]:
        if self.stage != 3:
            return contextlib.nullcontext()
        return self.deepspeed.zero.GatheredParameters(list(self.policy.parameters()), modifier_rank=None)

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """ZeRO-3 (collective): each parameter gathered alone, inside its own ``GatheredParameters``, and
        cloned (the consumer may hold a layer's tensors until the layer is complete, after the gathered
        storage is released); ZeRO-2 keeps full parameters on every rank."""
        for name, p in self.policy.named_parameters():
            if self.stage != 3:
                yield name, p.detach()
                continue
            with self.deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.detach().clone()
            yield name, full

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag=_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag=_TAG)
        if path is None:
            raise RuntimeError(f"resume: {directory} holds no DeepSpeed checkpoint (tag {_TAG!r})")

    def export(self, out_dir: str | os.PathLike, tokenizer: Any) -> Path:
        out = Path(out_dir)
        with self.generation():  # full weights on every rank (ZeRO-3), rank 0 writes
            if self.is_main:
                tied = tied_parameter_aliases(self.policy)  # the clones below no longer share storage
                state = {
                    k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items() if k not in tied
                }
                self.policy.save_pretrained(out, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(out)
        dist.barrier()
        return out


def deepspeed_reference(module: torch.nn.Module, info: DistInfo, parallel: Any) -> torch.nn.Module:
    """The frozen reference under DeepSpeed: ZeRO-3 partitions it like the policy; ZeRO-2 does not shard
    parameters, so the reference stays a plain replicated module."""
    if parallel.zero_stage != 3:
        return module
    ds = _import_deepspeed()
    ds.zero.register_external_parameter(module, lm_head_of(module.policy).weight)
    engine, *_ = ds.initialize(model=module, config=_ds_config(parallel, None, info.device))
    return engine
