"""The one-process engine: the policy as it is, AdamW, safetensors checkpoints.

:class:`LocalEngine` implements :class:`~mgrpo_fast.engines.base.Engine` for a run without
``torchrun``: plain autograd, collectives that return their input, and a checkpoint made of
``model.safetensors`` + ``optimizer.pt`` (loaded with ``weights_only``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mgrpo_fast.engines.base import StepResult, check_reduce_op
from mgrpo_fast.engines.optim import AdamWUpdate

__all__ = ["LocalEngine"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class LocalEngine:
    """One process, one device (:class:`~mgrpo_fast.engines.base.Engine`).

    Args:
        policy: the transformers causal LM (written by ``save`` / ``export``).
        module: the trainer's ``PackedPolicy`` around ``policy`` (the forward the trainer calls).
        optim: the ``optim`` config section (AdamW hyper-parameters).
        device: where ``policy`` lives (checkpoints load onto it).
    """

    def __init__(
        self, policy: torch.nn.Module, module: torch.nn.Module, optim: Any, device: torch.device
    ) -> None:
        self.policy, self.module, self.device = policy, module, device
        self.rank, self.world_size, self.is_main = 0, 1, True
        self.adamw = AdamWUpdate(module, optim, device)
        self.optimizer = self.adamw.optimizer

    # the update
    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def optimizer_step(self, lr: float, max_grad_norm: float | None, loss: float) -> StepResult:
        return self.adamw.step(lr, max_grad_norm, loss)

    # collectives of one rank
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        check_reduce_op(op)
        return [float(v) for v in values]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def generation(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's parameters as they are (no copy)."""
        for name, p in self.policy.named_parameters():
            yield name, p.detach()

    # checkpoints
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
