"""One packed update on a fixed batch, under torchrun (2 ranks) or alone (1 process); writes the
updated weights with ``export``. Used by tests/engines/test_distributed.py:

    python tests/dist_update_worker.py MODEL_DIR OUT_DIR ENGINE [--key=value ...]
"""

from __future__ import annotations

import sys

import torch

from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.packing.microbatch import SequenceSpec
from mgrpo_fast.rl.layers import TrainingBatch
from mgrpo_fast.rl.trainer import MGRPOTrainer


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


def main(model_dir: str, out_dir: str, engine: str, *overrides: str) -> None:
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
            *overrides,
        ],
    )
    trainer = MGRPOTrainer(cfg, train_problems=[Problem(id="0", question="q", answer="1")])
    full = fixed_batch(trainer.policy.config.vocab_size)
    e = trainer.engine
    # each rank owns some sequences (as after its own rollouts); the trainer gathers them
    mine = [i for i in range(len(full)) if i % e.world_size == e.rank]
    local = TrainingBatch(
        [full.sequences[i] for i in mine],
        *(
            t[mine]
            for t in (full.advantages, full.layer, full.loss_weight, full.group_id, full.question_index)
        ),
    )
    batch = TrainingBatch.concat(e.all_gather_object(local))
    if e.world_size == 1:  # the same order as the gathered batch of 2 ranks
        order = [i for i in range(len(full)) if i % 2 == 0] + [i for i in range(len(full)) if i % 2 == 1]
        batch = TrainingBatch(
            [full.sequences[i] for i in order],
            *(
                t[order]
                for t in (full.advantages, full.layer, full.loss_weight, full.group_id, full.question_index)
            ),
        )
    metrics = trainer.update(batch, {"logprob": 0.0, "update": 0.0})
    assert metrics["train/skipped_updates"] == 0.0, metrics
    trainer.export(f"{out_dir}/final")
    if e.is_main:
        print("LOSS", metrics["train/loss"], "MICROBATCHES", metrics["train/microbatches"])


if __name__ == "__main__":
    main(*sys.argv[1:])
