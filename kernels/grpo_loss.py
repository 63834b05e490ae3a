"""Per-token GRPO terms (token-level importance sampling) as one elementwise Triton kernel.

The executable spec is ``mgrpo_fast.reference.grpo_loss_ref``; this file computes, for every flat token
row ``t`` (``N`` rows, mask ``m_t``, caller-chosen reduction weight ``w_t``), in fp32:

* ``x_t = logp_t - old_t`` where ``m_t != 0``, else 0 (``old = None``: 0 exactly, on-policy), and the
  ratio ``r_t = exp(x_t)``. Zeroing before ``exp`` means padding garbage (``inf`` included) in
  ``logp``/``old_logp``/``ref_logp`` can never produce a NaN: masked rows give exactly 0 loss and grad.
* the policy term ``p_t`` (``SURROGATE``):

  - 0, clip (``grpo, bnpo, dr_grpo, dapo, luspo``): ``p = -min(r̃ A, clip(r, 1-ε_low, 1+ε_high) A)``
    with ``r̃ = min(r, δ)`` (``δ = +inf`` when the dual clip is off);
  - 1, ``cispo``: ``p = -sg(min(r, ε_high)) A logp`` (ε_high is the absolute cap of the IS weight);
  - 2, ``sapo``: ``p = -A g(r)``, ``g = σ(τ (r - 1)) 4 / τ`` with ``τ = τ_pos`` if ``A > 0`` else ``τ_neg``;
  - 3, REINFORCE: ``p = -A logp`` (``vespo``, whose detached weight ``φ`` comes in ``pw``);

  times the per-row policy weight ``pw_t`` when given (``HAS_PW``: the sampler correction
  ``vllm_is_ratio``, or VESPO's ``φ`` with the sampler correction folded in by the caller), plus
  ``β KL_est`` when ``beta != 0``, with ``y = ref_logp - logp`` (0 where masked): ``k1 = -y``,
  ``k2 = y²/2``, ``k3 = e^y - y - 1``, times ``r`` when ``bias_correct`` (DeepSeek-V3.2's
  importance-weighted KL, differentiated through ``r``).
* ``loss_terms_t = w_t m_t ℓ_t`` (so the loss is ``loss_terms.sum()``, a deterministic torch sum) and
  ``dlogp_t = w_t m_t dℓ_t/dlogp_t``.

The gradient is exactly what torch autograd gives for the reference expression. With
``a = r̃ A``, ``b = clip(r) A``: ``dp/dlogp = -A r (s_a [r <= δ] + s_b [lo <= r <= hi])`` where
``(s_a, s_b) = (1, 0)`` if ``a < b``, ``(0, 1)`` if ``b < a`` and ``(½, ½)`` on a tie
(``torch.minimum`` splits ties equally; ``torch.clamp`` passes the gradient on its closed interval).
Inside the clip range both branches equal ``rA``, so the total is ``-A r``; where the active branch
is clamped (by the clip or by ``δ``) it is 0. ``dr/dlogp = r`` also when ``old = None``
(``r = exp(logp - sg(logp))``). cispo: ``dp/dlogp = -min(r, ε_high) A``; sapo: ``-4 A σ (1 - σ) r``;
REINFORCE: ``-A``. KL derivatives w.r.t. ``logp``: ``k1: +1``, ``k2: -y``, ``k3: 1 - e^y``; with the
correction ``d(r k)/dlogp = r (k + dk/dlogp)``.

Numerics: everything is fp32. ``exp`` is libdevice's correctly range-reduced ``expf`` on the GPU (the
default ``tl.exp`` is ``ex2.approx`` after a rounded multiply by log2(e)). ``k3`` and its derivative
cancel catastrophically near ``y = 0`` (``e^y - y - 1 ≈ y²/2``), so for ``|y| < 1`` they use the
Taylor series of ``e^y - 1 - y`` (terms to ``y^11/11!``, below fp32 rounding) instead.

The reduction weight ``token_weight`` is computed by the caller, per ``loss_type`` (``M = Σ m`` over the
whole batch, ``M_s = Σ m`` over the token's sequence, ``S`` sequences, ``L`` the dr_grpo length):

* ``dapo``, ``bnpo``, ``cispo``, ``vespo``: ``1 / max(1, M)``
* ``grpo``, ``sapo``: ``1 / (S · max(1, M_s))``
* ``dr_grpo``: ``1 / (S · L)`` (``L = max_completion_length``, default the longest sequence)
* ``luspo``: ``1 / S``

The sequence-level (GSPO) importance sampling stays on the torch path. Flags that only select
arithmetic (the KL estimator, the KL correction, the dual clip) are runtime scalars, so the
constexpr specializations (``aot_specs``) stay few.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import AotSpec, check_kernel_device, interpreting

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3")
# min/max that return NaN when an operand is NaN (the default lets the GPU return the other operand:
# a NaN ratio would be clipped into a finite loss while its gradient is NaN).
NAN_IN_NAN_OUT = tl.constexpr(tl.PropagateNan.ALL)
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
# The policy term of each loss type (the SURROGATE constexpr).
SURROGATE_CLIP, SURROGATE_CISPO, SURROGATE_SAPO, SURROGATE_REINFORCE = 0, 1, 2, 3
_SURROGATES = {"cispo": SURROGATE_CISPO, "sapo": SURROGATE_SAPO, "vespo": SURROGATE_REINFORCE}

# (max N, BLOCK, num_warps): the first row whose max N >= N (None: any) is used. One row: 8 fp32
# per thread (two 128-bit accesses per tensor); the kernel is memory-bound and, for small N, bound by
# the launch itself, so more rows would only multiply the AOT specs (each row x 28 flag sets).
_BLOCK_TABLE = ((None, 1024, 4),)

# libdevice is not available under the Triton interpreter, which runs the numpy ``exp`` instead.
_USE_LIBDEVICE = tl.constexpr(not interpreting())


@triton.jit
def _exp(x):
    if _USE_LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _exp_minus_one_minus_x(x):
    """``(e^x - 1 - x, e^x - 1)`` without cancellation near 0 (the k3 KL and its derivative)."""
    small = tl.abs(x) < 1.0
    xs = tl.where(small, x, 0.0)
    # Σ_{k>=0} x^k / (k+2)!, Horner; |x| < 1: the first omitted term is < 2/12! relative.
    p = 1.0 / 39916800.0
    p = p * xs + 1.0 / 3628800.0
    p = p * xs + 1.0 / 362880.0
    p = p * xs + 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    series = xs * xs * p
    em1 = _exp(tl.where(small, 0.0, x)) - 1.0
    k3 = tl.where(small, series, em1 - x)
    expm1 = tl.where(small, xs + series, em1)
    return k3, expm1


@triton.jit
def _grpo_token_terms_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    weight_ptr,
    pw_ptr,
    loss_ptr,
    dlogp_ptr,
    ratio_ptr,
    low_ptr,
    high_ptr,
    kl_ptr,
    n_tokens,
    clip_lo,  # 1 - epsilon_low (clip) ; unused by the others
    clip_hi,  # 1 + epsilon_high (clip) ; epsilon_high, the IS-weight cap (cispo)
    delta,  # the dual-clip bound, +inf when off (clip)
    beta,
    tau_pos,  # sapo's temperatures
    tau_neg,
    kl_estimator,  # 1, 2, 3 = k1, k2, k3
    bias_correct,  # 1: the KL term is multiplied by the ratio
    n_grad,  # rows of dlogp to write: n_tokens, or 0 when the gradient is not wanted
    SURROGATE: tl.constexpr,  # 0 clip, 1 cispo, 2 sapo, 3 REINFORCE (vespo)
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_PW: tl.constexpr,  # a per-row weight of the policy term
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_tokens
    m = tl.load(mask_ptr + offs, mask=inside, other=0.0)
    active = m != 0.0
    # Masked rows: every input is replaced by 0 before any arithmetic (garbage may be inf/NaN).
    lp = tl.where(active, tl.load(logp_ptr + offs, mask=inside, other=0.0), 0.0)
    adv = tl.where(active, tl.load(adv_ptr + offs, mask=inside, other=0.0), 0.0)
    w = tl.where(active, tl.load(weight_ptr + offs, mask=inside, other=0.0), 0.0)
    if HAS_OLD:
        old = tl.where(active, tl.load(old_ptr + offs, mask=inside, other=0.0), 0.0)
        ratio = _exp(lp - old)
    else:
        # On-policy: exp(logp - stop_grad(logp)) = 1, or NaN where logp is not finite (NaN hidden
        # states), so the loss turns NaN with its gradient instead of staying finite.
        ratio = _exp(lp - lp)

    no_flag = tl.zeros((BLOCK,), tl.int1)
    is_low = no_flag
    is_high = no_flag
    if SURROGATE == 1:  # cispo
        is_weight = tl.minimum(ratio, clip_hi, propagate_nan=NAN_IN_NAN_OUT)
        per_token = -is_weight * adv * lp
        d_per_token = -is_weight * adv
        is_high = (ratio > clip_hi) & (adv > 0.0)
    elif SURROGATE == 2:  # sapo
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        # σ(x) and 1 - σ(x) = σ(-x) from e^{-|x|} <= 1: neither overflows nor cancels.
        x = tau * (ratio - 1.0)
        e = _exp(-tl.abs(x))
        big = 1.0 / (1.0 + e)
        small = e * big
        sig = tl.where(x >= 0.0, big, small)
        sig_neg = tl.where(x >= 0.0, small, big)
        per_token = -adv * sig * (4.0 / tau)
        d_per_token = -4.0 * adv * sig * sig_neg * ratio  # d/dr (σ 4/τ) = 4 σ (1 - σ); dr/dlogp = r
    elif SURROGATE == 3:  # REINFORCE; vespo's weight comes in pw
        per_token = -adv * lp
        d_per_token = -adv
    else:  # clip
        clipped = tl.minimum(tl.maximum(ratio, clip_lo, NAN_IN_NAN_OUT), clip_hi, NAN_IN_NAN_OUT)
        clip_passes = (ratio >= clip_lo) & (ratio <= clip_hi)
        unclipped = tl.minimum(ratio, delta, NAN_IN_NAN_OUT)
        unclip_passes = ratio <= delta
        a = unclipped * adv
        b = clipped * adv
        per_token = -tl.minimum(a, b, NAN_IN_NAN_OUT)
        # torch.minimum's gradient: all to the smaller input, split equally on a tie.
        share_a = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
        share_b = 1.0 - share_a
        gate = share_a * unclip_passes.to(tl.float32) + share_b * clip_passes.to(tl.float32)
        d_per_token = -adv * gate * ratio  # dr/dlogp = r
        is_low = (ratio < clip_lo) & (adv < 0.0)
        is_high = (ratio > clip_hi) & (adv > 0.0)
    if HAS_PW:
        pw = tl.where(active, tl.load(pw_ptr + offs, mask=inside, other=0.0), 0.0)
        per_token = per_token * pw
        d_per_token = d_per_token * pw

    if HAS_REF:
        ref = tl.where(active, tl.load(ref_ptr + offs, mask=inside, other=0.0), 0.0)
        y = ref - lp
        k3, expm1 = _exp_minus_one_minus_x(y)
        kl = tl.where(kl_estimator == 1, -y, tl.where(kl_estimator == 2, 0.5 * y * y, k3))
        d_kl = tl.where(kl_estimator == 1, 1.0, tl.where(kl_estimator == 2, -y, -expm1))
        # The importance-weighted KL r·k: d(r k)/dlogp = r (k + dk/dlogp).
        corrected = bias_correct != 0
        d_kl = tl.where(corrected, ratio * (kl + d_kl), d_kl)
        kl = tl.where(corrected, ratio * kl, kl)
        tl.store(kl_ptr + offs, kl, mask=inside)
        # beta == 0 selects (not multiplies), so an overflowing KL cannot leak 0 * inf = NaN in.
        add_kl = beta != 0.0
        per_token = tl.where(add_kl, per_token + beta * kl, per_token)
        d_per_token = tl.where(add_kl, d_per_token + beta * d_kl, d_per_token)

    wm = w * m
    tl.store(loss_ptr + offs, tl.where(active, per_token * wm, 0.0), mask=inside)
    tl.store(dlogp_ptr + offs, tl.where(active, d_per_token * wm, 0.0), mask=offs < n_grad)
    tl.store(ratio_ptr + offs, ratio, mask=inside)
    tl.store(low_ptr + offs, (is_low & active).to(tl.int8), mask=inside)
    tl.store(high_ptr + offs, (is_high & active).to(tl.int8), mask=inside)


def _block_config(n: int) -> tuple[int, int]:
    for max_n, block, warps in _BLOCK_TABLE:
        if max_n is None or n <= max_n:
            return block, warps
    raise AssertionError("unreachable")


def _check_options(loss_type: str, kl_estimator: str, beta: float, has_ref: bool, has_pw: bool) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if beta != 0.0 and not has_ref:
        raise ValueError(f"ref_logp: required when beta != 0 (beta={beta}); pass reference log-probs")
    if loss_type == "vespo" and not has_pw:
        raise ValueError("policy_weight: required for loss_type='vespo' (its detached weight φ per row)")
    # Only the clip surrogate has an unclipped branch: delta is ignored elsewhere, as in the reference.


def _check_token(name: str, t: torch.Tensor | None, n: int, device: torch.device, float32: bool) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name}: expected shape (N,) = ({n},) like logp, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like logp, got {t.device}")
    if float32 and t.dtype != torch.float32:
        raise ValueError(f"{name}: the Triton GRPO kernel computes in fp32 and expects fp32, got {t.dtype}")


def grpo_token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_weight: torch.Tensor,
    policy_weight: torch.Tensor | None = None,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    kl_estimator: str,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
    compute_grad: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Per-token GRPO loss terms, their gradient w.r.t. ``logp`` and the per-token metrics.

    Args:
        logp: ``(N,)`` fp32 current-policy log-probs (values only; no autograd here).
        old_logp: ``(N,)`` fp32 sampling-policy log-probs, or ``None`` (on-policy: ratio exactly 1).
        ref_logp: ``(N,)`` fp32 reference log-probs, or ``None``; required when ``beta != 0``.
        advantages: ``(N,)`` fp32, already broadcast per token.
        mask: ``(N,)`` float (any float/bool dtype; read as fp32); rows with ``mask == 0`` are ignored.
        token_weight: ``(N,)`` float reduction weight per row (see the module docstring).
        policy_weight: optional ``(N,)`` fp32 factor of the policy term (not of the KL): the sampler
            correction, or for ``vespo`` (required) its weight ``φ``.
        loss_type, epsilon_low, epsilon_high, delta, beta, kl_estimator, sapo_temperature_pos,
        sapo_temperature_neg, use_bias_correction_kl: as in ``grpo_loss_ref``.
        compute_grad: also return ``dlogp``.

    Returns:
        dict of ``(N,)`` tensors: ``loss_terms`` fp32 (``w m ℓ``; loss = ``loss_terms.sum()``),
        ``dlogp`` fp32 (``d Σ w m ℓ / d logp``; ``None`` unless ``compute_grad``), ``ratio`` fp32
        (1 on masked rows), ``clip_low`` / ``clip_high`` bool (False on masked rows), ``kl`` fp32
        (0 on masked rows; ``None`` when ``ref_logp`` is None).
    """
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp: expected a torch.Tensor, got {type(logp).__name__}")
    if logp.dim() != 1:
        raise ValueError(f"logp: expected a 1-D tensor (N,), got shape {tuple(logp.shape)}")
    if logp.dtype != torch.float32:
        raise ValueError(f"logp: the Triton GRPO kernel computes in fp32 and expects fp32, got {logp.dtype}")
    check_kernel_device("grpo_token_terms", logp)
    _check_options(loss_type, kl_estimator, float(beta), ref_logp is not None, policy_weight is not None)
    n, device = logp.shape[0], logp.device
    for name, t in (
        ("old_logp", old_logp),
        ("ref_logp", ref_logp),
        ("advantages", advantages),
        ("policy_weight", policy_weight),
    ):
        _check_token(name, t, n, device, float32=True)
    for name, t in (("mask", mask), ("token_weight", token_weight)):
        _check_token(name, t, n, device, float32=False)
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise ValueError(f"mask: expected a float or bool tensor, got {mask.dtype}")
    if not token_weight.is_floating_point():
        raise ValueError(f"token_weight: expected a float tensor, got {token_weight.dtype}")

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(torch.float32).contiguous()

    logp_c, old_c, ref_c, adv_c = f32(logp), f32(old_logp), f32(ref_logp), f32(advantages)
    mask_c, weight_c, pw_c = f32(mask), f32(token_weight), f32(policy_weight)

    loss_terms = torch.empty(n, dtype=torch.float32, device=device)
    dlogp = torch.empty(n, dtype=torch.float32, device=device) if compute_grad else None
    ratio = torch.empty(n, dtype=torch.float32, device=device)
    low = torch.empty(n, dtype=torch.int8, device=device)
    high = torch.empty(n, dtype=torch.int8, device=device)
    kl = torch.empty(n, dtype=torch.float32, device=device) if ref_c is not None else None

    surrogate = _SURROGATES.get(loss_type, SURROGATE_CLIP)
    if n > 0:
        block, num_warps = _block_config(n)
        # Unused pointers get a valid tensor of the right dtype (never dereferenced: constexpr flags).
        _grpo_token_terms_kernel[(triton.cdiv(n, block),)](
            logp_c,
            old_c if old_c is not None else logp_c,
            ref_c if ref_c is not None else logp_c,
            adv_c,
            mask_c,
            weight_c,
            pw_c if pw_c is not None else logp_c,
            loss_terms,
            dlogp if dlogp is not None else loss_terms,
            ratio,
            low,
            high,
            kl if kl is not None else loss_terms,
            n,
            # Bounds are formed in fp64 on the host and rounded once to fp32.
            1.0 - float(epsilon_low),
            float(epsilon_high) if surrogate == SURROGATE_CISPO else 1.0 + float(epsilon_high),
            float(delta) if delta is not None and surrogate == SURROGATE_CLIP else math.inf,
            float(beta),
            float(sapo_temperature_pos),
            float(sapo_temperature_neg),
            _KL_CODES[kl_estimator],
            int(bool(use_bias_correction_kl)),
            n if compute_grad else 0,
            SURROGATE=surrogate,
            HAS_OLD=old_c is not None,
            HAS_REF=ref_c is not None,
            HAS_PW=pw_c is not None,
            BLOCK=block,
            num_warps=num_warps,
        )
    return {
        "loss_terms": loss_terms,
        "dlogp": dlogp,
        "ratio": ratio,
        "clip_low": low.view(torch.bool),
        "clip_high": high.view(torch.bool),
        "kl": kl,
    }


