"""Build the bundled tiny model: a character-level tokenizer and a small Llama model trained supervised
on the arithmetic task (:mod:`mgrpo_fast.data.arithmetic`), on CPU, in minutes.

    python -m mgrpo_fast.tools.make_tiny_model --out DIR [--steps N] [--seed S] [--threads T]

Tokenizer: one token per character of printable ASCII plus ``"\\n"`` (covers the task, the default
instruction and the guiding phrases of ``mgrpo_fast.data``), special tokens ``<pad>``, ``<eos>`` and
``<unk>``; no BOS, no chat template, so prompts use ``mgrpo_fast.data``'s plain format.

Training: supervised, on a mixture that leaves RL something to learn in each layer (the defaults are
the bundled model's; :mod:`mgrpo_fast.tools.tiny_model_mixture` draws it). A share
``--correction-share`` of the examples are correction rounds (the layer-2 input with a first answer,
then either the first answer restated, ``\\boxed{19}``, with probability ``--restate-share`` (or
``--restate-share-after-direct`` after a first answer without working), or a re-derivation that quotes
the question sentence by sentence, :mod:`mgrpo_fast.data.arithmetic_corrections`); the others are first
answers: the boxed answer alone, without working, with probability ``--direct-share``, else the worked
solution. By default both choices are drawn independently of the problem, so the supervised model
learns a habit (answer without working, keep the first answer) that RL can unlearn where working and
re-checking pay off. Each first-answer example is
``build_prompt_ids(problem, instruction=...) + ids(" " + target) + [eos]`` (by default the short plain
prompt ``"Question: ...\n\nAnswer:"``, no instruction: 2.5x fewer tokens per example than with the
step-by-step instruction, which the task does not need) with the loss on the target part only
(token mean over the batch). Batches are right-padded; with causal attention a real token never sees
the padding after it, so no attention mask is needed. AdamW, linear warmup then cosine decay to 10%,
every random choice seeded: the same arguments and ``--threads`` give the same weights.

At the end the model (fp32 safetensors), tokenizer, a generation config with the EOS id, ``task.json``
(the task and prompt the trainer and ``mgrpo-eval`` use with this model: ``--eval-levels``, the task
magnitudes, the instruction, ``max_new_tokens``) and a README with the command and the measured
held-out accuracies are written to ``--out``. The defaults are the bundled model's: trained and
evaluated (and trained with RL) on levels 1-3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from mgrpo_fast.data.answers import answers_match, extract_answer
from mgrpo_fast.data.arithmetic import DEFAULT_MAX_VALUE, bundled_problems
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.data.prompts import build_prompt_ids
from mgrpo_fast.rl.evaluate import evaluate_two_pass
from mgrpo_fast.rl.rollout.base import SamplingParams
from mgrpo_fast.rl.rollout.hf import HFGenerateBackend
from mgrpo_fast.tools.tiny_model_mixture import encode_example, encode_examples

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
"""The character vocabulary: newline and printable ASCII (space..tilde)."""

RECOMMENDED_MAX_NEW_TOKENS = 64
"""Room for a level-3 solution with single-digit operands (~45 characters + EOS) and some rambling."""


def build_char_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per character of :data:`CHARACTERS` (ids after the
    :data:`SPECIAL_TOKENS`, which take ids 0, 1, 2); other characters map to ``<unk>``.

    It is a BPE model without merges and without pre-tokenizer (so every character, spaces and
    newlines included, is its own token) and a ``Fuse`` decoder (tokens concatenated, nothing inserted
    or cleaned up): ``decode(encode(text)) == text`` for any text over :data:`CHARACTERS`.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # would turn "19 ." into "19." and break round trips
        model_max_length=1024,
    )


def build_model(tokenizer: Any, args: argparse.Namespace) -> Any:
    """A randomly initialized ``LlamaForCausalLM`` (tied embeddings, fp32) sized by ``args``.

    Llama rather than Qwen2: for ``model_type == "qwen2"``, ``AutoTokenizer`` always builds a
    ``Qwen2Tokenizer`` (byte-level pre-tokenizer) over the saved vocabulary, which would silently drop
    spaces and newlines from our character tokenizer; for ``"llama"`` it loads ``tokenizer.json`` as is.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,  # the (vocab, hidden) embedding serves as lm_head too: fewer params
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).float()


