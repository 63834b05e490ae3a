"""``mgrpo_fast.GRPOLoss`` against Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (0.8.5, installed by the
``dev`` extra), through Liger's public API only, on CPU.

Every loss type at both importance-sampling levels, and each of Liger's options on top: the same
constructor call and forward call on both classes must give the same loss, metrics and gradients
(fp32: within 1e-5), accept and refuse the same configurations, and in bf16 stay within twice
Liger's own error against the fp64 reference (``mgrpo_fast.reference``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

liger = pytest.importorskip(
    "liger_kernel.chunked_loss", reason="liger-kernel is not installed (pip install -e '.[dev]')"
)

from mgrpo_fast import GRPOLoss  # noqa: E402
from mgrpo_fast.reference import LOSS_TYPES, grpo_loss_ref, linear_logprobs_ref  # noqa: E402

LigerFusedLinearGRPOLoss = liger.LigerFusedLinearGRPOLoss
B, T, H, V = 3, 7, 16, 37
F64 = torch.float64
TOKEN_ONLY = ("cispo", "sapo", "vespo")  # Liger refuses them at sequence level


def make_inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A batch with ragged and interior padding, ratios on both sides of the clip range, both
    advantage signs, a nearby reference model and sampler corrections of every shape."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) / H**0.5
    bias = 0.1 * torch.randn(V, generator=g, dtype=F64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[1, 2] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        logp, _, _ = linear_logprobs_ref(hidden, weight, ids, bias)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    token_ratio = 0.3 + torch.rand(B, T, generator=g, dtype=F64)
    d = dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        ids=ids,
        mask=mask,
        adv=torch.tensor([0.9, -1.3, 0.6], dtype=F64),
        old=old.float(),
        ref=ref.float(),
        ref_input=hidden + 0.05 * torch.randn(B, T, H, generator=g, dtype=F64),
        ref_weight=weight + 0.02 * torch.randn(V, H, generator=g, dtype=F64),
        ref_bias=bias + 0.02 * torch.randn(V, generator=g, dtype=F64),
        is_token=token_ratio.float(),
        is_seq=token_ratio[:, 0].float(),
        is_seq1=token_ratio[:, :1].float(),
    )
    for key in ("hidden", "weight", "bias", "adv", "ref_input", "ref_weight", "ref_bias"):
        d[key] = d[key].to(dtype)
    return d


def run(cls, ctor: dict, call: dict, d: dict):
    """One forward + backward of ``cls(**ctor)`` on ``d`` with Liger's positional forward; ``call``
    picks the optional inputs. Returns ``(loss, metrics, grads of hidden/weight/bias)``."""
    module = cls(**ctor)
    hidden = d["hidden"].clone().requires_grad_(True)
    weight = d["weight"].clone().requires_grad_(not call.get("frozen", False))
    bias = d["bias"].clone().requires_grad_(True) if call.get("bias", True) else None
    ref_logps = d["ref"] if call.get("ref", "logps") in ("logps", "both") else None
    ref_input = d["ref_input"] if call.get("ref", "logps") in ("input", "both") else None
    loss, metrics = module(
        hidden,
        weight,
        d["ids"],
        d["mask"],
        d["adv"],
        bias,
        ref_logps,
        d["old"] if call.get("old", True) else None,
        ref_input,
        d["ref_weight"],
        d["ref_bias"] if bias is not None else None,
        vllm_is_ratio=d[f"is_{call['is']}"] if call.get("is") else None,
        num_items_in_batch=call.get("num_items"),
    )
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), tuple(m.detach() for m in metrics), grads


def ctor_for(loss_type: str, level: str, **over) -> dict:
    ctor = dict(
        beta=0.04,
        compiled=False,  # the same math; torch.compile on CPU only costs time
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=0.2,
        epsilon_high=1.2 if loss_type == "cispo" else 0.28,
        temperature=0.9,
        max_completion_length=9 if loss_type == "dr_grpo" else None,
    )
    ctor.update(over)
    return ctor


def assert_parity(ctor: dict, call: dict, dtype=torch.float32, tol: float = 1e-5) -> None:
    d = make_inputs(dtype)
    with warnings.catch_warnings(record=True) as ours_warned:
        warnings.simplefilter("always")
        ours = run(GRPOLoss, ctor, call, d)
    with warnings.catch_warnings(record=True) as liger_warned:
        warnings.simplefilter("always")
        theirs = run(LigerFusedLinearGRPOLoss, ctor, call, d)
    # Liger warns when given both reference sources; so must the drop-in.
    both = [w for w in liger_warned if "ref_per_token_logps" in str(w.message)]
    assert bool(both) == any("ref_per_token_logps" in str(w.message) for w in ours_warned)
    (loss, metrics, grads), (l_loss, l_metrics, l_grads) = ours, theirs
    torch.testing.assert_close(loss, l_loss, rtol=tol, atol=tol, msg="loss")
    assert len(metrics) == len(l_metrics)
    for i, (m, lm) in enumerate(zip(metrics, l_metrics)):
        torch.testing.assert_close(m.float(), lm.float(), rtol=tol, atol=tol, msg=f"metric {i}")
    assert len(grads) == len(l_grads)
    for name, g, lg in zip(("hidden", "weight", "bias"), grads, l_grads):
        torch.testing.assert_close(g, lg, rtol=tol, atol=tol, msg=f"grad {name}")


# --------------------------------------------------------------------------------------------
# every loss type x importance-sampling level x KL on/off
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_match_liger(loss_type, level, beta):
    ctor = ctor_for(loss_type, level, beta=beta)
    if level == "sequence" and loss_type in TOKEN_ONLY:
        # refused by both, with Liger's words, at the forward (the constructor accepts it)
        for cls in (GRPOLoss, LigerFusedLinearGRPOLoss):
            with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
                run(cls, ctor, {}, make_inputs())
        return
    assert_parity(ctor, {})


# --------------------------------------------------------------------------------------------
# each option on top of every loss type (token level; sequence level where Liger offers it)
# --------------------------------------------------------------------------------------------
# (constructor overrides, forward inputs, the loss types the option acts on)
OPTION_CASES = {
    "no-ref-model": (dict(use_ref_model=False), dict(ref=None), LOSS_TYPES),
    "no-ref-model-ignores-ref": (dict(use_ref_model=False), dict(ref="logps"), ("dapo", "luspo")),
    "ref-from-input": ({}, dict(ref="input"), LOSS_TYPES),
    "ref-both-warns": ({}, dict(ref="both"), ("grpo", "luspo")),
    "on-policy": ({}, dict(old=False), LOSS_TYPES),
    "delta": (dict(delta=1.5), {}, ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")),
    "delta-below-1": (dict(delta=0.9), {}, ("dapo", "luspo")),
    "corrected-kl": (dict(use_bias_correction_kl=True), {}, LOSS_TYPES),
    "is-token": ({}, {"is": "token"}, LOSS_TYPES),
    "is-seq": ({}, {"is": "seq"}, LOSS_TYPES),
    "is-seq1": ({}, {"is": "seq1"}, ("grpo", "luspo", "vespo")),
    "num-items": ({}, dict(num_items=31.0), LOSS_TYPES),
    "num-items-tensor": ({}, dict(num_items=torch.tensor(9.0)), ("dapo", "cispo", "vespo")),
    "chunk-size-2": (dict(chunk_size=2), {}, ("grpo", "dapo", "luspo", "vespo")),
    "temperature-true": (dict(temperature=True), {}, ("dapo", "cispo")),
    "epsilons": (dict(epsilon_low=0.1, epsilon_high=0.35), {}, ("grpo", "dapo", "luspo")),
    "sapo-temperatures": (dict(sapo_temperature_pos=0.6, sapo_temperature_neg=2.0), {}, ("sapo",)),
    "vespo-gamma": (
        dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0, vespo_lambda_neg=1.0),
        {},
        ("vespo",),
    ),
    "no-bias": ({}, dict(bias=False), ("grpo", "luspo", "vespo")),
    "frozen-head": ({}, dict(frozen=True), ("dapo", "luspo")),
}


@pytest.mark.parametrize(
    ("loss_type", "case"),
    [(t, c) for c, (_, _, types) in sorted(OPTION_CASES.items()) for t in types],
)
def test_options_match_liger(loss_type, case):
    ctor_over, call, _ = OPTION_CASES[case]
    assert_parity(ctor_for(loss_type, "token", **ctor_over), call)


SEQUENCE_CASES = (
    "no-ref-model",
    "ref-from-input",
    "corrected-kl",
    "is-token",
    "is-seq",
    "num-items",
    "delta",
)


@pytest.mark.parametrize("case", SEQUENCE_CASES)
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in TOKEN_ONLY])
def test_sequence_level_options_match_liger(loss_type, case):
    ctor_over, call, _ = OPTION_CASES[case]
    assert_parity(ctor_for(loss_type, "sequence", **ctor_over), call)


def test_constructor_matches_liger_signature():
    """Same parameter names, defaults and positional order (ours adds keyword-only extensions)."""
    import inspect

    liger_params = list(inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters.values())
    ours = list(inspect.signature(GRPOLoss.__init__).parameters.values())
    positional = [p for p in ours if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in liger_params]
    liger_forward = list(inspect.signature(LigerFusedLinearGRPOLoss.forward).parameters)
    assert list(inspect.signature(GRPOLoss.forward).parameters) == liger_forward
    positional_call = (0.0, False, False, 2, 0.1, 0.3, "bnpo", 16, "token", 0.8, 1.2, 0.7, 1.5, True)
    for cls in (GRPOLoss, LigerFusedLinearGRPOLoss):
        m = cls(*positional_call)
        assert (m.sapo_temperature_neg, m.temperature, m.delta, m.use_bias_correction_kl) == (
            1.2,
            0.7,
            1.5,
            True,
        )


@pytest.mark.parametrize(
    "ctor",
    [dict(sapo_temperature_pos=0.0), dict(sapo_temperature_neg=-1.0), dict(delta=0.0), dict(delta=-2.0)],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_constructor_refusals_match_liger(ctor):
    name = next(iter(ctor))
    with pytest.raises(ValueError, match=name):
        LigerFusedLinearGRPOLoss(**ctor)
    with pytest.raises(ValueError, match=name):
        GRPOLoss(**ctor)


def test_dr_grpo_without_max_completion_length():
    """Liger's chunked class refuses it (an assertion); the drop-in falls back to ``T`` as Liger's
    Triton path does, which is the reference's default."""
    ctor = ctor_for("dr_grpo", "token", max_completion_length=None)
    with pytest.raises(AssertionError, match="max_completion_length"):
        run(LigerFusedLinearGRPOLoss, ctor, {}, make_inputs())
    at_t = run(GRPOLoss, ctor, {}, make_inputs())
    explicit = run(GRPOLoss, dict(ctor, max_completion_length=T), {}, make_inputs())
    torch.testing.assert_close(at_t[0], explicit[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# bf16: within twice Liger's own error against the fp64 reference
# --------------------------------------------------------------------------------------------
def reference_fp64(ctor: dict, d: dict):
    """The fp64 loss and gradients of Liger's definition (``reduce_padding`` for luspo)."""
    hidden, weight, bias = (d[k].detach().to(F64).requires_grad_(True) for k in ("hidden", "weight", "bias"))
    logp, _, _ = linear_logprobs_ref(hidden, weight, d["ids"], bias, temperature=ctor["temperature"])
    fields = {
        k: v for k, v in ctor.items() if k not in ("compiled", "temperature", "use_ref_model", "chunk_size")
    }
    loss, _ = grpo_loss_ref(
        logp,
        d["old"].to(F64),
        d["ref"].to(F64),
        d["adv"].to(F64),
        d["mask"].to(F64),
        reduce_padding=ctor["loss_type"] == "luspo",
        **fields,
    )
    return loss.detach(), torch.autograd.grad(loss, (hidden, weight, bias))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_within_twice_liger_error(loss_type):
    ctor = ctor_for(loss_type, "token")
    d = make_inputs(torch.bfloat16, seed=4)
    ref_loss, ref_grads = reference_fp64(ctor, d)
    ours = run(GRPOLoss, ctor, {}, d)
    theirs = run(LigerFusedLinearGRPOLoss, ctor, {}, d)

    def errors(result):
        loss, _, grads = result
        loss_err = abs(float(loss.to(F64) - ref_loss))
        grad_errs = [
            float((g.to(F64) - r).norm() / r.norm().clamp(min=1e-30)) for g, r in zip(grads, ref_grads)
        ]
        return [loss_err, *grad_errs]

    floor = 1e-3  # bf16 rounding of the result itself
    for what, ours_err, liger_err in zip(("loss", "hidden", "weight", "bias"), errors(ours), errors(theirs)):
        assert ours_err <= 2 * liger_err + floor * (
            1 if what != "loss" else max(1.0, abs(float(ref_loss)))
        ), (
            what,
            ours_err,
            liger_err,
        )


def test_bf16_large_logits_luspo_closer_to_fp64_than_liger():
    """Logits of magnitude ~30 (as in Liger's own test file, whose bf16 luspo cases at its large shape
    ours fails): Liger rounds the logits to bf16 before the softmax, the fused loss keeps them in fp32,
    so its bf16 gradients are the closer ones to fp64 (there Liger's reference is the less exact)."""
    ctor = ctor_for("luspo", "sequence", beta=0.0, use_ref_model=False)
    d = make_inputs(torch.float64, seed=5)
    d["hidden"] = d["hidden"] * 30.0
    with torch.no_grad():
        logp, _, _ = linear_logprobs_ref(d["hidden"], d["weight"], d["ids"], d["bias"])
    noise = torch.randn(B, T, generator=torch.Generator().manual_seed(6), dtype=F64)
    d["old"] = (logp + 0.01 * noise).float()
    d = {k: v.to(torch.bfloat16) if k in ("hidden", "weight", "bias", "adv") else v for k, v in d.items()}
    _, ref_grads = reference_fp64(ctor, d)
    errors = {}
    for name, cls in (("ours", GRPOLoss), ("liger", LigerFusedLinearGRPOLoss)):
        _, _, grads = run(cls, ctor, {"ref": None}, d)
        errors[name] = max(float((g.to(F64) - r).norm() / r.norm()) for g, r in zip(grads, ref_grads))
    assert 4 * errors["ours"] < errors["liger"], errors  # measured: 2.1e-3 vs 6.6e-2
