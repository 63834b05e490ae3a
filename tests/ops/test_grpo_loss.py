"""`grpo_loss` and `fused_linear_grpo_loss` against the reference, in padded and packed layouts.

The reference (`grpo_loss_ref`, `linear_logprobs_ref`) only knows the padded layout; packed
inputs are converted with `padded_from_packed`, and gradients flow back through that conversion.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    assert_close,
    packed_from_padded,
    padded_from_packed,
    random_packed_batch,
    to_padded_batch,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from mgrpo_fast import fused_linear_grpo_loss, grpo_loss, linear_logprobs
from mgrpo_fast.ops.layout import cu_seqlens_from_lengths
from mgrpo_fast.reference import (
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    grpo_loss_ref,
    linear_logprobs_ref,
)

F64 = torch.float64
# Sequence 1 has length 0 (packed only: in the padded twin it is an all-padding row); sequence 2
# has tokens but an all-zero mask; the others mask out a random prompt-like prefix.
LENGTHS = [5, 0, 3, 7, 1, 4]
EMPTY_MASK_SEQ = 2


def options(loss_type, level, beta=0.0, kl="k3", delta=None, **extra):
    # cispo's epsilon_high is the absolute cap of the IS weight; 1.1 makes some tokens hit it.
    eps_high = 1.1 if loss_type == "cispo" else 0.28
    return dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        kl_estimator=kl,
        delta=delta,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        **extra,
    )


def assert_metrics_equal(got: dict, expected: dict, dtype=F64) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dim() == 0 and not got[key].requires_grad, key
        assert_close(got[key], value, dtype, key)


def check_grpo_loss(batch, layout, opts, dtype=F64):
    """Our loss on ``batch`` (packed dict) in ``layout`` vs the reference on its padded twin."""
    lengths = [int(b - a) for a, b in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:])]
    logp = batch["logp"].clone().requires_grad_(True)
    # Reference: padded twin, with the gradient flowing back onto the packed rows.
    padded = to_padded_batch({**batch, "logp": logp})
    ref_loss, ref_metrics = grpo_loss_ref(
        padded["logp"],
        padded["old_logp"],
        padded["ref_logp"],
        padded["advantages"],
        padded["mask"],
        entropy=padded["entropy"],
        **opts,
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)

    if layout == "packed":
        args = (logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["mask"])
        kwargs = dict(cu_seqlens=batch["cu_seqlens"], entropy=batch["entropy"])
        loss, metrics = grpo_loss(*args, **kwargs, **opts)
        (grad,) = torch.autograd.grad(loss, logp)
    else:
        logp_pad = padded_from_packed(batch["logp"], batch["cu_seqlens"]).requires_grad_(True)
        p = to_padded_batch(batch)
        loss, metrics = grpo_loss(
            logp_pad, p["old_logp"], p["ref_logp"], p["advantages"], p["mask"], entropy=p["entropy"], **opts
        )
        (grad_pad,) = torch.autograd.grad(loss, logp_pad)
        grad, _ = packed_from_padded(grad_pad, lengths)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_metrics_equal(metrics, ref_metrics, dtype)
    assert_close(grad, ref_grad, dtype, "grad logp")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("delta", [None, 2.0])
@pytest.mark.parametrize(("beta", "kl"), [(0.0, "k3"), *itertools.product([0.04], KL_ESTIMATORS)])
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_seq", "adv_tok"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_matches_reference(loss_type, level, per_token_adv, beta, kl, delta, layout):
    batch = random_packed_batch(
        LENGTHS, per_token_adv=per_token_adv, empty_mask_seq=EMPTY_MASK_SEQ, log_ratio_scale=0.5
    )
    check_grpo_loss(batch, layout, options(loss_type, level, beta, kl, delta))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_fp32(loss_type, layout):
    batch = random_packed_batch(LENGTHS, dtype=torch.float32, empty_mask_seq=EMPTY_MASK_SEQ)
    check_grpo_loss(batch, layout, options(loss_type, "token", beta=0.04), dtype=torch.float32)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dr_grpo_max_completion_length(layout):
    batch = random_packed_batch(LENGTHS, empty_mask_seq=EMPTY_MASK_SEQ)
    check_grpo_loss(batch, layout, options("dr_grpo", "token", max_completion_length=12))


@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    loss_type=st.sampled_from(LOSS_TYPES),
    level=st.sampled_from(IMPORTANCE_SAMPLING_LEVELS),
    per_token_adv=st.booleans(),
    layout=st.sampled_from(["padded", "packed"]),
)
def test_grpo_loss_hypothesis(lengths, loss_type, level, per_token_adv, layout):
    assume(sum(lengths) > 0)  # T = 0 is covered by test_no_tokens_at_all (the reference divides by T)
    batch = random_packed_batch(lengths, per_token_adv=per_token_adv, log_ratio_scale=0.5)
    check_grpo_loss(batch, layout, options(loss_type, level, beta=0.04, kl="k3"))


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_old_logp_none_is_on_policy(loss_type, level):
    b = to_padded_batch(random_packed_batch(LENGTHS, empty_mask_seq=EMPTY_MASK_SEQ))
    results = []
    for old in (None, b["logp"].detach().clone()):
        logp = b["logp"].clone().requires_grad_(True)
        loss, metrics = grpo_loss(
            logp, old, b["ref_logp"], b["advantages"], b["mask"], **options(loss_type, level)
        )
        results.append((loss, metrics, torch.autograd.grad(loss, logp)[0]))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert m_a["ratio"].item() == 1.0  # exactly: the log-ratio is logp - logp = 0
    assert m_a["clip_ratio/region_mean"].item() == 0.0 or loss_type == "cispo"
    assert_close(loss_a, loss_b, F64, "loss")
    assert_close(g_a, g_b, F64, "grad")
    assert_metrics_equal(m_a, m_b)


@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_garbage_outside_mask_is_ignored(loss_type, level, garbage):
    # Padded batches often hold junk in old/ref log-probs where mask == 0; it must not leak in.
    b = to_padded_batch(random_packed_batch(LENGTHS, empty_mask_seq=EMPTY_MASK_SEQ))
    off = b["mask"] == 0
    dirty = {k: b[k].masked_fill(off, garbage) for k in ("old_logp", "ref_logp")}
    opts = options(loss_type, level, beta=0.04)
    out = []
    for olds in (b, dirty):
        logp = b["logp"].clone().requires_grad_(True)
        loss, metrics = grpo_loss(
            logp, olds["old_logp"], olds["ref_logp"], b["advantages"], b["mask"], **opts
        )
        out.append((loss, metrics, torch.autograd.grad(loss, logp)[0]))
    (clean_loss, clean_m, clean_g), (loss, metrics, grad) = out
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert_close(loss, clean_loss, F64, "loss")
    assert_close(grad, clean_g, F64, "grad")
    assert_metrics_equal(metrics, clean_m)


@pytest.mark.parametrize("garbage", [1e4, float("inf"), float("nan")])
def test_garbage_entropy_outside_mask_is_ignored(garbage):
    # The entropy metric, like old/ref log-probs, is a padded (B, T) tensor: padding junk must not
    # leak into the masked mean (0 * inf = NaN).
    b = to_padded_batch(random_packed_batch(LENGTHS, empty_mask_seq=EMPTY_MASK_SEQ))
    args = (b["logp"], b["old_logp"], None, b["advantages"], b["mask"])
    _, clean = grpo_loss(*args, entropy=b["entropy"])
    _, dirty = grpo_loss(*args, entropy=b["entropy"].masked_fill(b["mask"] == 0, garbage))
    assert_close(dirty["entropy"], clean["entropy"], F64, "entropy metric")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_mask(loss_type, level, layout):
    batch = random_packed_batch([4, 2, 3])
    batch["mask"].zero_()
    b = batch if layout == "packed" else to_padded_batch(batch)
    logp = b["logp"].clone().requires_grad_(True)
    extra = {"cu_seqlens": batch["cu_seqlens"]} if layout == "packed" else {}
    loss, metrics = grpo_loss(
        logp,
        b["old_logp"],
        b["ref_logp"],
        b["advantages"],
        b["mask"],
        entropy=b["entropy"],
        **extra,
        **options(loss_type, level, beta=0.04),
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert {"kl", "entropy", "ratio"} <= set(metrics)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_tokens_at_all(loss_type):
    # A packed micro-batch whose sequences are all empty (N = 0): loss 0, finite metrics, no crash.
    logp = torch.zeros(0, dtype=F64, requires_grad=True)
    loss, metrics = grpo_loss(
        logp,
        logp.detach(),
        logp.detach(),
        torch.zeros(2, dtype=F64),
        torch.zeros(0),
        cu_seqlens=torch.tensor([0, 0, 0], dtype=torch.int32),
        **options(loss_type, "sequence"),
    )
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert logp.grad.shape == (0,)


def test_mask_none_means_all_tokens():
    b = to_padded_batch(random_packed_batch([3, 3, 3]))
    a, _ = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], None)
    c, _ = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], torch.ones(3, 3))
    assert_close(a, c, F64)


def test_bool_mask_equals_float_mask():
    b = to_padded_batch(random_packed_batch(LENGTHS, empty_mask_seq=EMPTY_MASK_SEQ))
    a, ma = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], b["mask"].bool(), loss_type="grpo")
    c, mc = grpo_loss(b["logp"], b["old_logp"], None, b["advantages"], b["mask"], loss_type="grpo")
    assert_close(a, c, F64)
    assert_metrics_equal(ma, mc)


# ------------------------------------------------------------------------------------------
# fused_linear_grpo_loss
# ------------------------------------------------------------------------------------------
def fused_case(lengths, h, v, dtype, *, per_token_adv=False, empty_mask_seq=None, bias=True):
    batch = random_packed_batch(lengths, per_token_adv=per_token_adv, empty_mask_seq=empty_mask_seq)
    n = sum(lengths)
    hidden = torch.randn(n, h, dtype=F64)
    weight = torch.randn(v, h, dtype=F64) / h**0.5
    b = torch.randn(v, dtype=F64) if bias else None
    targets = torch.randint(0, v, (n,)).masked_fill(batch["mask"] == 0, -100)  # ignore_index where masked out
    with torch.no_grad():
        logp, _, _ = linear_logprobs_ref(hidden, weight, targets.clamp(min=0), bias=b)
    batch["old_logp"] = logp + 0.3 * torch.randn(n, dtype=F64)
    batch["ref_logp"] = logp + 0.3 * torch.randn(n, dtype=F64)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return batch, cast(hidden), cast(weight), cast(b), targets


def check_fused(lengths, h, v, dtype, layout, opts, *, temperature=1.0, chunk_size=None, **case):
    batch, hidden, weight, bias, targets = fused_case(lengths, h, v, dtype, **case)
    cu = batch["cu_seqlens"]
    leaves = [
        x.clone().requires_grad_(True) for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]

    # Reference in fp64, from the same (rounded) inputs, back-propagated onto the packed leaves.
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    r_logp, r_ent, _ = linear_logprobs_ref(
        ref_leaves[0],
        ref_leaves[1],
        targets.clamp(min=0),
        bias=ref_leaves[2] if bias is not None else None,
        temperature=temperature,
    )
    pad = lambda x: padded_from_packed(x, cu)  # noqa: E731
    adv = batch["advantages"]
    adv_padded = pad(adv) if case.get("per_token_adv") else adv
    ref_loss, ref_metrics = grpo_loss_ref(
        pad(r_logp),
        pad(batch["old_logp"]),
        pad(batch["ref_logp"]),
        adv_padded,
        pad(batch["mask"]),
        entropy=pad(r_ent),
        **opts,
    )
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)

    common = dict(
        bias=leaves[2] if bias is not None else None,
        temperature=temperature,
        chunk_size=chunk_size,
        impl="torch",
        **opts,
    )
    if layout == "packed":
        loss, metrics = fused_linear_grpo_loss(
            leaves[0],
            leaves[1],
            targets,
            adv,
            batch["mask"],
            cu_seqlens=cu,
            old_logp=batch["old_logp"],
            ref_logp=batch["ref_logp"],
            **common,
        )
        grads = torch.autograd.grad(loss, leaves)
    else:
        h_pad = pad(leaves[0].detach()).requires_grad_(True)
        loss, metrics = fused_linear_grpo_loss(
            h_pad,
            leaves[1],
            padded_from_packed(targets, cu, fill=-100),
            adv_padded,
            pad(batch["mask"]),
            old_logp=pad(batch["old_logp"]),
            ref_logp=pad(batch["ref_logp"]),
            **common,
        )
        g_h, *rest = torch.autograd.grad(loss, [h_pad, *leaves[1:]])
        grads = (packed_from_padded(g_h, lengths)[0], *rest)
        assert torch.count_nonzero(g_h[pad(batch["mask"]) == 0]) == 0  # padding and prompt rows: no gradient
    assert "entropy" in metrics
    assert_close(loss, ref_loss, dtype, "loss")
    assert_metrics_equal(metrics, ref_metrics, dtype)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_matches_reference(loss_type, level, layout, dtype):
    opts = options(loss_type, level, beta=0.04, delta=2.0 if loss_type != "cispo" else None)
    check_fused(
        LENGTHS, 12, 37, dtype, layout, opts, temperature=0.8, chunk_size=5, empty_mask_seq=EMPTY_MASK_SEQ
    )


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_per_token_advantages_no_bias(layout):
    check_fused(
        LENGTHS, 9, 41, F64, layout, options("grpo", "token", beta=0.0), per_token_adv=True, bias=False
    )


@given(
    lengths=st.lists(st.integers(0, 11), min_size=1, max_size=5),
    h=st.integers(1, 19),
    v=st.integers(2, 101),
    loss_type=st.sampled_from(LOSS_TYPES),
    level=st.sampled_from(IMPORTANCE_SAMPLING_LEVELS),
    layout=st.sampled_from(["padded", "packed"]),
    chunk=st.integers(1, 9),
)
def test_fused_hypothesis(lengths, h, v, loss_type, level, layout, chunk):
    assume(sum(lengths) > 0)
    check_fused(lengths, h, v, F64, layout, options(loss_type, level, beta=0.04), chunk_size=chunk)


def test_fused_equals_linear_logprobs_then_grpo_loss():
    # The two public entry points compose: fused == linear_logprobs + grpo_loss (packed layout).
    b, hidden, weight, bias, targets = fused_case([6, 3, 5], 8, 29, F64)
    opts = dict(old_logp=b["old_logp"], ref_logp=b["ref_logp"], **options("dapo", "token", beta=0.04))
    cu = cu_seqlens_from_lengths([6, 3, 5])
    fused, fm = fused_linear_grpo_loss(
        hidden, weight, targets, b["advantages"], b["mask"], bias=bias, cu_seqlens=cu, **opts
    )
    logp, ent = linear_logprobs(hidden, weight, targets.clamp(min=0), bias=bias, return_entropy=True)
    old, ref = opts.pop("old_logp"), opts.pop("ref_logp")
    split, sm = grpo_loss(logp, old, ref, b["advantages"], b["mask"], cu_seqlens=cu, entropy=ent, **opts)
    assert_close(fused, split, F64)
    assert_metrics_equal(fm, sm)