def _batches(
    examples: list[tuple[list[int], int]], batch_size: int, steps: int, seed: int
) -> list[list[int]]:
    """``steps`` lists of example indices. Windows of 16 batches are sorted by length before cutting
    (less padding) and the batches shuffled, all with ``seed``; examples are used in order, cycling."""
    rng = random.Random(seed)
    order: list[list[int]] = []
    window = 16 * batch_size
    start = 0
    while len(order) < steps:
        idx = [(start + i) % len(examples) for i in range(window)]
        start += window
        idx.sort(key=lambda i: len(examples[i][0]))
        chunk = [idx[j : j + batch_size] for j in range(0, window, batch_size)]
        rng.shuffle(chunk)
        order += chunk
    return order[:steps]


def _collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids (B, T)`` right-padded and ``labels (B, T)`` (-100 off the targets), unshifted."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, (seq, n_prompt) in enumerate(examples):
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, labels


def _lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: Any, tokenizer: Any, problems: list[Problem], args: argparse.Namespace) -> None:
    """Supervised training on ``problems`` (module docstring); prints the loss every ``args.log_every``."""
    examples = encode_examples(problems, tokenizer, args)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms and biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    model.train()
    t0, seen, running = time.perf_counter(), 0, []
    for step, batch in enumerate(_batches(examples, args.batch_size, args.steps, args.seed)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args)
        ids, labels = _collate([examples[i] for i in batch], tokenizer.pad_token_id)
        logits = model(input_ids=ids, use_cache=False).logits
        # position t predicts token t + 1
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        seen += ids.numel()
        running.append(loss.detach().item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            dt = time.perf_counter() - t0
            print(
                f"step {step + 1}/{args.steps}  loss {statistics.mean(running):.4f}  "
                f"lr {_lr_at(step, args):.2e}  {seen / dt:.0f} tok/s  {dt:.0f} s",
                flush=True,
            )
            running = []


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    temperature: float = 0.0,
    max_new_tokens: int = RECOMMENDED_MAX_NEW_TOKENS,
    batch_size: int = 50,
    seed: int = 0,
    instruction: str | None = None,
) -> dict[str, Any]:
    """One completion per problem (``HFGenerateBackend``, default prompt), scored like the trainer:
    ``answers_match(extract_answer(text), problem.answer)``.

    Returns ``{"acc": Acc@t1, "acc_by_level": {level: Acc@t1}, "eos_rate": share of completions that
    ended with EOS, "mean_tokens": mean completion length in tokens}``.
    """
    # Similar lengths share a generate call (less left padding); results are mapped back by index.
    order = sorted(range(len(problems)), key=lambda i: len(problems[i].question))
    prompts = [build_prompt_ids(problems[i], tokenizer, instruction=instruction) for i in order]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size)
    backend = HFGenerateBackend(model, tokenizer)
    completions = backend.generate(prompts, num_samples=1, params=params, seed=seed)
    levels: dict[Any, list[bool]] = {}
    for i, c in zip(order, completions):
        ok = answers_match(extract_answer(c.text), problems[i].answer, use_math_verify=False)
        levels.setdefault(problems[i].meta.get("level"), []).append(ok)
    n = max(1, len(problems))
    return {
        "acc": sum(sum(v) for v in levels.values()) / n,
        "acc_by_level": {k: sum(v) / len(v) for k, v in sorted(levels.items(), key=lambda kv: str(kv[0]))},
        "eos_rate": sum(c.finish_reason == "eos" for c in completions) / n,
        "mean_tokens": sum(len(c.token_ids) for c in completions) / n,
    }


def evaluate_accuracy(model: Any, tokenizer: Any, problems: Sequence[Problem], **kwargs: Any) -> float:
    """Acc@t1 of :func:`evaluate` (same arguments)."""
    return evaluate(model, tokenizer, problems, **kwargs)["acc"]


