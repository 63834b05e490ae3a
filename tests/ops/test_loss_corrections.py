"""The options beyond the surrogate, against the fp64 reference (torch paths, padded and packed):
the sampler correction ``vllm_is_ratio`` (per token and per sequence), the importance-weighted KL
(``use_bias_correction_kl``), the entropy bonus (``entropy_coef``, differentiated through the entropy),
the SAPO/VESPO parameters and bounds no stricter than TRL's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, padded_from_packed, random_packed_batch, to_padded_batch

from mgrpo_fast import LossOptions, fused_linear_grpo_loss, grpo_loss
from mgrpo_fast.reference import LOSS_TYPES, grpo_loss_ref, linear_logprobs_ref

F64 = torch.float64
LENGTHS = [5, 0, 3, 7, 1, 4]
EXTRA = {
    "sapo": dict(sapo_temperature_pos=0.7, sapo_temperature_neg=2.5),
    "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=1.5),
    "cispo": dict(epsilon_high=1.1),
}


def sampler_correction(batch: dict, which: str | None, seed: int = 3) -> torch.Tensor | None:
    """A ``vllm_is_ratio`` for the packed ``batch``: ``(N,)`` per token or ``(S,)`` per sequence, >= 0,
    some truncated to exactly 0."""
    if which is None:
        return None
    g = torch.Generator().manual_seed(seed)
    n = batch["logp"].numel() if which == "token" else batch["cu_seqlens"].numel() - 1
    v = 0.3 + 1.2 * torch.rand(n, generator=g, dtype=F64)
    v[torch.rand(n, generator=g) < 0.1] = 0.0
    return v


def run_both(batch, opts, which, layout):
    """(ours, reference): ``(loss, metrics, (grad logp, grad entropy))`` of ``grpo_loss`` in ``layout``
    and of ``grpo_loss_ref`` on the padded twin."""
    v = sampler_correction(batch, which)
    cu = batch["cu_seqlens"]
    logp = batch["logp"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(True)
    padded = to_padded_batch({**batch, "logp": logp, "entropy": entropy})
    # per-token ratios of padding positions are 1 (log 1 = 0: nothing for vespo's sum)
    v_pad = None if v is None else (padded_from_packed(v, cu, fill=1.0) if which == "token" else v)
    ref_loss, ref_metrics = grpo_loss_ref(
        padded["logp"],
        padded["old_logp"],
        padded["ref_logp"],
        padded["advantages"],
        padded["mask"],
        entropy=padded["entropy"],
        vllm_is_ratio=v_pad,
        **opts,
    )
    ref_grads = torch.autograd.grad(ref_loss, (logp, entropy), allow_unused=True)
    if layout == "packed":
        loss, metrics = grpo_loss(
            logp,
            batch["old_logp"],
            batch["ref_logp"],
            batch["advantages"],
            batch["mask"],
            cu_seqlens=cu,
            entropy=entropy,
            vllm_is_ratio=v,
            impl="torch",
            **opts,
        )
    else:
        loss, metrics = grpo_loss(
            padded["logp"],
            padded["old_logp"],
            padded["ref_logp"],
            padded["advantages"],
            padded["mask"],
            entropy=padded["entropy"],
            vllm_is_ratio=v_pad,
            impl="torch",
            **opts,
        )
    grads = torch.autograd.grad(loss, (logp, entropy), allow_unused=True)
    return (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads)


def assert_same(ours, ref):
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = ours, ref
    assert_close(loss, ref_loss, F64, "loss")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close(metrics[key], ref_metrics[key], F64, key)
    for name, g, r in zip(("logp", "entropy"), grads, ref_grads):
        if g is None or r is None:  # no gradient on one side: none (or zeros) on the other
            other = r if g is None else g
            assert other is None or not other.any(), name
        else:
            assert_close(g, r, F64, f"grad {name}")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("which", [None, "token", "sequence"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sampler_correction_corrected_kl_and_bonus(loss_type, level, which, layout):
    batch = random_packed_batch(LENGTHS, empty_mask_seq=2, log_ratio_scale=0.5)
    opts = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        use_bias_correction_kl=True,
        entropy_coef=0.03,
        **EXTRA.get(loss_type, {}),
    )
    ours, ref = run_both(batch, opts, which, layout)
    assert_same(ours, ref)
    assert ours[2][1] is not None and ours[2][1].abs().sum() > 0  # the bonus reaches the entropy


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_options_change_the_loss(loss_type):
    """Guard: each option acts on this batch (the comparisons above would not notice a no-op)."""
    batch = random_packed_batch(LENGTHS, empty_mask_seq=2, log_ratio_scale=0.5)
    base = dict(loss_type=loss_type, beta=0.04, **EXTRA.get(loss_type, {}))

    def value(which=None, **over):
        (loss, _, _), _ = run_both(batch, {**base, **over}, which, "packed")
        return float(loss.detach())

    plain = value()
    assert value(use_bias_correction_kl=True) != plain
    assert value(entropy_coef=0.1) != plain
    assert value(which="token") != plain and value(which="sequence") != plain
    if loss_type in ("sapo", "vespo"):
        defaults = LossOptions()
        own = {k: getattr(defaults, k) for k in EXTRA[loss_type]}
        assert value(**own) != plain


def test_entropy_bonus_is_the_token_mean_whatever_the_loss_type():
    """TRL's definition: ``-coef · Σ m H / M``, not rescaled by the loss type's normalizer."""
    batch = to_padded_batch(random_packed_batch(LENGTHS, empty_mask_seq=2))
    mask, entropy = batch["mask"], batch["entropy"]
    expected = -0.5 * float((entropy * mask).sum() / mask.sum())
    for loss_type in LOSS_TYPES:
        args = (batch["logp"], batch["old_logp"], None, batch["advantages"], mask)
        with_bonus, _ = grpo_loss(*args, entropy=entropy, loss_type=loss_type, entropy_coef=0.5)
        without, _ = grpo_loss(*args, entropy=entropy, loss_type=loss_type)
        assert float(with_bonus - without) == pytest.approx(expected, rel=1e-12), loss_type
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(*args, loss_type="dapo", entropy_coef=0.5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_torch_path_corrections_match_reference(loss_type):
    """The two-stage torch path of ``fused_linear_grpo_loss``: the bonus differentiates the entropy of
    the same log-prob pass (hidden and weight gradients against autograd through the reference)."""
    g = torch.Generator().manual_seed(7)
    b, t, h, v = 3, 6, 8, 19
    hidden = torch.randn(b, t, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) / h**0.5
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).double()
    with torch.no_grad():
        logp0, _, _ = linear_logprobs_ref(hidden, weight, targets)
    old = logp0 + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    ref = logp0 + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    is_ratio = 0.5 + torch.rand(b, t, generator=g, dtype=F64)
    opts = dict(
        loss_type=loss_type,
        beta=0.04,
        use_bias_correction_kl=True,
        entropy_coef=0.05,
        **EXTRA.get(loss_type, {}),
    )

    def grads(fn):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(hh, ww)
        return (loss, *torch.autograd.grad(loss, (hh, ww)))

    def ours(hh, ww):
        loss, _ = fused_linear_grpo_loss(
            hh,
            ww,
            targets,
            adv,
            mask,
            old_logp=old,
            ref_logp=ref,
            vllm_is_ratio=is_ratio,
            impl="torch",
            **opts,
        )
        return loss

    def reference(hh, ww):
        logp, entropy, _ = linear_logprobs_ref(hh, ww, targets)
        loss, _ = grpo_loss_ref(logp, old, ref, adv, mask, entropy=entropy, vllm_is_ratio=is_ratio, **opts)
        return loss

    for name, a, r in zip(("loss", "hidden", "weight"), grads(ours), grads(reference)):
        assert_close(a, r, F64, name)


@pytest.mark.parametrize(
    "fields",
    [
        dict(delta=0.9),  # TRL recommends > 1 + epsilon_high but accepts it
        dict(delta=-1.0),
        dict(epsilon_low=1.2),
        dict(epsilon_low=-0.1, epsilon_high=-0.05),
        dict(beta=-0.01),
        dict(loss_type="cispo", epsilon_high=0.5, importance_sampling_level="sequence"),
        dict(loss_type="sapo", importance_sampling_level="sequence", sapo_temperature_neg=-1.0),
        dict(loss_type="vespo", importance_sampling_level="sequence", vespo_lambda_neg=0.0),
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_bounds_no_stricter_than_trl(fields):
    """TRL accepts these values (no bounds); the math is defined, so the loss computes it (checked
    against the reference)."""
    batch = random_packed_batch(LENGTHS, empty_mask_seq=2, log_ratio_scale=0.5)
    opts = dict(dict(beta=0.04), **fields)
    LossOptions(**opts)
    ours, ref = run_both(batch, opts, None, "packed")
    assert_same(ours, ref)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        (dict(delta=float("nan")), "delta"),
        (dict(epsilon_low=float("inf")), "epsilon_low"),
        (dict(beta=float("nan")), "beta"),
        (dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
        (dict(vespo_k_neg=float("inf")), "vespo_k_neg"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
        (dict(use_bias_correction_kl="yes"), "use_bias_correction_kl"),
    ],
)
def test_undefined_values_are_refused_by_name(fields, name):
    with pytest.raises(ValueError, match=name):
        LossOptions(**fields)


def test_bad_sampler_correction_is_refused_by_name():
    batch = to_padded_batch(random_packed_batch(LENGTHS))
    args = (batch["logp"], None, None, batch["advantages"], batch["mask"])
    b, t = batch["logp"].shape
    for bad in (
        torch.full((b, t), -0.5, dtype=F64),
        torch.full((b,), float("nan"), dtype=F64),
        torch.ones(b + 1),
    ):
        with pytest.raises(ValueError, match="vllm_is_ratio"):
            grpo_loss(*args, vllm_is_ratio=bad)
    with pytest.raises(TypeError, match="vllm_is_ratio"):
        grpo_loss(*args, vllm_is_ratio=torch.ones(b, t, dtype=torch.int64))
