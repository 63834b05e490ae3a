"""``make loss-demo``: one GRPO loss step through the public API, checked against plain PyTorch.

A small random "policy head" scores a packed batch of completions for a few questions: rewards
per completion -> ``group_advantages`` -> ``fused_linear_grpo_loss`` (chunked, never holding the
``[tokens x vocab]`` logits) versus plain PyTorch (the full fp32 logits, ``log_softmax``, then
``grpo_loss`` on those log-probs). It
prints both losses, metrics, the largest gradient difference, the wall time of each and the bytes
each saves for the backward pass (measured with ``saved_tensors_hooks``).

    python -m mgrpo_fast.cli.loss_demo [--questions 4] [--group-size 8] [--vocab 32768] [--hidden 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from mgrpo_fast import fused_linear_grpo_loss, group_advantages, grpo_loss
from mgrpo_fast.ops.layout import cu_seqlens_from_lengths


def full_logits_logprobs(hidden, weight, targets, temperature):
    """``(logp, entropy)``, each ``(N,)``, from the full fp32 ``(N, V)`` logits (what fusing avoids)."""
    logits = (hidden.float() @ weight.float().T) / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, targets[:, None]).squeeze(-1), entropy


def saved_bytes(fn):
    """Run ``fn`` and return ``(result, bytes of distinct tensors autograd saved for backward)``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def build_batch(args: argparse.Namespace, gen: torch.Generator):
    """A packed GRPO batch: ``questions x group_size`` completions of random lengths."""
    num_seqs = args.questions * args.group_size
    lengths = torch.randint(args.min_len, args.max_len + 1, (num_seqs,), generator=gen).tolist()
    n = sum(lengths)
    hidden = torch.randn(n, args.hidden, generator=gen) * 2.0
    weight = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5
    targets = torch.randint(0, args.vocab, (n,), generator=gen)
    # Pretend the sampler was a slightly different policy: old log-probs = current + noise.
    with torch.no_grad():
        logp_now = full_logits_logprobs(hidden, weight, targets, args.temperature)[0]
    old_logp = logp_now + 0.1 * torch.randn(n, generator=gen)
    rewards = (torch.rand(num_seqs, generator=gen) < 0.5).float()
    group_index = torch.arange(args.questions).repeat_interleave(args.group_size)
    return lengths, hidden, weight, targets, old_logp, rewards, group_index


def padded(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(values.split(lengths)), batch_first=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(args.seed)
    lengths, hidden, weight, targets, old_logp, rewards, group_index = build_batch(args, gen)
    n, num_seqs = hidden.shape[0], len(lengths)
    advantages = group_advantages(rewards, group_index)
    options = dict(loss_type=args.loss_type, epsilon_low=0.2, epsilon_high=0.28)
    print(
        f"batch: {args.questions} questions x {args.group_size} completions = {num_seqs} sequences, "
        f"{n} packed tokens, vocab {args.vocab}, hidden {args.hidden}, loss_type {args.loss_type}"
    )
    print(f"rewards {rewards.tolist()}")

    def fused():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = fused_linear_grpo_loss(
            h,
            w,
            targets,
            advantages,
            None,
            cu_seqlens=cu_seqlens_from_lengths(lengths),
            old_logp=old_logp,
            temperature=args.temperature,
            chunk_size=args.chunk_size,
            impl="torch",
            **options,
        )
        return loss, metrics, h, w

    def full_logits():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy = full_logits_logprobs(h, w, targets, args.temperature)
        loss, metrics = grpo_loss(
            padded(logp, lengths),
            padded(old_logp, lengths),
            None,
            advantages,
            padded(torch.ones(n), lengths),
            entropy=padded(entropy.detach(), lengths),
            impl="torch",
            **options,
        )
        return loss, metrics, h, w

    rows = []
    for name, fn in (("fused (chunked torch)", fused), ("plain torch (full logits)", full_logits)):
        start = time.perf_counter()
        (loss, metrics, h, w), saved = saved_bytes(fn)
        loss.backward()
        rows.append((name, loss, metrics, h.grad, w.grad, time.perf_counter() - start, saved))

    keys = list(rows[1][2])
    print(f"\n{'':30}" + "".join(f"{name:>26}" for name, *_ in rows))
    table = [("loss", [f"{float(r[1].detach()):.8f}" for r in rows])]
    table += [(k, [f"{float(r[2][k]):.6f}" for r in rows]) for k in keys]
    table += [("fwd+bwd seconds", [f"{r[5]:.3f}" for r in rows])]
    table += [("saved for backward MiB", [f"{r[6] / 2**20:.1f}" for r in rows])]
    for label, cells in table:
        print(f"{label:30}" + "".join(f"{c:>26}" for c in cells))
    (_, l1, _, gh1, gw1, *_), (_, l2, _, gh2, gw2, *_) = rows
    print(
        f"\n|loss diff| = {abs(float((l1 - l2).detach())):.2e}"
        f"   max|dL/dhidden diff| = {float((gh1 - gh2).abs().max()):.2e}"
        f"   max|dL/dweight diff| = {float((gw1 - gw2).abs().max()):.2e}"
    )
    print(
        f"full logits would be {n} x {args.vocab} fp32 = {n * args.vocab * 4 / 2**20:.1f} MiB; "
        f"the fused path holds {min(args.chunk_size, n)} x {args.vocab} at a time"
    )


if __name__ == "__main__":
    main()
