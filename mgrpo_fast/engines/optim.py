"""The optimizer of the ``optim`` section: AdamW, its learning-rate schedule, and the clip / step / skip
of one update shared by the engines whose optimizer is a plain ``torch.optim.AdamW`` (one process and
FSDP2; DeepSpeed steps its own ZeRO optimizer)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from mgrpo_fast.engines.base import StepResult

__all__ = ["AdamWUpdate", "build_adamw", "clip_grad_norm", "lr_at"]


def lr_at(update: int, *, peak: float, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning rate of 0-based optimizer update ``update`` of ``total``: linear warmup over ``warmup``
    updates (the first update gets ``peak / warmup``), then ``cosine`` / ``linear`` decay to
    ``min_ratio · peak`` at ``total``, or ``constant``. A pure function of the update count, so a
    resumed run needs no scheduler state."""
    if warmup > 0 and update < warmup:
        return peak * (update + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return peak * (min_ratio + (1.0 - min_ratio) * shape)


def build_adamw(params: Iterable[torch.nn.Parameter], optim: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` with the ``optim`` section's ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` (multi-tensor ``foreach`` kernels on CUDA)."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        foreach=device.type == "cuda",
    )


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Scale the gradients of ``params`` so that their global L2 norm is at most ``max_norm`` (None: no
    clipping) and return the norm before clipping (0.0 when no parameter has a gradient).

    Sharded gradients (FSDP2 ``DTensor`` shards) give the norm over all ranks: a collective, the same
    value on every rank."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm or math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor norm: the all-rank value
        norm = norm.full_tensor()
    return float(norm)


class AdamWUpdate:
    """The :meth:`~mgrpo_fast.engines.base.Engine.optimizer_step` of an engine whose optimizer is a
    ``torch.optim.AdamW`` over ``module``'s (possibly sharded) parameters.

    A NaN/Inf update is discarded exactly: the optimizer is not stepped (no AdamW moment or step
    count changes) and the gradients are dropped, so the next update starts as if it never happened.
    """

    def __init__(self, module: torch.nn.Module, optim: Any, device: torch.device) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_adamw(self.params, optim, device)

    def step(self, lr: float, max_grad_norm: float | None, loss: float) -> StepResult:
        # ``loss`` is the all-rank loss and the norm an all-rank norm: every rank decides alike, so a
        # sharding engine's collectives (the norm, the next update) stay matched.
        norm = clip_grad_norm(self.params, max_grad_norm) if math.isfinite(loss) else math.nan
        skipped = not math.isfinite(norm)
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=skipped, lr=lr)