class TritonTokenGRPOLoss(torch.autograd.Function):
    """``loss = Σ_t w_t m_t ℓ_t`` with the gradient w.r.t. ``logp`` from the kernel (saved in forward).

    ``forward(logp, old_logp, ref_logp, advantages, mask, token_weight, policy_weight, options)``
    (``options``: the keyword options of :func:`grpo_token_terms`) returns ``(loss, loss_terms, ratio,
    clip_low, clip_high, kl)``: the 0-dim fp32 loss (differentiable w.r.t. ``logp`` only) and the
    detached per-token tensors of ``grpo_token_terms`` for metrics (``kl`` is None without
    ``ref_logp``).
    """

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, advantages, mask, token_weight, policy_weight, options):
        out = grpo_token_terms(
            logp,
            old_logp,
            ref_logp,
            advantages,
            mask,
            token_weight,
            policy_weight,
            compute_grad=ctx.needs_input_grad[0],
            **options,
        )
        loss = out["loss_terms"].sum()  # a fixed-order torch reduction: deterministic
        ctx.save_for_backward(out["dlogp"])
        detached = [
            out[k] for k in ("loss_terms", "ratio", "clip_low", "clip_high", "kl") if out[k] is not None
        ]
        ctx.mark_non_differentiable(*detached)
        return loss, out["loss_terms"], out["ratio"], out["clip_low"], out["clip_high"], out["kl"]

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (dlogp,) = ctx.saved_tensors
        grad_logp = grad_loss * dlogp if dlogp is not None else None
        return (grad_logp,) + (None,) * 7