def _readme(args: argparse.Namespace, stats: dict[str, Any]) -> str:
    cmd = "python -m mgrpo_fast.tools.make_tiny_model " + shlex.join(args.argv)
    greedy, sampled = stats["greedy"], stats["sampled"]
    row = lambda name, r: f"| {name} | {r['acc']:.1%} | {r['eos_rate']:.0%} | {r['mean_tokens']:.1f} |"
    by_level = ", ".join(f"level {k}: {v:.0%}" for k, v in greedy["acc_by_level"].items())
    tp = stats.get("two_pass")
    two_pass = (
        f"Acc@t1 {tp.acc_t1:.1%}, Acc@t2 {tp.acc_t2:.1%}, "
        f"Δi→c {tp.delta_i_to_c:.1%}, Δc→i {tp.delta_c_to_i:.1%}"
        if tp is not None
        else "not measured"
    )
    after_direct = (
        ""
        if args.restate_share_after_direct is None
        else f" ({args.restate_share_after_direct:.0%} after a first answer without working)"
    )
    return f"""# Bundled tiny model

A character-level Llama model ({stats["params"]:,} parameters, fp32 safetensors of {stats["bytes"]:,}
bytes) trained supervised on the bundled arithmetic task (`mgrpo_fast.data.arithmetic`, train split,
levels {list(args.levels)}, max_number {args.max_number}, max_value {args.max_value}), prompt
`Question: ...\\n\\nAnswer:` with instruction {args.instruction!r}. Of its examples
{args.correction_share:.0%} are correction rounds (first answer, guiding phrase, then the first answer
restated in {args.restate_share:.0%} of them{after_direct}, else a re-derivation,
`--correction-format {args.correction_format}`), the rest first answers ({args.direct_share:.0%} the
boxed answer alone, without working, else the worked solution). It exists so that MGRPO can be trained
on CPU in minutes with nothing downloaded: `mgrpo_fast.data.bundled.bundled_model_path()`.

Made with (seed {args.seed}, {args.steps} steps of {args.batch_size} examples, {args.threads} torch
thread(s), {stats["wall_s"] / 60:.1f} min wall time on the machine that built it):

    {cmd}

Held-out Acc@t1 on {stats["eval_n"]} test-split problems (`bundled_problems("test", {args.eval_n})`,
levels {list(args.eval_levels)}, the magnitudes above; what `task.json` tells the trainer and
`mgrpo-eval` to use), the same prompt, `HFGenerateBackend`,
`max_new_tokens={args.max_new_tokens}`:

| decoding | Acc@t1 | ended with EOS | mean completion tokens |
|---|---|---|---|
{row("greedy (temperature 0)", greedy)}
{row("sampled (temperature 1.0, seed 0)", sampled)}

Greedy by level: {by_level}. Two-pass (greedy, first guiding phrase, correction cap
{args.correction_max_new_tokens} tokens): {two_pass}.

Tokens are characters. Prompts average {stats["prompt_tokens"]:.0f} tokens and reference targets
(`" " + solution + EOS`) {stats["target_tokens"]:.0f} tokens (longest {stats["target_tokens_max"]}); use
`max_new_tokens={RECOMMENDED_MAX_NEW_TOKENS}` for this task.
"""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mgrpo_fast.tools.make_tiny_model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (created; files in it are overwritten)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the batch order")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (matrices only)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--hidden-size", type=int, default=128, help="model width")
    p.add_argument("--intermediate-size", type=int, default=384, help="MLP width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads (hidden-size must divide)")
    p.add_argument("--max-positions", type=int, default=1024, help="max_position_embeddings (>= 768)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="task levels trained on")
    p.add_argument(
        "--eval-levels",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="task levels of the held-out eval and of task.json (RL)",
    )
    p.add_argument(
        "--instruction", default="none", help="'none' (short plain prompt) or the instruction text"
    )
    p.add_argument("--max-number", type=int, default=9, help="task: largest question number")
    p.add_argument("--max-value", type=int, default=DEFAULT_MAX_VALUE, help="task: largest value/answer")
    p.add_argument(
        "--correction-share", type=float, default=0.5, help="share of examples that are correction rounds"
    )
    p.add_argument(
        "--keep-share", type=float, default=0.5, help="correction rounds with a right first answer"
    )
    p.add_argument(
        "--direct-share",
        type=float,
        default=0.6,
        help="first answers written as the boxed answer alone, without working",
    )
    p.add_argument(
        "--restate-share",
        type=float,
        default=0.6,
        help="correction rounds that restate the first answer instead of re-deriving it",
    )
    p.add_argument(
        "--restate-share-after-direct",
        type=float,
        default=None,
        help="after a first answer without working, the restating share instead of --restate-share",
    )
    p.add_argument(
        "--correction-format",
        choices=("sentence", "span", "plan", "worked"),
        default="sentence",
        help="re-derivation (checked_solution's style, or the compact worked solution)",
    )
    p.add_argument("--eval-n", type=int, default=200, help="test problems for the final accuracy")
    p.add_argument("--max-new-tokens", type=int, default=RECOMMENDED_MAX_NEW_TOKENS, help="for evaluation")
    p.add_argument("--correction-max-new-tokens", type=int, default=224, help="for the two-pass eval")
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    p.add_argument("--log-every", type=int, default=100, help="steps between loss lines")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv  # for the README
    args.instruction = None if args.instruction == "none" else args.instruction
    for name in ("steps", "batch_size", "warmup", "hidden_size", "intermediate_size", "layers", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    shares = ("correction_share", "keep_share", "direct_share", "restate_share", "restate_share_after_direct")
    for name in shares:
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:  # None: only the optional after-direct share
            p.error(f"--{name.replace('_', '-')} must be a share in [0, 1], got {value}")
    if args.hidden_size % args.heads:
        p.error(f"--hidden-size {args.hidden_size} is not divisible by --heads {args.heads}")
    if args.max_positions < 768:
        p.error(
            "--max-positions must be >= 768 (layer-2 prompts hold prompt + answer + phrase + continuation)"
        )
    if args.eval_n < 0:
        p.error("--eval-n must be >= 0")
    return args


def save(model: Any, tokenizer: Any, args: argparse.Namespace, eval_task: dict[str, Any]) -> None:
    """Write the model (fp32 safetensors), tokenizer, generation config and ``task.json`` to ``args.out``."""
    from transformers import GenerationConfig

    os.makedirs(args.out, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(args.out)  # safetensors, fp32
    tokenizer.save_pretrained(args.out)
    spec = {
        "task": "mgrpo_fast.data.arithmetic",
        **eval_task,
        "instruction": args.instruction,
        "max_new_tokens": RECOMMENDED_MAX_NEW_TOKENS,
    }
    with open(os.path.join(args.out, "task.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the tool (``argv`` as on the command line); returns the measured numbers."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = build_model(tokenizer, args)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters; tokenizer: {len(tokenizer)} tokens", flush=True)
    task = dict(levels=args.levels, max_number=args.max_number, max_value=args.max_value)
    problems = bundled_problems("train", args.steps * args.batch_size, seed=args.seed, **task)
    train(model, tokenizer, problems, args)

    eval_task = {**task, "levels": args.eval_levels}
    save(model, tokenizer, args, eval_task)  # before the evaluation: the weights are the long part
    test = bundled_problems("test", max(1, args.eval_n), seed=0, **eval_task)[: args.eval_n]
    stats: dict[str, Any] = {"params": params, "eval_n": len(test)}
    if test:
        kw = dict(max_new_tokens=args.max_new_tokens, instruction=args.instruction)
        stats["greedy"] = evaluate(model, tokenizer, test, temperature=0.0, **kw)
        stats["sampled"] = evaluate(model, tokenizer, test, temperature=1.0, seed=0, **kw)
        stats["two_pass"] = evaluate_two_pass(
            test,
            tokenizer,
            HFGenerateBackend(model, tokenizer),
            max_new_tokens=args.max_new_tokens,
            correction_max_new_tokens=args.correction_max_new_tokens,
            batch_size=50,
            instruction=args.instruction,
        )
        print(f"two-pass (greedy): {stats['two_pass']}", flush=True)
    else:
        stats["greedy"] = stats["sampled"] = {
            "acc": math.nan,
            "acc_by_level": {},
            "eos_rate": math.nan,
            "mean_tokens": math.nan,
        }
    sample = [encode_example(p, tokenizer, args.instruction) for p in problems[:2000]]
    stats["prompt_tokens"] = statistics.mean(n for _, n in sample)
    stats["target_tokens"] = statistics.mean(len(ids) - n for ids, n in sample)
    stats["target_tokens_max"] = max(len(ids) - n for ids, n in sample)
    stats["bytes"] = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    stats["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(args, stats))
    print(
        f"held-out Acc@t1 on {len(test)} test problems: greedy {stats['greedy']['acc']:.3f}, "
        f"sampled (T=1) {stats['sampled']['acc']:.3f}; {stats['wall_s']:.0f} s; wrote {args.out}",
        flush=True,
    )
    return stats


if __name__ == "__main__":
    main()
