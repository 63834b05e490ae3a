"""Bad values in the loss inputs, on every ``impl``.

What the caller computed (the mask, old and reference log-probs, advantages, sampler corrections) is
refused with a ``ValueError`` naming the argument when a value would silently change the loss: a
mask of -1 flips a token's sign, an infinite old log-prob makes its ratio 0 or infinite. What the
model computes (hidden states, log-probs) is not checked: NaN in gives a NaN loss, never a finite
loss over NaN gradients. Triton runs under ``TRITON_INTERPRET=1`` on CPU (small shapes).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

pytest.importorskip("triton")

from mgrpo_fast import GRPOLoss, fused_linear_grpo_loss, grpo_loss  # noqa: E402
from mgrpo_fast.ops.options import LOSS_TYPES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ("torch", "triton")
OPS = ("grpo_loss", "fused_linear_grpo_loss")
B, T, H, V = 2, 5, 8, 13
NAN, INF = float("nan"), float("inf")


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    d = dict(
        hidden=torch.randn(B, T, H, generator=g),
        weight=torch.randn(V, H, generator=g) / H**0.5,
        targets=torch.randint(0, V, (B, T), generator=g),
        logp=-torch.rand(B, T, generator=g) - 0.5,
        old_logp=-torch.rand(B, T, generator=g) - 0.5,
        ref_logp=-torch.rand(B, T, generator=g) - 0.5,
        advantages=torch.tensor([0.7, -1.1]),
        mask=mask,
        vllm_is_ratio=0.5 + torch.rand(B, T, generator=g),
    )
    return {k: v.to(DEVICE) for k, v in d.items()}


def call(op: str, d: dict, impl: str, **options):
    """``(loss, metrics)`` of ``op`` on the batch ``d`` (beta = 0.04 unless given: the reference is
    read); ``old_logp`` and ``vllm_is_ratio`` only when ``d`` has them."""
    options = {"beta": 0.04, **options}
    common = dict(vllm_is_ratio=d.get("vllm_is_ratio"), impl=impl, **options)
    old, ref = d.get("old_logp"), d["ref_logp"]
    if op == "grpo_loss":
        return grpo_loss(d["logp"], old, ref, d["advantages"], d["mask"], **common)
    hidden, weight, targets = d["hidden"], d["weight"], d["targets"]
    return fused_linear_grpo_loss(
        hidden, weight, targets, d["advantages"], d["mask"], old_logp=old, ref_logp=ref, **common
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [-1.0, 0.5, 2.0, NAN])
def test_mask_must_be_zero_or_one(op, impl, bad):
    d = make_batch()
    d["mask"][1, 2] = bad
    with pytest.raises(ValueError, match=r"^mask: expected 0/1 values"):
        call(op, d, impl)
    d = make_batch()
    d["mask"] = d["mask"].long()
    d["mask"][0, 0] = -1  # an integer mask too
    with pytest.raises(ValueError, match=r"^mask: expected 0/1 values"):
        call(op, d, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bool_and_integer_masks_equal_the_float_mask(op, impl):
    d = make_batch()
    expected, _ = call(op, d, impl)
    for dtype in (torch.bool, torch.int64, torch.uint8):
        loss, _ = call(op, dict(d, mask=d["mask"].to(dtype)), impl)
        torch.testing.assert_close(loss, expected, msg=str(dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("name", ["old_logp", "ref_logp", "advantages", "vllm_is_ratio"])
def test_non_finite_caller_values_are_refused_by_name(name, bad, op, impl):
    d = make_batch()
    d[name] = d[name].clone()
    d[name].view(-1)[1] = bad  # a masked-in position
    with pytest.raises(ValueError, match=rf"^{name}: expected finite values, found 1 NaN/Inf"):
        call(op, d, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_old_and_ref_logps_outside_the_mask_are_not_read(impl):
    """Padding positions of the log-probs may hold anything (they never enter the loss)."""
    d = make_batch()
    expected, _ = call("fused_linear_grpo_loss", d, impl)
    off = d["mask"] == 0
    dirty = dict(d, old_logp=d["old_logp"].masked_fill(off, NAN))
    dirty["ref_logp"] = d["ref_logp"].masked_fill(off, -INF)
    loss, _ = call("fused_linear_grpo_loss", dirty, impl)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "argument, liger_name, value",
    [
        ("mask", "attention_mask", -1.0),
        ("old_logp", "old_per_token_logps", INF),
        ("ref_logp", "ref_per_token_logps", NAN),
        ("advantages", "advantages", NAN),
        ("vllm_is_ratio", "vllm_is_ratio", -INF),
    ],
)
def test_liger_module_names_its_own_arguments(impl, argument, liger_name, value):
    d = make_batch()
    d[argument] = d[argument].clone()
    d[argument].view(-1)[1] = value
    with pytest.raises(ValueError, match=rf"^{liger_name}: expected"):
        GRPOLoss(beta=0.04, impl=impl)(
            d["hidden"],
            d["weight"],
            d["targets"],
            d["mask"],
            d["advantages"],
            ref_per_token_logps=d["ref_logp"],
            old_per_token_logps=d["old_logp"],
            vllm_is_ratio=d["vllm_is_ratio"],
        )


def level_of(loss_type: str) -> str:
    return "sequence" if loss_type == "luspo" else "token"  # luspo as Liger runs it (sequence only)


@pytest.mark.parametrize("with_old", [True, False], ids=["old_logp", "on_policy"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_hidden_states_give_a_nan_loss(loss_type, impl, with_old):
    """One NaN in one masked-in row's hidden state: the loss is NaN (on-policy too, where the
    ratio is 1 whatever the log-prob: the Triton path once returned a finite loss there)."""
    d = make_batch()
    d["hidden"][1, 2, 3] = NAN
    hidden = d["hidden"].requires_grad_(True)
    del d["vllm_is_ratio"]
    if not with_old:
        del d["old_logp"]
    level = level_of(loss_type)
    loss, _ = call("fused_linear_grpo_loss", d, impl, loss_type=loss_type, importance_sampling_level=level)
    assert torch.isnan(loss), loss
    loss.backward()
    assert not torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("with_old", [True, False], ids=["old_logp", "on_policy"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_logp_gives_a_nan_loss(loss_type, impl, with_old):
    d = make_batch()
    d["logp"][0, 1] = NAN
    del d["vllm_is_ratio"]
    if not with_old:
        del d["old_logp"]
    # the Triton kernel is per token: every loss type at token level
    loss, _ = call("grpo_loss", d, impl, beta=0.0, loss_type=loss_type)
    assert torch.isnan(loss), loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "luspo"])
def test_nan_hidden_states_through_the_liger_module(loss_type, impl):
    d = make_batch()
    d["hidden"][0, 0, 0] = NAN
    level = level_of(loss_type)
    loss, _ = GRPOLoss(beta=0.0, loss_type=loss_type, importance_sampling_level=level, impl=impl)(
        d["hidden"], d["weight"], d["targets"], d["mask"], d["advantages"]
    )
    assert torch.isnan(loss), loss
