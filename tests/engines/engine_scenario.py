"""The engine contract scenario: the same fixed batch and the same steps through any engine.

Run in-process by tests/engines/test_engine_contract.py (one process: ``LocalEngine``) and, under
``torchrun``, as a script (FSDP2, DeepSpeed ZeRO-2/3 on 2 ranks)::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/engines/engine_scenario.py \\
        MODEL_DIR[,MODEL_DIR...] OUT_DIR ENGINE [--key=value ...]

With several model directories (the architecture matrix, tests/models/test_architectures.py: one launch
for all of them), each one's results go to ``OUT_DIR/<name of the model directory>``.

The steps (each records the all-rank loss and the ``StepResult``):

1. ``update``: ``trainer.update`` — the trainer's own path (LR schedule, ``engine.optimizer_step``);
2. ``plain``: an update driven on the engine as the ``Engine`` docstring shows, no clipping (the
   log-probs after 1 serve as the old ones, so the ratio and the loss move with the weights); then a
   checkpoint (``trainer.save_checkpoint``);
3. ``poisoned``: an update whose loss is NaN on rank 0 only: every rank skips it and nothing changes
   (DeepSpeed raises ``NonFiniteLossError`` instead; its run stops here);
4. ``clipped``: an update clipped to ``CLIP``; export ``continued``;
5. ``resumed``: a fresh trainer resumes from the checkpoint of 2 and repeats 4; export ``resumed``.

A skipped update leaves no trace, so ``continued`` and ``resumed`` are bitwise equal. Rank 0 writes
``OUT_DIR/result.json``; every rank checks that the ranks recorded the same results.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import sys
from pathlib import Path

import torch

from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.engines.base import Engine, NonFiniteLossError
from mgrpo_fast.engines.distributed import finish_distributed
from mgrpo_fast.packing.microbatch import SequenceSpec
from mgrpo_fast.rl.layers import TrainingBatch
from mgrpo_fast.rl.trainer import MGRPOTrainer
from mgrpo_fast.rl.update import microbatch_targets

PLAIN_LR, CLIPPED_LR = 1e-3, 5e-4  # small: the ratios stay inside the clip range (gradients flow)
CLIP = 0.5  # below the fixed batch's gradient norm: the clipped step really clips


# ---------------------------------------------------------------- the protocol
def contract_violations(obj: object) -> list[str]:
    """How ``obj`` (an engine, or an engine class) breaks :class:`Engine`: a missing member, or a method
    whose parameters (names, kinds, defaults) differ from the protocol's. Empty when it conforms."""
    cls = obj if isinstance(obj, type) else type(obj)
    out = []
    for name, proto in vars(Engine).items():
        if name.startswith("_") or not callable(proto):
            continue
        impl = getattr(cls, name, None)
        if not callable(impl):
            out.append(f"{cls.__name__}.{name}: missing")
            continue
        want, got = inspect.signature(proto), inspect.signature(impl)
        if [(p.name, p.kind, p.default) for p in want.parameters.values()] != [
            (p.name, p.kind, p.default) for p in got.parameters.values()
        ]:
            out.append(f"{cls.__name__}.{name}{got} differs from Engine.{name}{want}")
    if not isinstance(obj, type):
        out += [
            f"{cls.__name__}.{name}: missing" for name in Engine.__annotations__ if not hasattr(obj, name)
        ]
        if not out and not isinstance(obj, Engine):
            out.append(f"{cls.__name__}: not an Engine")
    return out


def protocol_members() -> set[str]:
    return {n for n, v in vars(Engine).items() if not n.startswith("_") and callable(v)} | set(
        Engine.__annotations__
    )


