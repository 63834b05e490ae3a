"""The executable spec itself (`mgrpo_fast.reference`): fp64 gradchecks and hand-computed cases.

Every other test compares against these functions, so here they are checked against numbers
worked out by hand (python floats, formulas in the comments) rather than against more code.
"""

from __future__ import annotations

import math

import pytest
import torch

from mgrpo_fast import reference
from mgrpo_fast.reference import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    group_advantages_ref,
    grpo_loss_ref,
    kl_ref,
    linear_logprobs_ref,
)

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ------------------------------------------------------------------------------------------
# gradcheck
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_ref_gradcheck(temperature):
    hidden = torch.randn(5, 3, dtype=F64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=F64, requires_grad=True)
    bias = torch.randn(7, dtype=F64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])

    def f(h, w, b):
        logp, entropy, _ = linear_logprobs_ref(h, w, targets, bias=b, temperature=temperature)
        return logp, entropy

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_linear_logprobs_ref_values_by_hand():
    # One row, H = 1, V = 3: logits = h * w = [0, 1, 2] * 1, temperature 2 -> z = [0, .5, 1].
    z = [0.0, 0.5, 1.0]
    lse = math.log(sum(math.exp(v) for v in z))
    p = [math.exp(v - lse) for v in z]
    entropy = -sum(pi * math.log(pi) for pi in p)  # == lse - sum p z
    logp, ent, lse_out = linear_logprobs_ref(
        t([[1.0]]), t([[0.0], [1.0], [2.0]]), torch.tensor([2]), temperature=2.0
    )
    assert logp.item() == pytest.approx(1.0 - lse, abs=1e-14)
    assert ent.item() == pytest.approx(entropy, abs=1e-14)
    assert lse_out.item() == pytest.approx(lse, abs=1e-14)


# Log-ratios whose token ratios (0.55, 0.90, 1.05, 1.49, 2.46, 0.74) stay away from every clip
# boundary used below (0.8, 1.2, delta 2.0, cispo cap 0.5), so the loss is smooth there.
LOG_RATIOS = [-0.6, -0.1, 0.05, 0.4, 0.9, -0.3]


def _gradcheck_batch():
    logp = -torch.rand(2, 6, dtype=F64) - 0.5
    old = logp - t([LOG_RATIOS, LOG_RATIOS[::-1]])
    ref = logp + 0.3 * torch.randn(2, 6, dtype=F64)
    mask = t([[1, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1]])
    return logp, old, ref, mask


def _away_from(values: torch.Tensor, bounds: list[float], margin: float = 1e-3) -> bool:
    return all(bool(((values - b).abs() > margin).all()) for b in bounds)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grpo_loss_ref_gradcheck(loss_type, level, per_token_adv, monkeypatch):
    logp, old, ref, mask = _gradcheck_batch()
    adv = torch.randn(2, 6, dtype=F64) if per_token_adv else t([0.7, -1.3])
    # cispo's IS weight is detached by design: its gradient is only the derivative of the loss
    # value where the weight is constant, i.e. every ratio above the cap (0.5 < 0.55 here).
    eps_high = 0.5 if loss_type == "cispo" else 0.2
    seq_ratio = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    assert _away_from(seq_ratio, [0.8, 1.2, 2.0, 0.5])  # the setup keeps GSPO smooth too
    kwargs = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_high=eps_high,
        beta=0.04,
        delta=2.0 if loss_type != "cispo" else None,
        max_completion_length=8,
    )
    if loss_type == "vespo":
        # vespo's Gamma weight is a stop-gradient by design (-sg(phi) A logp): finite differences
        # must see it held at its value at logp, as autograd does.
        held = reference.vespo_weights_ref(
            (logp - old) * mask, mask, adv if per_token_adv else adv[:, None], None,
            k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0,
        )  # fmt: skip
        monkeypatch.setattr(reference, "vespo_weights_ref", lambda *args, **kw: held)
    logp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: grpo_loss_ref(lp, old, ref, adv, mask, **kwargs)[0], (logp,))


# ------------------------------------------------------------------------------------------
# Hand-computed loss cases, B = 2 sequences, T = 2 tokens.
#   token ratios r = [[1.5, 1.1], [0.5, 3.0]], advantages A = [1, -2], eps_low = eps_high = 0.2
#   per-token loss -min(r A, clip(r, 0.8, 1.2) A):
#     (0,0) r=1.5 A=1 : min(1.5, 1.2) = 1.2            -> l = -1.2  (clipped high)
#     (0,1) r=1.1 A=1 : min(1.1, 1.1) = 1.1            -> l = -1.1
#     (1,0) r=0.5 A=-2: min(-1.0, 0.8*-2 = -1.6) = -1.6 -> l =  1.6  (clipped low)
#     (1,1) r=3.0 A=-2: min(-6.0, 1.2*-2 = -2.4) = -6.0 -> l =  6.0  (not a clip flag: A < 0)
# ------------------------------------------------------------------------------------------
RATIOS = [[1.5, 1.1], [0.5, 3.0]]
LOGP = [[-1.0, -2.0], [-0.5, -3.0]]


