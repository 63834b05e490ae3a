"""The reference math: the executable spec every kernel and fast path is tested against.

Plain PyTorch, written for clarity rather than speed: it materializes the full ``[tokens x vocab]``
logits and loops over groups. It runs in any floating dtype; tests call it in fp64. Inputs are
upcast to at least fp32, so a bf16 call is "what torch would give if the logits were kept in fp32".

Layout here is the padded one only: ``(B, T)`` token tensors with a ``(B, T)`` mask. The public API
also accepts the packed layout (``cu_seqlens``); tests convert packed inputs to padded ones to compare.

Notation used in the docstrings below, per token ``t`` of sequence ``i`` with mask ``m_it``:

* ``z = (h W^T + b) / T_temp`` the temperature-scaled logits of one row,
* ``lse = log Σ_v exp(z_v)``, ``logp = z_target - lse``, ``entropy = lse - Σ_v softmax(z)_v z_v``,
* ``r_it = exp(logp_it - old_logp_it)`` the importance ratio (token level) or
  ``r_i = exp(Σ_t m_it (logp_it - old_logp_it) / max(1, Σ_t m_it))`` (sequence level, GSPO),
* ``A_it`` the advantage (``A_i`` broadcast over tokens when given per sequence).
"""

from __future__ import annotations

import torch

# The option names are the product's (one list); the math below is written independently of it.
from mgrpo_fast.ops.options import ADVANTAGE_SCALES, IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32; fp64 stays fp64 (the reference never computes logits in bf16/fp16)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets``, entropy and log-sum-exp of the temperature-scaled logits.

    Args:
        hidden: ``(..., H)`` final hidden states.
        weight: ``(V, H)`` lm_head weight.
        targets: ``(...)`` int64 token ids in ``[0, V)``.
        bias: optional ``(V,)``.
        temperature: logits are divided by it before the softmax.

    Returns:
        ``(logp, entropy, lse)``, each ``(...)`` in fp32 (fp64 for fp64 inputs):
        ``logp = z[target] - lse``, ``entropy = lse - Σ softmax(z) z``, ``lse = logsumexp(z)``.
    """
    dtype = _compute_dtype(hidden, weight, bias)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    z = logits / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(z, dim=-1)
    entropy = lse - (probs * z).sum(-1)
    return logp, entropy, lse


def safe_divide(centered: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``centered / denominator``, and 0 where the denominator is 0 (then ``centered`` is 0 too:
    a zero std means all rewards equal their mean), so ``eps=0`` never turns 0/0 into NaN."""
    return torch.where(
        denominator > 0, centered / denominator.clamp(min=torch.finfo(centered.dtype).tiny), 0.0
    )


