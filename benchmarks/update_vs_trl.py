"""The update phase of one ``make demo`` step, ours beside TRL's ``GRPOTrainer``, in one run (CPU).

``make bench-update`` (``python benchmarks/update_vs_trl.py``). Both trainers start from the same
weights (the bundled tiny model, fp32) and update on the same batch, shaped like one demo step's
(``STEP_SHAPE``: 128 layer-1 sequences of a short prompt, 128 layer-2 sequences whose prompt holds the
question, a first answer and the correction instruction; completions up to 64 tokens; random token
ids and advantages, drawn once from a fixed seed): a demo step's rollouts before the groups without
a reward signal are dropped (a measured demo step trained 64 of them, docs/performance.md). One
update is, for both: the ``dapo`` loss (``beta = 0``, one policy update per batch, so no old
log-probs) forward and backward over the whole batch in micro-batches, gradient clipping at 1.0 and
an AdamW step.

* ours: the trainer's update (``rl.update.PackedPolicy``): the sequences packed into micro-batches of
  at most ``train.max_tokens_per_microbatch = 8192`` tokens (``configs/demo.yaml``), the packed
  attention, only the loss rows through the lm_head (the fused loss).
* TRL: ``GRPOTrainer._compute_loss`` (TRL's default fused LM head) on padded micro-batches of
  ``TRL_MICRO_BATCH`` sequences (prompts left-padded, completions right-padded, as TRL collates),
  ``current_gradient_accumulation_steps`` and ``num_items_in_batch`` set as its training loop sets them.

Rounds alternate (round ``r`` starts with the other trainer than round ``r - 1``); the first round is a
warm-up, then ``MGRPO_UPDATE_ROUNDS`` (default 5) timed rounds. Printed and written to
``benchmarks/results/update-<host>-<UTC date>.json``: the loss of the warm-up round (same weights,
same batch: both trainers must agree), each trainer's median seconds per update, and TRL's median over
ours. Never asserts on time.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_lib as bl  # noqa: E402
import cpu_bench  # noqa: E402

# (sequences, prompt tokens lo-hi, completion tokens lo-hi) of each layer of one demo step
STEP_SHAPE = ((128, (20, 40), (20, 64)), (128, (80, 130), (20, 64)))
TRL_MICRO_BATCH = 64
MAX_TOKENS_PER_MICROBATCH = 8192
LR, CLIP = 3e-4, 1.0


def demo_like_batch(vocab: int, seed: int = 0) -> tuple[list[tuple[list[int], list[int]]], torch.Tensor]:
    """``[(prompt_ids, completion_ids)]`` and ``(S,)`` advantages, shaped like one demo step."""
    rng = random.Random(seed)
    token = lambda: rng.randrange(3, vocab)  # noqa: E731 - ids 0-2 are the special tokens
    seqs = []
    for count, (p_lo, p_hi), (c_lo, c_hi) in STEP_SHAPE:
        for _ in range(count):
            prompt = [token() for _ in range(rng.randint(p_lo, p_hi))]
            seqs.append((prompt, [token() for _ in range(rng.randint(c_lo, c_hi))]))
    adv = torch.tensor([rng.gauss(0.0, 1.0) for _ in seqs])
    return seqs, adv


class OurUpdate:
    """One update of ``mgrpo_fast``'s trainer on the batch (module doc)."""

    def __init__(self, path: str, seqs, adv: torch.Tensor):
        from mgrpo_fast.models.policy import load_policy
        from mgrpo_fast.ops.options import LossOptions
        from mgrpo_fast.packing.microbatch import SequenceSpec
        from mgrpo_fast.packing.planner import plan_microbatches
        from mgrpo_fast.rl.update import PackedPolicy, global_sequence_weights, microbatch_targets

        model = load_policy(path, dtype=torch.float32, device="cpu")
        self.module = PackedPolicy(model, LossOptions(loss_type="dapo", beta=0.0))
        specs = [SequenceSpec(prompt_ids=p, completion_ids=c) for p, c in seqs]
        lengths = torch.tensor([len(c) for _, c in seqs], dtype=torch.float64)
        weights = global_sequence_weights(lengths, torch.ones_like(lengths), "dapo")
        plan = plan_microbatches(specs, max_tokens_per_microbatch=MAX_TOKENS_PER_MICROBATCH)
        self.microbatches = plan.microbatches_for(0, specs)
        self.targets = [microbatch_targets(mb, adv, weights) for mb in self.microbatches]
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def __call__(self) -> float:
        total = 0.0
        for mb, tg in zip(self.microbatches, self.targets):
            loss, _ = self.module(mb, tg)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


