"""The DeepSpeed ZeRO engine (``parallel.engine: deepspeed``, stage 2 or 3 from ``parallel.zero_stage``).

``deepspeed.initialize`` wraps the trainer's ``PackedPolicy`` (``mgrpo_fast.rl.update``), with a torch AdamW
(``optim`` section) that ZeRO shards (stage 2: optimizer state and gradients; stage 3: parameters too).
On CPU it runs with ``DS_ACCELERATOR=cpu`` and gloo (set automatically when no GPU is visible).

* Gradient accumulation over a varying number of packed micro-batches: the accumulation boundary is
  set explicitly (``set_gradient_accumulation_boundary``) so that only the last micro-batch of an
  update reduces and ``step`` applies; the loss is not divided by DeepSpeed's accumulation count
  (``scale_wrt_gas=False``) and is multiplied by the world size, since DeepSpeed averages gradients
  over ranks and each rank's loss already carries the global normalization (``mgrpo_fast.rl.update``).
* Clipping is DeepSpeed's (``gradient_clipping`` = ``optim.grad_clip``); the logged norm is its
  global norm. An update with a NaN/Inf loss cannot be discarded from ZeRO's reduced gradient
  buffers, so under DeepSpeed it stops the run (resume from the last checkpoint) instead of being
  skipped as with the other engines.
* ZeRO-3: the lm_head weight is registered as an external parameter of the ``PackedPolicy`` (the fused
  loss reads it outside ``lm_head.forward``); rollouts run inside ``GatheredParameters`` (full weights).
* Checkpoints: DeepSpeed's own (``save_checkpoint`` / ``load_checkpoint``, tag ``ds``, into the shared
  temporary checkpoint directory); the export gathers the full weights on rank 0.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mgrpo_fast.engines.distributed import DistInfo, RankCollectives
from mgrpo_fast.engines.local import build_adamw
from mgrpo_fast.models.policy import lm_head_of

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
    """The :mod:`~mgrpo_fast.engines.local` interface on DeepSpeed ZeRO (module docstring)."""

    def __init__(
        self, policy: torch.nn.Module, module: torch.nn.Module, optim: Any, info: DistInfo, parallel: Any
    ) -> None:
        ds = _import_deepspeed()
        self.deepspeed, self.policy = ds, policy
        self._set_rank(info)
        self.stage = parallel.zero_stage
        if self.stage == 3:
            ds.zero.register_external_parameter(module, lm_head_of(policy).weight)
        optimizer = build_adamw(module.parameters(), optim, info.device)
        self.engine, self.optimizer, _, _ = ds.initialize(
            model=module, optimizer=optimizer, config=_ds_config(parallel, optim, info.device)
        )
        self.module = self.engine  # its forward runs PackedPolicy.forward under ZeRO's hooks

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """``last``: the update's last micro-batch, whose backward reduces the accumulated gradients."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float | None) -> float | None:
        return None  # DeepSpeed clips inside step(); its norm is returned by step()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def skip_update(self) -> None:
        from mgrpo_fast.engines.base import NonFiniteLossError

        raise NonFiniteLossError(
            "a NaN/Inf loss under parallel.engine: deepspeed (ZeRO cannot discard reduced gradients); "
            "resume from the last checkpoint with a lower optim.lr, or use parallel.engine: fsdp2"
        )

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def generation(self):
        if self.stage != 3:
            return contextlib.nullcontext()
        return self.deepspeed.zero.GatheredParameters(list(self.policy.parameters()), modifier_rank=None)

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
                state = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
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