def engine_uses(path: Path) -> set[str]:
    """Attributes read from an engine in the module at ``path``: ``self.engine.X``, ``engine.X`` and
    ``e.X`` where ``e`` was bound to ``self.engine`` in the same function."""

    def is_self_engine(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "engine"
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        )

    used: set[str] = set()
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        aliases = {a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg == "engine"}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    pairs = (
                        zip(target.elts, node.value.elts)
                        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                        else [(target, node.value)]
                    )
                    aliases |= {t.id for t, v in pairs if isinstance(t, ast.Name) and is_self_engine(v)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and (
                is_self_engine(node.value) or (isinstance(node.value, ast.Name) and node.value.id in aliases)
            ):
                used.add(node.attr)
    return used


# ---------------------------------------------------------------- the batch
def fixed_batch(vocab: int, n: int = 10) -> TrainingBatch:
    """``n`` sequences of both layers with fixed ids, advantages and λ2 = 0.5 weights."""
    g = torch.Generator().manual_seed(1234)
    seqs = []
    for _ in range(n):
        p = torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        seqs.append(SequenceSpec(p, c))
    layer = torch.tensor([1 + (i % 3 == 2) for i in range(n)])
    return TrainingBatch(
        seqs,
        torch.randn(n, generator=g),
        layer,
        torch.where(layer == 2, 0.5, 1.0),
        torch.arange(n),
        torch.arange(n),
    )


def select(batch: TrainingBatch, rows: list[int]) -> TrainingBatch:
    tensors = (batch.advantages, batch.layer, batch.loss_weight, batch.group_id, batch.question_index)
    return TrainingBatch([batch.sequences[i] for i in rows], *(t[rows] for t in tensors))


def gathered_batch(trainer: MGRPOTrainer) -> TrainingBatch:
    """The fixed batch as the trainer sees it after rollouts on 2 ranks: each rank owns the sequences
    ``i % 2 == rank``, gathered in rank order (one process: the same order, built directly)."""
    full, e = fixed_batch(trainer.policy.config.vocab_size), trainer.engine
    if e.world_size == 1:
        return select(
            full, [i for i in range(len(full)) if i % 2 == 0] + [i for i in range(len(full)) if i % 2]
        )
    assert e.world_size == 2, "the scenario's batch split is for 1 or 2 ranks"
    mine = select(full, [i for i in range(len(full)) if i % 2 == e.rank])
    return TrainingBatch.concat(e.all_gather_object(mine))


# ---------------------------------------------------------------- the steps
def make_trainer(model_dir: str, out_dir: Path, engine: str, *overrides: str) -> MGRPOTrainer:
    cfg = load_config(
        None,
        [
            f"--model.path={model_dir}",
            f"--logging.run_dir={out_dir}/run",
            f"--parallel.engine={engine}",
            "--reward.num_workers=0",
            "--optim.lr=1e-2",
            "--optim.eps=1e-3",
            "--train.max_tokens_per_microbatch=40",
            "--rollout.max_new_tokens=8",  # the tiny model's 1024-token context fits both layers
            "--rollout.backend=hf",  # one process and torchrun roll out alike (auto = hf under torchrun)
            *overrides,
        ],
    )
    return MGRPOTrainer(cfg, train_problems=[Problem(id="0", question="q", answer="1")])


def engine_update(
    engine: Engine, microbatches: list, targets: list, lr: float, max_grad_norm: float | None, poison: bool
) -> dict:
    """One update driven on the engine (the ``Engine`` docstring's loop); ``poison``: rank 0's first
    micro-batch loss is multiplied by NaN (NaN gradients on every rank after the reduction)."""
    total = 0.0
    for k, (mb, tg) in enumerate(zip(microbatches, targets)):
        loss, _ = engine.module(mb, tg)
        if poison and k == 0 and engine.rank == 0:
            loss = loss * math.nan
        engine.backward(loss, last=k == len(microbatches) - 1)
        total += float(loss.detach())
    total = engine.all_reduce([total])[0]
    return {"loss": total, **dataclasses.asdict(engine.optimizer_step(lr, max_grad_norm, total))}


def local_parameters(engine: Engine) -> list[torch.Tensor]:
    """This rank's parameters (its shards under FSDP2), copied."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in engine.module.parameters()]
    return [p.detach().clone() for p in params]


def run_scenario(model_dir: str, out_dir: str | Path, engine: str, *overrides: str) -> dict:
    """The module docstring's steps; returns (and rank 0 writes to ``out_dir/result.json``) the records."""
    out_dir = Path(out_dir)
    trainer = make_trainer(model_dir, out_dir, engine, *overrides)
    e = trainer.engine
    assert contract_violations(e) == [], contract_violations(e)
    assert isinstance(e, Engine) and e.is_main == (e.rank == 0)
    batch = gathered_batch(trainer)
    steps: dict[str, dict] = {}

    m = trainer.update(batch, {"logprob": 0.0, "update": 0.0})
    steps["update"] = {
        "loss": m["train/loss"],
        "grad_norm": m["train/grad_norm"],
        "skipped": bool(m["train/skipped_updates"]),
        "lr": m["train/lr"],
    }
    # old log-probs after that update: the ratios of the later updates move with the weights, so their
    # losses do too (and every engine's log-prob forward ``module(mb)`` runs)
    old = trainer.logprobs(e.module, trainer.pack(batch)[0])

    def inputs(t: MGRPOTrainer) -> tuple[list, list]:
        microbatches, weights = t.pack(batch)
        targets = [microbatch_targets(mb, batch.advantages, weights, o) for mb, o in zip(microbatches, old)]
        return microbatches, targets

    mbs, tgs = inputs(trainer)
    steps["plain"] = engine_update(e, mbs, tgs, PLAIN_LR, None, poison=False)
    checkpoint = trainer.save_checkpoint()

    before, error = local_parameters(e), None
    try:
        steps["poisoned"] = engine_update(e, mbs, tgs, PLAIN_LR, CLIP, poison=True)
    except NonFiniteLossError as exc:  # DeepSpeed: the run stops
        error = str(exc)
    else:
        after = local_parameters(e)
        assert all(torch.equal(a, b) for a, b in zip(after, before)), "a skipped update changed weights"
        steps["clipped"] = engine_update(e, mbs, tgs, CLIPPED_LR, CLIP, poison=False)
        trainer.export(out_dir / "continued")

    resumed = make_trainer(model_dir, out_dir, engine, *overrides)
    resumed.resume(checkpoint)
    mbs, tgs = inputs(resumed)
    steps["resumed"] = engine_update(resumed.engine, mbs, tgs, CLIPPED_LR, CLIP, poison=False)
    resumed.export(out_dir / "resumed")

    result = {"world_size": e.world_size, "steps": steps, "nonfinite_error": error}
    text = json.dumps(result)  # NaN written as NaN: equal texts = equal records
    assert len(set(e.all_gather_object(text))) == 1, "the ranks disagree on the scenario's results"
    if e.is_main:
        (out_dir / "result.json").write_text(text)
    return result


if __name__ == "__main__":
    model_dirs, out_dir, engine, *overrides = sys.argv[1:]
    dirs = model_dirs.split(",")
    for model_dir in dirs:
        out = Path(out_dir) if len(dirs) == 1 else Path(out_dir) / Path(model_dir.rstrip("/")).name
        run_scenario(model_dir, out, engine, *overrides)
    finish_distributed()