def triton_token_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_weight: torch.Tensor,
    policy_weight: torch.Tensor | None = None,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
):
    """Functional form of ``TritonTokenGRPOLoss``: ``(loss, loss_terms, ratio, clip_low, clip_high, kl)``."""
    options = dict(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        beta=beta,
        kl_estimator=kl_estimator,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        use_bias_correction_kl=use_bias_correction_kl,
    )
    return TritonTokenGRPOLoss.apply(
        logp, old_logp, ref_logp, advantages, mask, token_weight, policy_weight, options
    )


def aot_specs() -> list[AotSpec]:
    """Every (SURROGATE, HAS_OLD, HAS_REF, HAS_PW, BLOCK) specialization ``grpo_token_terms`` can
    launch, fp32 inputs (the KL estimator, its correction and the dual clip are runtime scalars)."""
    signature = {
        "logp_ptr": "*fp32",
        "old_ptr": "*fp32",
        "ref_ptr": "*fp32",
        "adv_ptr": "*fp32",
        "mask_ptr": "*fp32",
        "weight_ptr": "*fp32",
        "pw_ptr": "*fp32",
        "loss_ptr": "*fp32",
        "dlogp_ptr": "*fp32",
        "ratio_ptr": "*fp32",
        "low_ptr": "*i8",
        "high_ptr": "*i8",
        "kl_ptr": "*fp32",
        "n_tokens": "i32",
        "clip_lo": "fp32",
        "clip_hi": "fp32",
        "delta": "fp32",
        "beta": "fp32",
        "tau_pos": "fp32",
        "tau_neg": "fp32",
        "kl_estimator": "i32",
        "bias_correct": "i32",
        "n_grad": "i32",
    }
    flags = ("SURROGATE", "HAS_OLD", "HAS_REF", "HAS_PW", "BLOCK")
    signature.update({f: "constexpr" for f in flags})
    surrogates = (SURROGATE_CLIP, SURROGATE_CISPO, SURROGATE_SAPO, SURROGATE_REINFORCE)
    specs = []
    for _, block, warps in _BLOCK_TABLE:
        for surrogate, has_old, has_ref, has_pw in itertools.product(surrogates, *[(False, True)] * 3):
            if surrogate == SURROGATE_REINFORCE and not has_pw:
                continue  # vespo always brings its weight (the launcher refuses it without)
            constexprs = dict(
                SURROGATE=surrogate, HAS_OLD=has_old, HAS_REF=has_ref, HAS_PW=has_pw, BLOCK=block
            )
            name = "grpo_token_terms_" + "_".join(f"{k}={int(v)}" for k, v in constexprs.items())
            specs.append(
                AotSpec(
                    name=name,
                    kernel=_grpo_token_terms_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=warps,
                    num_stages=1,
                    tags={"dtype": "fp32"},
                )
            )
    return specs