def group_advantages_ref(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    scale: str = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages, the GRPO baseline.

    ``A_j = (r_j - mean_g(j)) / (std + eps)`` where the mean is over the group of ``j`` and ``std``
    is the unbiased (Bessel-corrected, as ``torch.std`` and TRL) standard deviation of
    * ``scale="group"``: the group of ``j`` (a group of one has std 0, so its advantage is 0);
    * ``scale="batch"``: all rewards of the batch;
    * ``scale="none"``: no division, ``A_j = r_j - mean_g(j)`` (Dr. GRPO).

    A group whose rewards are all equal gets exactly 0 (not a rounding residue divided by
    ``eps``); where ``std + eps`` is 0 the advantage is 0 too.

    Args:
        rewards: ``(N,)`` float rewards.
        group_index: ``(N,)`` integer group id of each reward (any ids, any order).
    Returns:
        ``(N,)`` advantages in the rewards' dtype (at least fp32).
    """
    dtype = _compute_dtype(rewards)
    rewards = rewards.to(dtype)
    advantages = torch.zeros_like(rewards)
    batch_std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    for g in torch.unique(group_index):
        members = group_index == g
        r = rewards[members]
        centered = r - r.mean() if bool((r != r[0]).any()) else torch.zeros_like(r)
        if scale == "group":
            std = r.std() if r.numel() > 1 else r.new_zeros(())
            centered = safe_divide(centered, std + eps)
        elif scale == "batch":
            centered = safe_divide(centered, batch_std + eps)
        elif scale != "none":
            raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
        advantages[members] = centered
    return advantages


def kl_ref(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from a sample of π_θ, with ``x = ref_logp - logp``.

    * ``k1 = -x``  (unbiased, high variance, can be negative)
    * ``k2 = x² / 2``  (biased, low variance)
    * ``k3 = exp(x) - x - 1``  (unbiased, always >= 0; the GRPO / TRL / Liger default)
    """
    x = ref_logp - logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return torch.exp(x) - x - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def grpo_loss_ref(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO objective and its metrics, padded layout.

    Args:
        logp: ``(B, T)`` log-probs under the current policy (carries the gradient).
        old_logp: ``(B, T)`` log-probs of the policy that sampled; ``None`` = on-policy
            (``old_logp = logp.detach()``, so the ratio is exactly 1).
        ref_logp: ``(B, T)`` reference-model log-probs; required when ``beta != 0``.
        advantages: ``(B,)`` per sequence or ``(B, T)`` per token.
        mask: ``(B, T)`` 1 for completion tokens that carry the loss, 0 otherwise.
        entropy: optional ``(B, T)`` per-token entropy, only reported as a metric.

    Per-token loss ``ℓ_it`` (``r`` and ``A`` as in the module docstring):

    * ``grpo, bnpo, dr_grpo, dapo``: ``ℓ = -min(r̃ A, clip(r, 1-ε_low, 1+ε_high) A)`` where
      ``r̃ = min(r, δ)`` when the dual-clip ``delta`` is set (TRL's ``delta``), else ``r``;
    * ``cispo``: ``ℓ = -sg(min(r, ε_high)) A logp`` (clipped, detached IS weight times the
      REINFORCE term; ``epsilon_high`` is the absolute cap here, e.g. 5.0, as in TRL and Liger);

    plus ``β KL_est(logp, ref_logp)`` when ``beta != 0``. Reductions, with ``M = Σ m``:

    * ``grpo``: ``(1/B) Σ_i (Σ_t m_it ℓ_it) / max(1, Σ_t m_it)``  (token mean per sequence, then mean)
    * ``bnpo``: ``Σ m ℓ / max(1, M)``
    * ``dr_grpo``: ``Σ m ℓ / (B · L)`` with ``L = max_completion_length`` (default: ``T``)
    * ``dapo``, ``cispo``: ``Σ m ℓ / max(1, M)`` (token mean over the whole batch; the trainer
      passes the global token count when a batch is split across micro-batches or ranks)

    Metrics (detached 0-dim tensors; token means over the mask, or plain means over sequences for
    sequence-level quantities, as TRL's ``masked_batch_mean``): ``kl`` (when ``ref_logp`` is given),
    ``ratio``, ``clip_ratio/low_mean`` (``r < 1-ε_low`` and ``A < 0``), ``clip_ratio/high_mean``
    (``r > 1+ε_high`` and ``A > 0``; for cispo ``r > ε_high`` and ``A > 0``),
    ``clip_ratio/region_mean`` (either), ``clip_ratio/region_token_mean`` (either, always weighted by
    tokens: Liger's ``clip_ratio``), ``entropy`` (when given).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    dtype = _compute_dtype(logp)
    logp = logp.to(dtype)
    mask = mask.to(dtype)
    B, T = logp.shape
    old_logp = logp.detach() if old_logp is None else old_logp.to(dtype)
    adv = advantages.to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B, 1), broadcasts over tokens

    # Values outside the mask are ignored (zeroed before exp, so padding garbage cannot make NaN).
    log_ratio = torch.where(mask != 0, logp - old_logp, torch.zeros_like(logp))
    if importance_sampling_level == "token":
        log_weight = log_ratio
    else:
        log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(log_weight)

    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
        is_high = (ratio > epsilon_high) & (adv > 0)
        is_low = torch.zeros_like(is_high)
    else:
        clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
        is_low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        is_high = (ratio > 1.0 + epsilon_high) & (adv > 0)

    kl = None
    if ref_logp is not None:
        kl = kl_ref(logp, torch.where(mask != 0, ref_logp.to(dtype), logp.detach()), kl_estimator)
    if beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs ref_logp")
        per_token = per_token + beta * kl

    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(B, 1)
    elif loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (max(B, 1) * max(length, 1))
    else:  # bnpo, dapo, cispo
        loss = (per_token * mask).sum() / tokens

    def token_mean(x: torch.Tensor) -> torch.Tensor:  # values outside the mask are ignored
        return torch.where(mask != 0, x.to(dtype).expand(B, T) * mask, 0.0).sum() / tokens

    def seq_mean(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).mean() if B > 0 else x.new_zeros((), dtype=dtype)

    sequence_level = importance_sampling_level == "sequence"
    flag_mean = seq_mean if sequence_level and advantages.dim() == 1 else token_mean
    metrics = {
        "ratio": seq_mean(ratio.detach()) if sequence_level else token_mean(ratio.detach()),
        "clip_ratio/low_mean": flag_mean(is_low),
        "clip_ratio/high_mean": flag_mean(is_high),
        "clip_ratio/region_mean": flag_mean(is_low | is_high),
        "clip_ratio/region_token_mean": token_mean(is_low | is_high),  # Liger's token-weighted clip_ratio
    }
    if kl is not None:
        metrics["kl"] = token_mean(kl.detach())
    if entropy is not None:
        metrics["entropy"] = token_mean(entropy.detach())
    return loss, metrics


def truncated_is_weight_ref(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    level: str = "token",
) -> torch.Tensor:
    """Truncated importance-sampling weights of the sampler–trainer mismatch, ``(B, T)`` (0 off the mask).

    The rollout engine sampled token ``t`` with log-prob ``s_it``; the trainer's old policy gives it
    ``old_it``. Token level: ``w_it = min(exp(old_it - s_it), cap)``. Sequence level:
    ``w_i = min(exp(Σ_t m_it (old_it - s_it)), cap)`` (the likelihood ratio of the whole sequence)
    on every token of sequence ``i``. The loss of token ``t`` is ``w_it · ℓ_it`` (TIS, as TRL's and
    verl's vLLM correction and Liger's ``vllm_is_ratio``); ``w`` is a constant (no gradient).
    """
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"level: expected one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")
    dtype = _compute_dtype(old_logp, sampler_logp)
    m = mask.to(dtype)
    delta = (old_logp.to(dtype) - sampler_logp.to(dtype)) * m
    if level == "sequence":
        delta = (delta.sum(dim=-1, keepdim=True)).expand_as(delta)
    return torch.minimum(torch.exp(delta), torch.tensor(cap, dtype=dtype)) * m


def sampler_mismatch_ref(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> dict[str, float]:
    """Token means over the mask of the sampler–trainer mismatch, with ``Δ = old - s``:
    ``abs`` = mean ``|Δ|``; ``kl`` = mean ``exp(Δ) - 1 - Δ`` (k3 estimate of KL(sampler ‖ trainer) on
    the sampler's tokens); ``beyond_cap`` = fraction with ``exp(Δ) > cap``; ``is_weight`` = mean
    token-level truncated weight."""
    m = mask.to(torch.float64)
    delta = old_logp.double() - sampler_logp.double()
    n = m.sum()
    return {
        "abs": float((delta.abs() * m).sum() / n),
        "kl": float(((torch.exp(delta) - 1 - delta) * m).sum() / n),
        "beyond_cap": float(((torch.exp(delta) > cap).double() * m).sum() / n),
        "is_weight": float((torch.exp(delta).clamp(max=cap) * m).sum() / n),
    }
