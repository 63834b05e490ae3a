"""`GRPOLoss`: the drop-in for Liger's `LigerFusedLinearGRPOLoss`, against the functional API and the
reference. The comparison with Liger itself (installed in CI) is tests/integrations/test_liger_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close

from mgrpo_fast import GRPOLoss, fused_linear_grpo_loss
from mgrpo_fast.reference import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, grpo_loss_ref, linear_logprobs_ref

F64 = torch.float64
B, T, H, V = 3, 6, 8, 23


def batch(dtype=F64, bias=True):
    mask = torch.ones(B, T)
    mask[0, 4:] = 0  # completions of different lengths (padding at the end)
    mask[2, 2:] = 0
    hidden = torch.randn(B, T, H, dtype=F64).to(dtype)
    weight = (torch.randn(V, H, dtype=F64) / H**0.5).to(dtype)
    b = torch.randn(V, dtype=F64).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T))
    with torch.no_grad():
        logp, _, _ = linear_logprobs_ref(hidden, weight, ids, bias=b)
    old = (logp + 0.4 * torch.randn(B, T, dtype=F64)).to(dtype)
    ref = (logp + 0.4 * torch.randn(B, T, dtype=F64)).to(dtype)
    return dict(
        hidden=hidden,
        weight=weight,
        bias=b,
        ids=ids,
        mask=mask,
        adv=torch.tensor([1.0, -0.5, 2.0], dtype=dtype),
        old=old,
        ref=ref,
    )


def run_module(module, d, *, flat_input=False, **extra):
    hidden = d["hidden"].clone().requires_grad_(True)
    weight = d["weight"].clone().requires_grad_(True)
    bias = d["bias"].clone().requires_grad_(True) if d["bias"] is not None else None
    inp = hidden.reshape(B * T, H) if flat_input else hidden
    # Liger's positional order: _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
    # ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias
    loss, metrics = module(
        inp,
        weight,
        d["ids"],
        d["mask"],
        d["adv"],
        bias,
        extra.get("ref"),
        d["old"],
        extra.get("ref_input"),
        extra.get("ref_weight"),
        extra.get("ref_bias"),
    )
    leaves = [hidden, weight] + ([bias] if bias is not None else [])
    return loss, metrics, torch.autograd.grad(loss, leaves)


LIGER_OPTIONS = dict(
    beta=0.04,
    compiled=False,
    use_ref_model=True,
    chunk_size=2,
    epsilon_low=0.2,
    epsilon_high=0.28,
    loss_type="grpo",
    max_completion_length=8,
    importance_sampling_level="sequence",
    temperature=0.9,
    delta=2.5,
)


def test_constructor_accepts_liger_options():
    m = GRPOLoss(**LIGER_OPTIONS)
    o = m.options
    assert (o.beta, o.epsilon_low, o.epsilon_high, o.loss_type) == (0.04, 0.2, 0.28, "grpo")
    assert (o.max_completion_length, o.importance_sampling_level, o.delta) == (8, "sequence", 2.5)
    assert (m.beta, m.compiled, m.use_ref_model, m.chunk_size, m.temperature) == (0.04, False, True, 2, 0.9)
    # Liger's first nine parameters positionally, in Liger's order
    p = GRPOLoss(0.0, True, False, 4, 0.1, 0.3, "bnpo", 16, "token")
    assert (p.options.beta, p.use_ref_model, p.chunk_size, p.options.epsilon_low, p.options.epsilon_high) == (
        0.0,
        False,
        4,
        0.1,
        0.3,
    )
    assert (p.options.loss_type, p.options.max_completion_length, p.options.importance_sampling_level) == (
        "bnpo",
        16,
        "token",
    )
    d = GRPOLoss()
    assert (d.options.beta, d.options.loss_type, d.options.epsilon_low, d.options.epsilon_high) == (
        0.04,
        "dapo",
        0.2,
        0.2,
    )
    assert isinstance(d, torch.nn.Module)


def test_trl_liger_call_site():
    # TRL's GRPOTrainer (use_liger_kernel=True) builds and calls the loss exactly like this, with
    # Liger's extra options at their defaults. A drop-in must accept the call (the module docstring
    # promises TRL's `use_liger_kernel` path works by swapping the class).
    loss_fn = GRPOLoss(
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.2,
        temperature=1.0,
        use_ref_model=True,
        loss_type="dapo",
        max_completion_length=8,
        importance_sampling_level="token",
        delta=None,
        use_bias_correction_kl=False,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
    )
    d = batch()
    loss, metrics = loss_fn(
        _input=d["hidden"],
        lin_weight=d["weight"],
        selected_token_ids=d["ids"],
        attention_mask=d["mask"],
        advantages=d["adv"],
        bias=d["bias"],
        old_per_token_logps=d["old"],
        ref_per_token_logps=d["ref"],
        vllm_is_ratio=None,
    )
    assert torch.isfinite(loss) and len(metrics) == 2


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_return_structure(beta):
    d = batch()
    loss, metrics, _ = run_module(GRPOLoss(beta=beta), d, ref=d["ref"])
    assert loss.dim() == 0 and isinstance(metrics, tuple)
    assert len(metrics) == (2 if beta != 0 else 1)
    assert all(m.dim() == 0 for m in metrics)


@pytest.mark.parametrize("flat_input", [False, True], ids=["BTH", "BxT_H"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_equals_functional_api(loss_type, level, flat_input):
    d = batch()
    if level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        # Liger computes these at token level only, and so does its drop-in (the functional API,
        # like TRL, computes them at sequence level too)
        with pytest.raises(ValueError, match="importance_sampling_level: Sequence-level"):
            run_module(GRPOLoss(loss_type=loss_type, importance_sampling_level=level), d)
        return
    opts = dict(
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        temperature=0.8,
        epsilon_high=1.3 if loss_type == "cispo" else 0.28,
        max_completion_length=10,
    )
    loss, (kl, clip), grads = run_module(GRPOLoss(**opts), d, ref=d["ref"], flat_input=flat_input)
    leaves = [x.clone().requires_grad_(True) for x in (d["hidden"], d["weight"], d["bias"])]
    if loss_type == "luspo":  # Liger's luspo sums every position, padding included (the reference's)
        temperature = opts.pop("temperature")
        opts.pop("max_completion_length")
        logp, _, _ = linear_logprobs_ref(
            leaves[0], leaves[1], d["ids"], bias=leaves[2], temperature=temperature
        )
        f_loss, f_metrics = grpo_loss_ref(
            logp, d["old"], d["ref"], d["adv"], d["mask"], reduce_padding=True, **opts
        )
        padding_counts = grpo_loss_ref(logp, d["old"], d["ref"], d["adv"], d["mask"], **opts)[0]
        assert not torch.allclose(f_loss, padding_counts)  # this batch tells the two reductions apart
    else:
        f_loss, f_metrics = fused_linear_grpo_loss(
            leaves[0],
            leaves[1],
            d["ids"],
            d["adv"],
            d["mask"],
            bias=leaves[2],
            old_logp=d["old"],
            ref_logp=d["ref"],
            **opts,
        )
    f_grads = torch.autograd.grad(f_loss, leaves)
    assert_close(loss, f_loss, F64, "loss")
    assert_close(kl, f_metrics["kl"], F64, "kl")
    assert_close(clip, f_metrics["clip_ratio/region_token_mean"], F64, "clip_ratio")  # Liger: token-weighted
    for g, f in zip(grads, f_grads):
        assert_close(g, f, F64, "grad")


@pytest.mark.parametrize("with_bias", [False, True])
def test_ref_input_path_equals_precomputed_ref_logps(with_bias):
    d = batch()
    d["ids"] = d["ids"].masked_fill(d["mask"] == 0, -100)  # TRL pads completions with ignore ids
    ref_weight = d["weight"] + 0.05 * torch.randn(V, H, dtype=F64)
    ref_bias = torch.randn(V, dtype=F64) if with_bias else None
    ref_input = d["hidden"] + 0.1 * torch.randn(B, T, H, dtype=F64)
    module = GRPOLoss(beta=0.04, temperature=0.7)
    with torch.no_grad():  # the reference model's log-probs, at the same temperature
        ref_logp, _, _ = linear_logprobs_ref(
            ref_input, ref_weight, d["ids"].clamp(min=0), bias=ref_bias, temperature=0.7
        )
    a_loss, (a_kl, a_clip), a_grads = run_module(
        module, d, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias
    )
    b_loss, (b_kl, b_clip), b_grads = run_module(module, d, ref=ref_logp)
    assert a_kl > 0
    assert_close(a_loss, b_loss, F64, "loss")
    assert_close(a_kl, b_kl, F64, "kl")
    for g, f in zip(a_grads, b_grads):
        assert_close(g, f, F64, "grad")
    # Both given: the precomputed log-probs win (as in Liger).
    c_loss, _, _ = run_module(
        module, d, ref=ref_logp, ref_input=torch.zeros_like(ref_input), ref_weight=ref_weight
    )
    assert_close(c_loss, b_loss, F64, "loss")


def test_backward_through_module_populates_grads():
    d = batch(dtype=torch.float32)
    hidden = d["hidden"].clone().requires_grad_(True)
    lm_head = torch.nn.Linear(H, V, bias=True)
    loss, _ = GRPOLoss(beta=0.0)(hidden, lm_head.weight, d["ids"], d["mask"], d["adv"], lm_head.bias)
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert lm_head.weight.grad is not None and lm_head.weight.grad.abs().sum() > 0
    assert lm_head.bias.grad is not None and lm_head.weight.grad.dtype == torch.float32
    assert torch.count_nonzero(hidden.grad[d["mask"] == 0]) == 0


def test_sequence_level_clip_ratio_like_liger():
    # GSPO: Liger (and GRPOLoss's docstring: "the fraction of masked tokens clipped") weight each
    # sequence's clip flag by its number of completion tokens. Lengths here are 4, 6 and 2 tokens;
    # only sequence 1 (A = -0.5, 6 tokens) is clipped low: Liger's clip_ratio = 6 / 12 = 0.5, while
    # a plain mean over sequences would give 1 / 3.
    d = batch()
    lengths = d["mask"].sum(-1)
    assert lengths.tolist() == [4.0, 6.0, 2.0]
    shift = torch.tensor([[0.0], [0.6], [0.0]], dtype=F64)  # sequence 1's ratio -> exp(-0.6) = 0.55 < 0.8
    with torch.no_grad():
        logp, _, _ = linear_logprobs_ref(d["hidden"], d["weight"], d["ids"], bias=d["bias"])
    d["old"] = logp + shift
    _, (clip,), _ = run_module(GRPOLoss(beta=0.0, importance_sampling_level="sequence"), d)
    assert clip.item() == pytest.approx(0.5), (
        f"clip_ratio {clip.item():.4f}: a mean over sequences, not tokens"
    )


def test_module_temperature_and_kl_estimator_reach_the_loss():
    d = batch()
    base, (kl3, _), _ = run_module(GRPOLoss(beta=0.04), d, ref=d["ref"])
    hot, _, _ = run_module(GRPOLoss(beta=0.04, temperature=2.0), d, ref=d["ref"])
    _, (kl2, _), _ = run_module(GRPOLoss(beta=0.04, kl_estimator="k2"), d, ref=d["ref"])
    assert not torch.allclose(base, hot, **TOL[F64])
    assert not torch.allclose(kl3, kl2, **TOL[F64])