class TrlUpdate:
    """One update of TRL's ``GRPOTrainer`` on the batch (module doc)."""

    def __init__(self, path: str, seqs, adv: torch.Tensor, out_dir: str):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        steps = len(seqs) // TRL_MICRO_BATCH
        args = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=TRL_MICRO_BATCH,
            gradient_accumulation_steps=steps,
            num_generations=8,
            max_completion_length=max(len(c) for _, c in seqs),
            loss_type="dapo",
            beta=0.0,
            learning_rate=LR,
            max_grad_norm=CLIP,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            dataloader_num_workers=0,
        )
        self.trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["1+1="] * TRL_MICRO_BATCH}),
            processing_class=tokenizer,
        )
        self.trainer.model.train()
        self.trainer.current_gradient_accumulation_steps = steps
        pad = tokenizer.pad_token_id or 0
        items = torch.tensor(float(sum(len(c) for _, c in seqs)))
        self.inputs = []
        for k in range(0, len(seqs), TRL_MICRO_BATCH):
            part = seqs[k : k + TRL_MICRO_BATCH]
            p_len, c_len = max(len(p) for p, _ in part), max(len(c) for _, c in part)
            prompt = torch.full((len(part), p_len), pad)
            completion = torch.full((len(part), c_len), pad)
            p_mask, c_mask = torch.zeros_like(prompt), torch.zeros_like(completion)
            for i, (p, c) in enumerate(part):
                prompt[i, p_len - len(p) :], p_mask[i, p_len - len(p) :] = torch.tensor(p), 1
                completion[i, : len(c)], c_mask[i, : len(c)] = torch.tensor(c), 1
            self.inputs.append(
                {
                    "prompt_ids": prompt,
                    "prompt_mask": p_mask,
                    "completion_ids": completion,
                    "completion_mask": c_mask,
                    "advantages": adv[k : k + TRL_MICRO_BATCH],
                    "old_per_token_logps": None,
                    "ref_per_token_logps": None,
                    "num_items_in_batch": items,
                }
            )
        self.opt = torch.optim.AdamW(self.trainer.model.parameters(), lr=LR)

    def __call__(self) -> float:
        model, total = self.trainer.model, 0.0
        for inputs in self.inputs:
            loss = self.trainer.compute_loss(model, inputs)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def main() -> int:
    import tempfile

    from mgrpo_fast.data.bundled import bundled_model_path

    torch.manual_seed(0)
    path = bundled_model_path()
    vocab = json.load(open(os.path.join(path, "config.json"), encoding="utf-8"))["vocab_size"]
    seqs, adv = demo_like_batch(vocab)
    n_rounds = max(1, int(os.environ.get("MGRPO_UPDATE_ROUNDS", "5")))
    with tempfile.TemporaryDirectory() as out_dir:
        updates = {"ours": OurUpdate(path, seqs, adv), "trl": TrlUpdate(path, seqs, adv, out_dir)}
        names = list(updates)
        first_loss: dict[str, float] = {}
        seconds: dict[str, list[float]] = {n: [] for n in names}
        load_before = cpu_bench.load_average()
        for r in range(n_rounds + 1):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                loss = updates[name]()
                took = time.perf_counter() - t0
                if r == 0:
                    first_loss[name] = loss
                else:
                    seconds[name].append(took)
            print(f"round {r}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names if r), flush=True)
    med = {n: statistics.median(v) for n, v in seconds.items()}
    record: dict[str, Any] = {
        "what": "one update (dapo fwd+bwd over the batch, clip, AdamW) of a demo-step batch",
        "machine": platform.node(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": bl.git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sequences": len(seqs),
        "tokens": sum(len(p) + len(c) for p, c in seqs),
        "loss_tokens": sum(len(c) for _, c in seqs),
        "trl_micro_batch": TRL_MICRO_BATCH,
        "max_tokens_per_microbatch": MAX_TOKENS_PER_MICROBATCH,
        "first_loss": first_loss,
        "seconds": {n: [round(s, 3) for s in v] for n, v in seconds.items()},
        "median_s": {n: round(v, 3) for n, v in med.items()},
        "trl_over_ours": round(med["trl"] / med["ours"], 3),
        "load_before": load_before,
        "load_after": cpu_bench.load_average(),
    }
    folder = bl.results_dir()
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, f"update-{bl.slug(record['machine'])}-{record['date'][:10]}.json")
    bl.write_json(out, record)
    print(json.dumps({k: record[k] for k in ("first_loss", "median_s", "trl_over_ours", "load_before")}))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