def _hand_batch():
    logp = t(LOGP).requires_grad_(True)
    old = t(LOGP) - torch.log(t(RATIOS))  # so exp(logp - old) = RATIOS
    return logp, old, t([1.0, -2.0])


def test_hand_dapo_and_bnpo_with_clipping():
    logp, old, adv = _hand_batch()
    mask = torch.ones(2, 2, dtype=F64)
    for loss_type in ("dapo", "bnpo"):
        loss, m = grpo_loss_ref(logp, old, None, adv, mask, loss_type=loss_type)
        assert loss.item() == pytest.approx((-1.2 - 1.1 + 1.6 + 6.0) / 4, abs=1e-12)  # 1.325
        assert m["ratio"].item() == pytest.approx((1.5 + 1.1 + 0.5 + 3.0) / 4, abs=1e-12)
        assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 4)
        assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 4)
        assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 4)
        assert "kl" not in m and "entropy" not in m
    # d loss / d logp: clipped tokens get 0, unclipped ones -r A / 4.
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t([[0.0, -1.1 / 4], [0.0, 6.0 / 4]]))


def test_hand_dual_clip_delta():
    # delta = 2: the unclipped branch of (1,1) becomes min(3, 2) * -2 = -4 -> l = 4 (gradient 0).
    logp, old, adv = _hand_batch()
    loss, _ = grpo_loss_ref(logp, old, None, adv, torch.ones(2, 2), delta=2.0)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 1.6 + 4.0) / 4, abs=1e-12)  # 0.825
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t([[0.0, -1.1 / 4], [0.0, 0.0]]))


def test_hand_grpo_per_sequence_mean_with_empty_sequence():
    # B = 3: mask [[1,1],[1,0],[0,0]]; the third sequence has no loss tokens (its numbers are junk).
    logp = t(LOGP + [[-0.1, -0.2]])
    old = logp - torch.log(t(RATIOS + [[9.0, 9.0]]))
    adv = t([1.0, -2.0, 5.0])
    mask = t([[1, 1], [1, 0], [0, 0]])
    loss, m = grpo_loss_ref(logp, old, None, adv, mask, loss_type="grpo")
    # per-sequence token means: (-1.2 - 1.1) / 2 = -1.15, 1.6 / 1, 0 (empty); mean over B = 3
    assert loss.item() == pytest.approx((-1.15 + 1.6 + 0.0) / 3, abs=1e-12)  # 0.15
    dapo, _ = grpo_loss_ref(logp, old, None, adv, mask, loss_type="dapo")
    assert dapo.item() == pytest.approx((-1.2 - 1.1 + 1.6) / 3, abs=1e-12)  # token mean: -0.2333
    assert m["ratio"].item() == pytest.approx((1.5 + 1.1 + 0.5) / 3, abs=1e-12)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize(("max_len", "expected"), [(None, 5.3 / (2 * 2)), (5, 5.3 / (2 * 5))])
