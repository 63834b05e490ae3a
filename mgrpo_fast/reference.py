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

import math

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


def sapo_gate_ref(
    ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> torch.Tensor:
    """SAPO's soft gate, replacing the clip: ``g(r) = σ(τ (r - 1)) · 4 / τ`` with ``τ = τ_pos`` where
    ``A > 0`` and ``τ_neg`` elsewhere. ``g(1) = 2/τ`` and ``g'(1) = 1``: near on-policy it acts as the
    ratio itself, and it decays smoothly (instead of a hard cut) as ``r`` leaves 1.

    Source: Soft Adaptive Policy Optimization, arXiv 2511.20347; TRL ``GRPOTrainer`` (``loss_type="sapo"``)
    and Liger ``sapo_loss_fn``. The per-token loss is ``-g(r) A``.
    """
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg).to(ratio.dtype)
    return torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau


VESPO_LOG_W_MIN = math.log(1e-8)
"""Lower clamp of VESPO's log sequence weight (and of the log sampler ratios folded into it)."""


def vespo_weights_ref(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    is_ratio: torch.Tensor | None,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's detached Gamma weight ``φ`` per sequence (``(B, 1)``, or ``(B, T)`` for per-token advantages).

    ``log w = clamp(Σ_t m_t clamp(log_ratio_t, -20, 20) + Σ_t clamp(log v_t, log 1e-8, 20), log 1e-8, 20)``,
    the log of the *product* of the token ratios of the sequence (not GSPO's mean), times the sampler
    correction ``v`` (``is_ratio``: ``(B, 1)`` one factor per sequence, ``(B, T)`` summed over every
    position, padding included, as TRL and Liger do); then ``φ = exp(λ + k log w - λ w)``, the Gamma
    density normalized so ``φ(1) = 1``, with ``(k, λ) = (k_pos, λ_pos)`` where ``A >= 0`` and
    ``(k_neg, λ_neg)`` elsewhere, ``λ >= 1e-4``; NaN/inf become 0. The per-token loss is
    ``-sg(φ) A logp`` (``φ`` only scales the policy gradient).

    Source: Variational Sequence-Level Soft Policy Optimization, arXiv 2602.10693; TRL
    ``GRPOTrainer.get_gamma_weights`` and Liger ``get_gamma_weights``.
    """
    with torch.no_grad():
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.clamp(torch.log(is_ratio), VESPO_LOG_W_MIN, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, VESPO_LOG_W_MIN, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


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
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = False,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    vllm_is_ratio: torch.Tensor | None = None,
    num_items_in_batch: float | None = None,
    reduce_padding: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO objective of every loss type and its metrics, padded layout.

    Args:
        logp: ``(B, T)`` log-probs under the current policy (carries the gradient).
        old_logp: ``(B, T)`` log-probs of the policy that sampled; ``None`` = on-policy
            (``old_logp = logp.detach()``, so the ratio is exactly 1).
        ref_logp: ``(B, T)`` reference-model log-probs; required when ``beta != 0``.
        advantages: ``(B,)`` per sequence or ``(B, T)`` per token.
        mask: ``(B, T)`` 1 for completion tokens that carry the loss, 0 otherwise.
        entropy: optional ``(B, T)`` per-token entropy: the ``entropy`` metric, and the bonus
            ``-entropy_coef · Σ m H / max(1, M)`` (differentiable) when ``entropy_coef != 0``.
        vllm_is_ratio: optional sampler correction ``v`` (truncated importance sampling: the
            trainer's over the sampler's probability, clipped by the caller), ``(B, T)`` per token or
            ``(B,)``/``(B, 1)`` per sequence, ``>= 0``, no gradient: multiplies the policy term (not
            the KL); for ``vespo`` it enters ``φ`` instead (``vespo_weights_ref``).
        num_items_in_batch: ``dapo``/``cispo``/``vespo`` only: the token count to divide by instead
            of ``M`` (TRL's and Liger's count of the whole generation batch).
        reduce_padding: Liger 0.8.5's ``luspo`` reduction (below), not TRL's; ``luspo`` only.
        other keywords: the fields of ``mgrpo_fast.ops.options.LossOptions``.

    Importance weight, with ``x_t = logp_t - old_logp_t`` (0 where ``m = 0``): ``r_t = exp(x_t)``
    (``token``) or ``r = exp(Σ_t m_t x_t / max(1, Σ_t m_t))`` per sequence (``sequence``, GSPO,
    arXiv 2507.18071). Per-token policy term ``p_t`` (``A`` the advantage):

    * ``grpo, bnpo, dr_grpo, dapo, luspo``: ``-min(r̃ A, clip(r, 1-ε_low, 1+ε_high) A)`` with
      ``r̃ = min(r, δ)`` when the dual-clip ``delta`` is set (INTELLECT-2, arXiv 2505.07291), else ``r``
      (PPO/GRPO, arXiv 2402.03300);
    * ``cispo``: ``-sg(min(r, ε_high)) A logp`` (MiniMax-M1, arXiv 2506.13585: the clipped, detached
      IS weight times the REINFORCE term; ``epsilon_high`` is the absolute cap, e.g. 5.0);
    * ``sapo``: ``-g(r) A`` with the soft gate of :func:`sapo_gate_ref` (arXiv 2511.20347);
    * ``vespo``: ``-sg(φ) A logp`` with the Gamma weight of :func:`vespo_weights_ref` (arXiv 2602.10693).

    ``p_t`` is multiplied by ``v`` (``vllm_is_ratio``) except for ``vespo``. The per-token loss is
    ``ℓ_t = p_t + β KL_t`` when ``beta != 0``, ``KL_t = KL_est(logp, ref_logp)`` (:func:`kl_ref`),
    times ``r`` (token or sequence, unclipped, differentiable) when ``use_bias_correction_kl``
    (DeepSeek-V3.2, arXiv 2512.02556). Reductions, with ``M = Σ m`` and ``M_i = Σ_t m_it``:

    * ``grpo``, ``sapo``: ``(1/B) Σ_i (Σ_t m_it ℓ_it) / max(1, M_i)``  (token mean per sequence, then mean)
    * ``bnpo``: ``Σ m ℓ / max(1, M)``
    * ``dr_grpo``: ``Σ m ℓ / (B · L)`` with ``L = max_completion_length`` (default: ``T``; Dr. GRPO,
      arXiv 2503.20783)
    * ``dapo``, ``cispo``, ``vespo``: ``Σ m ℓ / max(1, N)`` with ``N = num_items_in_batch``, default
      ``M`` (DAPO, arXiv 2503.14476: the token mean over the whole batch)
    * ``luspo``: ``(1/B) Σ_i Σ_t m_it ℓ_it`` (LUSPO, arXiv 2602.05261: GSPO's sequence loss scaled by
      the sequence's length ``M_i``; TRL 1.16's masked form). With ``reduce_padding`` (Liger 0.8.5, and
      TRL before 1.16): ``Σ_{i,t} M_i ℓ_it / (B · T)`` over every position, padding included, where the
      per-token loss is evaluated from the given values (no masking); the two agree when ``ℓ`` is one
      value per sequence (``sequence`` level, no KL, no per-token ``v``).

    minus ``entropy_coef · Σ m H / max(1, M)`` (TRL's entropy bonus: a token mean whatever the loss
    type; Skywork-OR1's adaptive variant, arXiv 2505.22312, only changes the coefficient between steps).

    Metrics (detached 0-dim tensors; token means over the mask, or plain means over sequences for
    sequence-level quantities, as TRL's ``masked_batch_mean``): ``kl`` (when ``ref_logp`` is given;
    bias-corrected when ``use_bias_correction_kl``), ``ratio``, ``clip_ratio/low_mean``
    (``r < 1-ε_low`` and ``A < 0``), ``clip_ratio/high_mean`` (``r > 1+ε_high`` and ``A > 0``; for
    cispo ``r > ε_high`` and ``A > 0``; sapo and vespo do not clip: 0), ``clip_ratio/region_mean``
    (either), ``clip_ratio/region_token_mean`` (either, always weighted by tokens: Liger's
    ``clip_ratio``), ``entropy`` (when given), ``vespo/phi_seq_mean`` (vespo: the mean of ``φ``).
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
    v = None
    if vllm_is_ratio is not None:
        v = vllm_is_ratio.to(dtype)
        v = v.unsqueeze(1) if v.dim() == 1 else v  # (B, 1) or (B, T)
    # Values outside the mask are ignored (zeroed before exp, so padding garbage cannot make NaN),
    # except in Liger's luspo reduction, which evaluates the loss at every position.
    valid = torch.ones_like(mask, dtype=torch.bool) if reduce_padding else mask != 0
    token_log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    if importance_sampling_level == "token":
        log_weight = token_log_ratio
    else:
        masked = torch.where(mask != 0, token_log_ratio, torch.zeros_like(logp))
        log_weight = ((masked * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(log_weight)

    no_flags = torch.zeros_like(ratio * adv, dtype=torch.bool)
    is_low = is_high = no_flags
    phi = None
    if loss_type == "cispo":
        policy = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
        is_high = (ratio > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        policy = -sapo_gate_ref(ratio, adv, sapo_temperature_pos, sapo_temperature_neg) * adv
    elif loss_type == "vespo":
        masked = torch.where(mask != 0, token_log_ratio, torch.zeros_like(logp))
        phi = vespo_weights_ref(
            masked,
            mask,
            adv,
            v,
            k_pos=vespo_k_pos,
            lambda_pos=vespo_lambda_pos,
            k_neg=vespo_k_neg,
            lambda_neg=vespo_lambda_neg,
        )
        policy = -phi * adv * logp
    else:
        clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        policy = -torch.min(unclipped * adv, clipped * adv)
        is_low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        is_high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    if v is not None and loss_type != "vespo":
        policy = policy * v
    per_token = policy

    kl = None
    if ref_logp is not None:
        kl = kl_ref(logp, torch.where(valid, ref_logp.to(dtype), logp.detach()), kl_estimator)
        if use_bias_correction_kl:
            kl = kl * ratio
    if beta != 0.0:
        if kl is None:
            raise ValueError("beta != 0 needs ref_logp")
        per_token = per_token + beta * kl
    per_token = per_token.expand(B, T)

    tokens = mask.sum().clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(B, 1)
    elif loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (max(B, 1) * max(length, 1))
    elif loss_type == "luspo" and reduce_padding:
        loss = (per_token * mask.sum(-1, keepdim=True)).sum() / max(B * T, 1)
    elif loss_type == "luspo":
        loss = (per_token * mask).sum() / max(B, 1)
    elif loss_type in ("dapo", "cispo", "vespo") and num_items_in_batch is not None:
        loss = (per_token * mask).sum() / max(float(num_items_in_batch), 1.0)
    else:  # bnpo, dapo, cispo, vespo
        loss = (per_token * mask).sum() / tokens
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs entropy")
        loss = loss - entropy_coef * (entropy.to(dtype) * mask).sum() / tokens

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
    if phi is not None:
        metrics["vespo/phi_seq_mean"] = seq_mean(phi) if phi.shape[-1] == 1 else token_mean(phi)
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
