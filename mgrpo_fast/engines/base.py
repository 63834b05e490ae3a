"""The ``Engine`` contract: what the trainer (``mgrpo_fast.rl``) asks of an engine, and nothing more.

An engine owns the policy's parameters, their gradients and the optimizer on one rank, and the
collectives between ranks. Three engines implement it: :class:`~mgrpo_fast.engines.local.LocalEngine`
(one process), :class:`~mgrpo_fast.engines.fsdp2.FSDP2Engine` and
:class:`~mgrpo_fast.engines.deepspeed_zero.DeepSpeedEngine` (under ``torchrun``);
:func:`~mgrpo_fast.engines.factory.make_engine` picks one. The contract is structural (a
``typing.Protocol``): ``isinstance(x, Engine)`` checks that every member is present, and
tests/engines/test_engine_contract.py runs every engine through the same steps and compares them.

One optimizer update, as the trainer drives it::

    for k, (mb, targets) in enumerate(microbatches):    # every rank runs the same number
        loss, metrics = engine.module(mb, targets)        # this rank's share of the global loss
        engine.backward(loss, last=k == len(microbatches) - 1)
    total = engine.all_reduce([sum of the losses])[0]   # the loss of the whole batch, every rank
    result = engine.optimizer_step(lr, max_grad_norm, total)   # clip, step or skip, zero the grads

Collective methods must be called by every rank in the same order (a rank that skips one hangs the
others); in one process they are no-ops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["REDUCE_OPS", "Engine", "NonFiniteLossError", "StepResult", "check_reduce_op"]

REDUCE_OPS = ("sum", "max")


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient norm stopped the run (too many in a row, or an engine that cannot
    discard such an update)."""


@dataclass(frozen=True)
class StepResult:
    """The outcome of one :meth:`Engine.optimizer_step` (the same on every rank).

    Attributes:
        grad_norm: global L2 norm of the gradients over all ranks, before clipping; NaN when the loss
            was NaN/Inf (the norm is then not computed), Inf/NaN when the gradients were.
        skipped: True when the update was not applied (a NaN/Inf loss or gradient norm): parameters
            and optimizer state are unchanged and the gradients were discarded.
        lr: the learning rate of the update (the one passed in, applied or not).
    """

    grad_norm: float
    skipped: bool
    lr: float


def check_reduce_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce: op must be one of {REDUCE_OPS}, got {op!r}")


@runtime_checkable
class Engine(Protocol):
    """What the trainer uses of an engine (module docstring for the order of calls).

    Attributes:
        module: the trainer's ``PackedPolicy`` (``mgrpo_fast.rl.update``) as this engine runs it (it
            may be a wrapper: DeepSpeed's engine, an FSDP2 root unit). ``module(mb, targets)`` returns
            ``(loss, metrics)`` with ``loss`` a 0-dim tensor; ``module(mb)`` (under ``no_grad``)
            returns the ``(L,)`` log-probs of the micro-batch's ``L`` loss rows.
        rank: this process's rank in ``[0, world_size)`` (0 in one process).
        world_size: the number of ranks (1 in one process).
        is_main: ``rank == 0``: the rank that logs and writes shared files.
    """

    module: torch.nn.Module
    rank: int
    world_size: int
    is_main: bool

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate the gradients of ``loss`` (0-dim, this rank's share of a loss that is already
        normalized over the whole batch of all ranks) into the parameters' gradients. The gradient of
        the update is the *sum* over ranks and micro-batches (engines that average scale for it).
        ``last``: this is the update's last micro-batch (engines that reduce gradients once per
        update do it here). Collective on the last micro-batch under ``torchrun``."""
        ...

    def optimizer_step(self, lr: float, max_grad_norm: float | None, loss: float) -> StepResult:
        """Finish the update whose gradients :meth:`backward` accumulated.

        ``loss``: the update's total loss over all ranks (the same float on every rank, from
        :meth:`all_reduce`). When it is finite, the global gradient norm is computed and the gradients
        clipped to ``max_grad_norm`` (None: no clipping); when loss and norm are finite, AdamW steps
        at learning rate ``lr``. Otherwise the update is skipped (``StepResult.skipped``: parameters
        and optimizer state untouched) — the same decision on every rank, since it depends only on
        all-rank values — or, for an engine that cannot discard gradients (DeepSpeed),
        :class:`NonFiniteLossError` is raised. The gradients are zeroed in every case that returns.
        Collective under ``torchrun``."""
        ...

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise ``op`` (``"sum"`` or ``"max"``) of ``values`` over all ranks, in fp64; every
        rank passes a list of the same length and gets the same result. Collective."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order: ``world_size`` items. Collective."""
        ...

    def barrier(self) -> None:
        """Wait until every rank gets here. Collective."""
        ...

    def generation(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which the policy (the transformers model inside :attr:`module`) holds its full
        parameters and can run ``generate`` with no collective inside, so ranks may generate
        different numbers of tokens. Entering and leaving it are collective for sharding engines."""
        ...

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's full parameters one at a time, ``(transformers name, tensor)``, for the rollout
        engine's weight sync (docs/rollout.md): no second full copy of the model (a sharded engine
        gathers one parameter, yields it, and frees it before the next). Collective under ``torchrun``:
        every rank iterates to the end."""
        ...

    def save(self, directory: Path) -> None:
        """Write the model and optimizer state into ``directory``, which exists and is shared by all
        ranks (the caller makes it and renames it atomically afterwards). Collective."""
        ...

    def load(self, directory: Path) -> None:
        """Restore model and optimizer state from a ``directory`` written by :meth:`save` of the same
        engine and world size. Collective."""
        ...

    def export(self, out_dir: str | os.PathLike, tokenizer: Any) -> Path:
        """``save_pretrained`` the full model (safetensors) and ``tokenizer`` into ``out_dir`` (rank 0
        writes, every rank returns ``Path(out_dir)``), loadable by ``transformers`` without this
        package. Collective."""
        ...