def test_hand_dr_grpo(max_len, expected):
    # dr_grpo: sum of masked per-token losses (5.3) / (B * L); L defaults to T = 2.
    logp, old, adv = _hand_batch()
    loss, _ = grpo_loss_ref(
        logp, old, None, adv, torch.ones(2, 2), loss_type="dr_grpo", max_completion_length=max_len
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_hand_cispo_cap_and_detached_weight():
    # cispo, cap eps_high = 1.2: l = -min(r, 1.2) A logp with the weight detached.
    #   (0,0) w=1.2 (capped): -1.2 * 1 * -1.0 =  1.2      (0,1) w=1.1: -1.1 * 1 * -2.0 = 2.2
    #   (1,0) w=0.5: -0.5 * -2 * -0.5 = -0.5              (1,1) w=1.2: -1.2 * -2 * -3.0 = -7.2
    logp, old, adv = _hand_batch()
    loss, m = grpo_loss_ref(logp, old, None, adv, torch.ones(2, 2), loss_type="cispo", epsilon_high=1.2)
    assert loss.item() == pytest.approx((1.2 + 2.2 - 0.5 - 7.2) / 4, abs=1e-12)  # -1.075
    # only (0,0) is capped with A > 0; cispo has no lower clip
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 4)
    assert m["clip_ratio/low_mean"].item() == 0.0
    # gradient -w A / 4: the weight's own dependence on logp is cut (REINFORCE with IS weight)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, t([[-1.2 * 1 / 4, -1.1 * 1 / 4], [-0.5 * -2 / 4, -1.2 * -2 / 4]]))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_hand_kl_estimators(estimator):
    # On-policy (old = None -> ratio 1, no clipping): surrogate = -A per token = [-1, -1, 2, 2].
    # x = ref - logp = [0, ln 2, -ln 2, 1]:  k1 = -x,  k2 = x^2 / 2,  k3 = e^x - x - 1.
    xs = [0.0, math.log(2.0), -math.log(2.0), 1.0]
    kl = {
        "k1": [-x for x in xs],
        "k2": [x * x / 2 for x in xs],
        "k3": [math.exp(x) - x - 1 for x in xs],
    }[estimator]
    logp = t(LOGP).requires_grad_(True)
    ref = t(LOGP) + t(xs).reshape(2, 2)
    beta = 0.1
    loss, m = grpo_loss_ref(
        logp, None, ref, t([1.0, -2.0]), torch.ones(2, 2), beta=beta, kl_estimator=estimator
    )
    assert m["kl"].item() == pytest.approx(sum(kl) / 4, abs=1e-12)
    assert loss.item() == pytest.approx((-1 - 1 + 2 + 2) / 4 + beta * sum(kl) / 4, abs=1e-12)
    assert m["ratio"].item() == 1.0
    torch.testing.assert_close(kl_ref(logp.detach(), ref, estimator).flatten(), t(kl))


def test_hand_sequence_level_gspo():
    # Sequence ratio = exp(mean log-ratio): seq0 sqrt(1.5 * 1.1), seq1 sqrt(0.5 * 3.0).
    #   seq0 r = 1.2845 > 1.2, A = 1 -> clipped: l = -1.2 on both tokens
    #   seq1 r = 1.2247, A = -2: min(-2.449, -2.4) = -2.449 -> l = 2.449 on both tokens
    r0, r1 = math.sqrt(1.5 * 1.1), math.sqrt(0.5 * 3.0)
    logp, old, adv = _hand_batch()
    loss, m = grpo_loss_ref(logp, old, None, adv, torch.ones(2, 2), importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((2 * -1.2 + 2 * 2 * r1) / 4, abs=1e-12)
    assert m["ratio"].item() == pytest.approx((r0 + r1) / 2, abs=1e-12)  # mean over sequences
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 2)
    assert m["clip_ratio/low_mean"].item() == 0.0


def test_beta_without_ref_logp_is_an_error():
    logp, old, adv = _hand_batch()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss_ref(logp, old, None, adv, torch.ones(2, 2), beta=0.04)


# ------------------------------------------------------------------------------------------
# group_advantages_ref, by hand
#   rewards [1, 0, 1, 1 | 5 | 2, 4] with group ids [0, 0, 0, 0 | 7 | 3, 3]
#   group 0: mean 0.75, deviations [.25, -.75, .25, .25], unbiased var (3 * .0625 + .5625) / 3 = .25
#   group 7: a single reward -> advantage 0
#   group 3: mean 3, deviations [-1, 1], unbiased var 2 / 1 -> std sqrt(2)
#   batch: mean 2, squared deviations sum 20, unbiased var 20 / 6 -> std sqrt(10 / 3)
# ------------------------------------------------------------------------------------------
REWARDS = [1.0, 0.0, 1.0, 1.0, 5.0, 2.0, 4.0]
GROUPS = [0, 0, 0, 0, 7, 3, 3]
CENTERED = [0.25, -0.75, 0.25, 0.25, 0.0, -1.0, 1.0]
EPS = 1e-6


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        (
            "group",
            [c / (0.5 + EPS) for c in CENTERED[:4]]
            + [0.0]
            + [c / (math.sqrt(2) + EPS) for c in CENTERED[5:]],
        ),
        ("batch", [c / (math.sqrt(10 / 3) + EPS) for c in CENTERED]),
        ("none", CENTERED),
    ],
)
def test_group_advantages_ref_by_hand(scale, expected):
    adv = group_advantages_ref(t(REWARDS), torch.tensor(GROUPS), scale=scale, eps=EPS)
    assert adv.dtype == F64
    torch.testing.assert_close(adv, t(expected), rtol=0, atol=1e-12)


def test_group_advantages_ref_upcasts_to_fp32():
    adv = group_advantages_ref(torch.tensor(REWARDS, dtype=torch.bfloat16), torch.tensor(GROUPS))
    assert adv.dtype == torch.float32
