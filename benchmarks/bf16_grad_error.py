"""Gradient error of the bf16 fused loss on CPU against fp64 on the same (rounded) inputs.

``python benchmarks/bf16_grad_error.py`` (from the repository root): ``dapo`` with ``old_logp``,
(N, H, V) = (512, 128, 8192), logits scaled so ratios straddle the clip range; prints the max
|error| over the max |gradient| of the hidden states and of the lm_head weight (docs/performance.md).
"""

from __future__ import annotations

import torch

from mgrpo_fast import fused_linear_grpo_loss
from mgrpo_fast.reference import linear_logprobs_ref

N, H, V, SEQ = 512, 128, 8192, 64


def gradients(hidden, weight, targets, adv, old, dtype):
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    b = N // SEQ
    loss, _ = fused_linear_grpo_loss(
        hidden.view(b, SEQ, H), weight, targets.view(b, SEQ), adv, torch.ones(b, SEQ),
        old_logp=old.view(b, SEQ).to(dtype), loss_type="dapo", impl="torch",
    )  # fmt: skip
    loss.backward()
    return hidden.grad.double(), weight.grad.double()


def main() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(N, H).to(torch.bfloat16)
    weight = (torch.randn(V, H) / H**0.5 * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,))
    adv = torch.randn(N // SEQ)
    ref_logp = linear_logprobs_ref(hidden.double(), weight.double(), targets)[0]
    old = ref_logp + 0.2 * torch.randn(N, dtype=torch.float64)
    got = gradients(hidden, weight, targets, adv, old, torch.float32)
    ref = gradients(hidden.double(), weight.double(), targets, adv, old, torch.float64)
    for name, g, r in zip(("hidden", "weight"), got, ref):
        print(f"grad {name}: max |error| / max |gradient| = {float((g - r).abs().max() / r.abs().max()):.3e}")


if __name__ == "__main__":
    main()
