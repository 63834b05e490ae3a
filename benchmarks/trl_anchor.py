"""The peer anchor for learning: TRL's ``GRPOTrainer`` on the embedded default, evaluated with our
two-pass protocol, next to ``make compare``'s GRPO row.

Everything is read from the same config ``make compare`` runs (``configs/demo.yaml`` with
``--algo grpo``, so the group size is GRPO's equal-budget ``G1'``): the bundled model and task, the
prompt, the verifier reward (``correctness_reward``), the group size (``num_generations``), the
questions per step (``generation_batch_size = questions_per_step x G1'``, one optimizer step per
generation batch, as ours), the temperature and completion cap, the loss (``loss_type``, ε, β), AdamW
(lr, betas, eps, weight decay, gradient clip) and the learning-rate schedule (our ``lr_at``, passed to
TRL as a ``LambdaLR``), and the number of steps. What stays TRL's: its sampler and data order, its
generation (transformers ``generate``), advantages (``scale_rewards="group"``), and its loss
normalization, which keeps zero-variance groups in the token count (ours drops them).

After training, the policy is evaluated exactly as our runs are (``configured_two_pass_correctness``
on the same held-out problems, greedy): Acc@t1 is TRL's number; Acc@t2 is there for completeness (TRL
trains no correction round).

    python benchmarks/trl_anchor.py [--seeds 0 1 2] [--out runs/trl_anchor] [--key.sub=value ...]

Writes ``{out}/summary.json`` and prints a Markdown row per seed and the mean ± std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mgrpo_fast.cli.demo import DEFAULT_CONFIG
from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.prompts import build_prompt
from mgrpo_fast.data.train_data import default_model_path, load_eval_problems, load_train_problems
from mgrpo_fast.engines.optim import lr_at
from mgrpo_fast.rl.evaluate import configured_two_pass_correctness, summarize_two_pass
from mgrpo_fast.rl.rewards import correctness_reward
from mgrpo_fast.rl.rollout.hf import HFGenerateBackend


def verifier(prompts, completions, answer, **_):
    """TRL reward function: our verifier on each completion (``answer`` is the dataset column)."""
    return [correctness_reward(c, a) for c, a in zip(completions, answer)]


def evaluate(model, tokenizer, cfg, problems):
    """Our two-pass eval of ``model`` on ``problems``, with the settings ``MGRPOTrainer.evaluate`` uses."""
    return summarize_two_pass(
        *configured_two_pass_correctness(cfg, problems, tokenizer, HFGenerateBackend(model, tokenizer))
    )


def train_one(cfg, seed: int, out: Path):
    """TRL ``GRPOTrainer`` for ``cfg.train.total_steps`` steps; returns the trained model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    path = cfg.model.path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    d, o, lc, g = cfg.data, cfg.optim, cfg.loss, cfg.layer1.group_size
    problems = load_train_problems(d)
    prompts = [
        build_prompt(
            p, tokenizer, system_prompt=d.system_prompt, template=d.template, instruction=d.instruction
        )
        for p in problems
    ]
    dataset = Dataset.from_dict({"prompt": prompts, "answer": [p.answer for p in problems]})
    # micro-batches of whole groups, at most 64 completions (or one group); one generation batch of
    # questions_per_step groups per optimizer step
    q = cfg.train.questions_per_step
    per_micro = max(k for k in range(1, q + 1) if q % k == 0 and (k * g <= 64 or k == 1))
    args = GRPOConfig(
        output_dir=str(out),
        seed=seed,
        data_seed=seed,
        max_steps=cfg.train.total_steps,
        per_device_train_batch_size=per_micro * g,
        gradient_accumulation_steps=q // per_micro,
        num_generations=g,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        loss_type=lc.loss_type,
        beta=lc.beta,
        epsilon=lc.epsilon_low,
        epsilon_high=lc.epsilon_high,
        num_iterations=lc.mu,
        scale_rewards="group" if lc.advantage_scale == "group" else lc.advantage_scale,
        max_grad_norm=o.grad_clip or 0.0,
        learning_rate=o.lr,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_epsilon=o.eps,
        weight_decay=o.weight_decay,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    # our schedule, one value per optimizer step (LambdaLR multiplies the base lr by the factor)
    factor = lambda k: lr_at(  # noqa: E731
        k, peak=o.lr, total=cfg.train.total_steps * lc.mu, warmup=o.warmup_steps * lc.mu,
        schedule=o.schedule, min_ratio=o.min_lr_ratio,
    ) / o.lr  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=verifier,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return trainer.model.eval(), tokenizer, rewards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="trl_anchor", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/trl_anchor")
    args, overrides = p.parse_known_args(argv)
    out = Path(args.out)
    rows, t0 = {}, time.perf_counter()
    for seed in args.seeds:
        cfg = load_config(args.config, [*overrides, "--algo=grpo", f"--seed={seed}"]).resolved()
        eval_problems = load_eval_problems(cfg.data.eval_files, cfg.eval.num_problems, cfg.data)
        t = time.perf_counter()
        model, tokenizer, rewards = train_one(cfg, seed, out / f"seed{seed}")
        result = evaluate(model, tokenizer, cfg, eval_problems)
        rows[seed] = {
            **result.__dict__,
            "train_reward_first5": rewards[:5],
            "train_reward_last5": rewards[-5:],
        }
        print(f"TRL GRPO seed {seed}: {result} ({time.perf_counter() - t:.0f} s)", flush=True)
    acc = [100 * r["acc_t1"] for r in rows.values()]
    cell = f"{acc[0]:.1f}" if len(acc) == 1 else f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc):.1f}"
    g = cfg.layer1.group_size
    print(
        f"\n| TRL GRPOTrainer | {len(acc)} | {cell} |  (G={g}, {cfg.train.questions_per_step} questions x "
        f"{cfg.train.total_steps} steps, lr {cfg.optim.lr}; wall {(time.perf_counter() - t0) / 60:.1f} min)"
    )
    out.mkdir(parents=True, exist_ok=True)
    summary = {"rows": rows, "acc_t1": cell, "seeds": args.seeds, "group_size": g, "config": cfg.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
