"""The one-process engine: the policy as it is, AdamW, safetensors checkpoints.

The trainer talks to one interface; :class:`LocalEngine` is one process. ``mgrpo_fast.engines.fsdp2``
and ``mgrpo_fast.engines.deepspeed_zero`` add FSDP2 and DeepSpeed ZeRO under ``torchrun`` with the same
methods:

* ``module``: the trainer's ``PackedPolicy`` (``mgrpo_fast.rl.update``) to call per micro-batch
  (wrapped by the engine), ``policy``: the transformers model (rollouts, export);
* ``backward(loss)``, ``clip_grad_norm(max_norm)``, ``step(lr)`` (optimizer step + zero grads),
  ``zero_grad()``;
* ``all_reduce(values, op)``: sums / maxima of python floats over ranks;
* ``generation()``: a context in which ``policy`` can run ``generate`` (full parameters);
* ``save(tmp_dir)`` / ``load(path)``: the model and optimizer part of a checkpoint directory;
* ``export(out_dir, tokenizer)``: ``save_pretrained`` of the full model (rank 0 writes).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["LocalEngine", "build_adamw", "lr_at"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


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


def build_adamw(params, optim, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the ``optim`` section's hyper-parameters (fused multi-tensor on CUDA)."""
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        foreach=device.type == "cuda",
    )


class LocalEngine:
    """One process, one device: plain autograd, AdamW, safetensors checkpoints."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, policy: torch.nn.Module, module: torch.nn.Module, optim, device: torch.device) -> None:
        self.policy, self.module, self.device = policy, module, device
        self.optimizer = build_adamw(policy.parameters(), optim, device)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return [float(v) for v in values]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Clip the global gradient norm to ``max_norm`` (None = no clipping) and return it."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def skip_update(self) -> None:
        """Drop the accumulated gradients of a non-finite update (the caller zeroes them)."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def generation(self):
        return contextlib.nullcontext()

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.policy.state_dict().items()}
        # tied weights appear twice in the state dict; safetensors refuses shared storage
        seen: dict[int, str] = {}
        for k in list(state):
            ptr = state[k].data_ptr()
            if ptr in seen and state[k].numel():
                state[k] = state[k].clone()
            seen[ptr] = k
        save_file(state, str(directory / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / MODEL_FILE), device=str(self.device))
        self.policy.load_state_dict(state)
        # tensors and numbers only: a crafted optimizer file cannot run code
        state = torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def export(self, out_dir: str | os.PathLike, tokenizer: Any) -> Path:
        out = Path(out_dir)
        self.policy.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out
