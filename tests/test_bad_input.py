"""docs/troubleshooting.md: every bad input gets a precise error that names the argument.

Each case asserts the exception type (TypeError for a wrong type/dtype, ValueError for a wrong
shape/value/range, RuntimeError for an unavailable implementation) and that the message names
the offending argument.
"""

from __future__ import annotations

import pytest
import torch

from mgrpo_fast import (
    GRPOLoss,
    LossOptions,
    fused_linear_grpo_loss,
    group_advantages,
    grpo_loss,
    linear_logprobs,
)
from mgrpo_fast.ops import dispatch as dispatch

N, H, V = 6, 4, 11


def lp_inputs():
    return dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (N,)))


def call_linear_logprobs(**over):
    kw = {**lp_inputs(), **over}
    return linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), **kw)


@pytest.mark.parametrize(
    ("over", "exc", "name"),
    [
        ({"hidden": torch.ones(N, H, dtype=torch.int64)}, TypeError, "hidden"),
        ({"weight": torch.ones(V, H, dtype=torch.int32)}, TypeError, "weight"),
        ({"targets": torch.zeros(N)}, TypeError, "targets"),
        ({"hidden": torch.randn(N, H + 1)}, ValueError, "hidden"),
        ({"weight": torch.randn(V, H, 1)}, ValueError, "weight"),
        ({"targets": torch.zeros(N + 1, dtype=torch.long)}, ValueError, "targets"),
        ({"targets": torch.full((N,), V)}, ValueError, "targets"),
        ({"targets": torch.full((N,), -1)}, ValueError, "targets"),
        ({"targets": torch.full((N,), -100)}, ValueError, "targets"),
        ({"bias": torch.randn(V + 1)}, ValueError, "bias"),
        ({"bias": torch.ones(V, dtype=torch.int64)}, TypeError, "bias"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"row_index": torch.tensor([0, N])}, ValueError, "row_index"),
        ({"row_index": torch.tensor([-1])}, ValueError, "row_index"),
        ({"row_index": torch.tensor([0.0, 1.0])}, TypeError, "row_index"),
        ({"impl": "cuda"}, ValueError, "impl"),
    ],
    ids=lambda x: None if isinstance(x, dict) else str(x),
)
def test_linear_logprobs_errors(over, exc, name):
    with pytest.raises(exc, match=name):
        call_linear_logprobs(**over)


def test_linear_logprobs_row_index_skips_bad_targets_elsewhere():
    # Only selected rows are validated: ignore_index (-100) in unselected rows is fine.
    targets = torch.randint(0, V, (N,))
    targets[1] = -100
    logp = linear_logprobs(torch.randn(N, H), torch.randn(V, H), targets, row_index=torch.tensor([0, 2]))
    assert logp.shape == (2,)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(torch.randn(N, H), torch.randn(V, H), targets, row_index=torch.tensor([1]))


# ------------------------------------------------------------------------------------------
# grpo_loss (and the option checks shared through LossOptions)
# ------------------------------------------------------------------------------------------
B, T = 3, 4


def loss_inputs():
    return dict(
        logp=-torch.rand(B, T),
        old_logp=-torch.rand(B, T),
        ref_logp=-torch.rand(B, T),
        advantages=torch.randn(B),
        mask=torch.ones(B, T),
    )


def call_grpo_loss(**over):
    kw = {**loss_inputs(), **over}
    return grpo_loss(
        kw.pop("logp"), kw.pop("old_logp"), kw.pop("ref_logp"), kw.pop("advantages"), kw.pop("mask"), **kw
    )


PACKED_CU = torch.tensor([0, 5, 5, 12], dtype=torch.int32)


def packed(**over):
    base = dict(
        logp=-torch.rand(12),
        old_logp=None,
        ref_logp=None,
        advantages=torch.randn(3),
        mask=torch.ones(12),
        cu_seqlens=PACKED_CU,
    )
    return {**base, **over}


OPTION_ERRORS = [
    ({"loss_type": "ppo"}, "loss_type"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"importance_sampling_level": "batch"}, "importance_sampling_level"),
    # bounds are TRL's: any finite number where the formula is defined
    ({"delta": float("nan")}, "delta"),
    ({"delta": "2"}, "delta"),
    ({"epsilon_low": float("inf")}, "epsilon_low"),
    ({"epsilon_high": None}, "epsilon_high"),
    ({"beta": float("-inf")}, "beta"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
    ({"max_completion_length": 0}, "max_completion_length"),
]


@pytest.mark.parametrize(("over", "name"), OPTION_ERRORS, ids=[n for _, n in OPTION_ERRORS])
def test_loss_option_errors(over, name):
    with pytest.raises(ValueError, match=name):
        LossOptions(**over)
    with pytest.raises(ValueError, match=name):
        call_grpo_loss(**over)


@pytest.mark.parametrize(
    ("over", "exc", "name"),
    [
        ({"logp": torch.ones(B, T, dtype=torch.int64)}, TypeError, "logp"),
        ({"logp": -torch.rand(B, T, 2)}, ValueError, "logp"),
        ({"old_logp": -torch.rand(B, T + 1)}, ValueError, "old_logp"),
        ({"old_logp": torch.ones(B, T, dtype=torch.int64)}, TypeError, "old_logp"),
        ({"ref_logp": -torch.rand(B + 1, T)}, ValueError, "ref_logp"),
        ({"entropy": torch.rand(T)}, ValueError, "entropy"),
        ({"advantages": torch.randn(B + 1)}, ValueError, "advantages"),
        ({"advantages": torch.randn(B, T + 1)}, ValueError, "advantages"),
        ({"advantages": torch.ones(B, dtype=torch.int64)}, TypeError, "advantages"),
        ({"advantages": torch.tensor([0.0, float("nan"), 1.0])}, ValueError, "advantages"),
        ({"advantages": torch.tensor([0.0, float("inf"), 1.0])}, ValueError, "advantages"),
        ({"mask": torch.ones(B, T + 1)}, ValueError, "mask"),
        ({"mask": torch.full((B, T), float("nan"))}, ValueError, "mask"),
        ({"ref_logp": None, "beta": 0.04}, ValueError, "ref_logp"),
    ],
    ids=lambda x: None if isinstance(x, dict) else str(x),
)
def test_grpo_loss_errors(over, exc, name):
    with pytest.raises(exc, match=name):
        call_grpo_loss(**over)


@pytest.mark.parametrize(
    ("over", "exc", "name"),
    [
        (
            {"cu_seqlens": torch.tensor([0, 7, 5, 12], dtype=torch.int32)},
            ValueError,
            "cu_seqlens",
        ),  # decreasing
        ({"cu_seqlens": torch.tensor([1, 5, 12], dtype=torch.int32)}, ValueError, "cu_seqlens"),  # not from 0
        ({"cu_seqlens": torch.tensor([0, 5, 11], dtype=torch.int32)}, ValueError, "cu_seqlens"),  # not to N
        ({"cu_seqlens": torch.tensor([0, 5, 13], dtype=torch.int32)}, ValueError, "cu_seqlens"),
        ({"cu_seqlens": torch.tensor([], dtype=torch.int32)}, ValueError, "cu_seqlens"),
        ({"cu_seqlens": torch.tensor([0.0, 12.0])}, TypeError, "cu_seqlens"),
        ({"cu_seqlens": torch.tensor([[0, 12]], dtype=torch.int32)}, ValueError, "cu_seqlens"),
        ({"cu_seqlens": [0, 12]}, TypeError, "cu_seqlens"),
        ({"logp": -torch.rand(3, 4)}, ValueError, "logp"),  # packed layout needs (N,)
        ({"advantages": torch.randn(4)}, ValueError, "advantages"),  # neither (S,) nor (N,)
        ({"mask": torch.ones(11)}, ValueError, "mask"),
    ],
    ids=lambda x: None if isinstance(x, dict) else str(x),
)
def test_grpo_loss_packed_errors(over, exc, name):
    kw = packed(**over)
    with pytest.raises(exc, match=name):
        grpo_loss(
            kw.pop("logp"), kw.pop("old_logp"), kw.pop("ref_logp"), kw.pop("advantages"), kw.pop("mask"), **kw
        )


def test_padded_logp_needs_two_dims_without_cu_seqlens():
    with pytest.raises(ValueError, match="logp"):
        grpo_loss(-torch.rand(12), None, None, torch.randn(3), torch.ones(12))


# ------------------------------------------------------------------------------------------
# fused_linear_grpo_loss
# ------------------------------------------------------------------------------------------
def fused_inputs():
    mask = torch.ones(B, T)
    mask[:, 0] = 0  # prompt position: its target is ignore_index
    targets = torch.randint(0, V, (B, T)).masked_fill(mask == 0, -100)
    return dict(
        hidden=torch.randn(B, T, H),
        weight=torch.randn(V, H),
        targets=targets,
        advantages=torch.randn(B),
        mask=mask,
    )


def call_fused(**over):
    kw = {**fused_inputs(), **over}
    return fused_linear_grpo_loss(
        kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), kw.pop("advantages"), kw.pop("mask"), **kw
    )


def test_fused_accepts_ignore_index_in_masked_rows():
    loss, _ = call_fused()
    assert torch.isfinite(loss)


def _targets_with(value, row):
    t = fused_inputs()["targets"].clone()
    t[row] = value
    return t


@pytest.mark.parametrize(
    ("over", "exc", "name"),
    [
        ({"hidden": torch.ones(B, T, H, dtype=torch.int64)}, TypeError, "hidden"),
        ({"hidden": torch.randn(B, T + 1, H)}, ValueError, "hidden"),
        ({"hidden": torch.randn(B * T, H)}, ValueError, "hidden"),
        ({"weight": torch.randn(V, H + 2)}, ValueError, "hidden|weight"),
        ({"targets": torch.zeros(B, T)}, TypeError, "targets"),
        ({"targets": _targets_with(V, (0, 1))}, ValueError, "targets"),  # masked in, out of range
        ({"targets": _targets_with(-100, (2, 3))}, ValueError, "targets"),
        ({"bias": torch.randn(V - 1)}, ValueError, "bias"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"old_logp": -torch.rand(B, T + 1)}, ValueError, "old_logp"),
        ({"ref_logp": -torch.rand(B)}, ValueError, "ref_logp"),
        ({"beta": 0.04}, ValueError, "ref_logp"),
        ({"advantages": torch.tensor([1.0, float("nan"), 0.0])}, ValueError, "advantages"),
        ({"loss_type": "grpo2"}, ValueError, "loss_type"),
        ({"kl_estimator": "k0"}, ValueError, "kl_estimator"),
        ({"importance_sampling_level": "seq"}, ValueError, "importance_sampling_level"),
        ({"delta": float("nan")}, ValueError, "delta"),
        ({"epsilon_low": float("inf")}, ValueError, "epsilon_low"),
        ({"impl": "fast"}, ValueError, "impl"),
        ({"mask": torch.ones(B, T + 1)}, ValueError, "mask"),
    ],
    ids=lambda x: None if isinstance(x, dict) else str(x),
)
def test_fused_errors(over, exc, name):
    with pytest.raises(exc, match=name):
        call_fused(**over)


def test_fused_packed_cu_seqlens_errors():
    hidden, weight = torch.randn(12, H), torch.randn(V, H)
    targets, adv = torch.randint(0, V, (12,)), torch.randn(2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_grpo_loss(
            hidden, weight, targets, adv, cu_seqlens=torch.tensor([0, 8, 6], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_linear_grpo_loss(
            hidden, weight, targets, adv, cu_seqlens=torch.tensor([0, 6, 10], dtype=torch.int32)
        )


def call_triton(op):
    if op == "linear_logprobs":
        return call_linear_logprobs(impl="triton")
    if op == "advantages":
        return group_advantages(torch.randn(4), torch.zeros(4, dtype=torch.long), impl="triton")
    f = fused_inputs()
    return fused_linear_grpo_loss(
        f["hidden"], f["weight"], f["targets"], f["advantages"], f["mask"], impl="triton"
    )


TRITON_OPS = ["linear_logprobs", "advantages", "fused_linear_grpo_loss"]


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_impl_unavailable_is_runtime_error(op, monkeypatch):
    # Whatever this machine has, pretend the kernel module cannot be imported (no triton, or a
    # build without kernels): impl="triton" must refuse with a RuntimeError naming `impl`.
    monkeypatch.setattr(
        dispatch, "triton_op_status", lambda name: f"mgrpo_fast.kernels.{name} missing (test)"
    )
    with pytest.raises(RuntimeError, match="impl"):
        call_triton(op)


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_impl_on_cpu_tensors_is_runtime_error(op, monkeypatch):
    # CPU tensors without TRITON_INTERPRET=1: the Triton path is just as unavailable as without
    # triton installed, so it must fail the same way (RuntimeError naming `impl`, not a ValueError
    # about the tensors, which are fine for impl="torch"). The CPU test session runs the kernels
    # under the interpreter, so switch it off for this check (read at call time).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl"):
        call_triton(op)


# ------------------------------------------------------------------------------------------
# group_advantages
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rewards", "groups", "kwargs", "exc", "name"),
    [
        (torch.ones(4, dtype=torch.int64), torch.zeros(4, dtype=torch.long), {}, TypeError, "rewards"),
        (torch.ones(4), torch.zeros(4), {}, TypeError, "group_index"),
        (torch.ones(4), torch.zeros(5, dtype=torch.long), {}, ValueError, "group_index"),
        (torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long), {}, ValueError, "rewards"),
        (torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), {}, ValueError, "rewards"),
        (torch.tensor([1.0, float("-inf")]), torch.zeros(2, dtype=torch.long), {}, ValueError, "rewards"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), {"scale": "std"}, ValueError, "scale"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), {"eps": -1e-6}, ValueError, "eps"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), {"impl": "numpy"}, ValueError, "impl"),
    ],
)
def test_group_advantages_errors(rewards, groups, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        group_advantages(rewards, groups, **kwargs)


# ------------------------------------------------------------------------------------------
# GRPOLoss (the Liger drop-in): errors name Liger's argument names
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("over", "name"), OPTION_ERRORS, ids=[n for _, n in OPTION_ERRORS])
def test_grpo_module_constructor_errors(over, name):
    with pytest.raises(ValueError, match=name):
        GRPOLoss(**over)


def module_args():
    f = fused_inputs()
    return dict(
        _input=f["hidden"],
        lin_weight=f["weight"],
        selected_token_ids=f["targets"],
        attention_mask=f["mask"],
        advantages=f["advantages"],
    )


def test_grpo_module_ref_input_without_ref_weight():
    with pytest.raises(ValueError, match="ref_weight"):
        GRPOLoss(beta=0.04)(**module_args(), ref_input=torch.randn(B, T, H))


def test_grpo_module_bad_temperature_at_forward():
    with pytest.raises(ValueError, match="temperature"):
        GRPOLoss(beta=0.0, temperature=0.0)(**module_args())


@pytest.mark.parametrize(
    ("over", "beta", "exc", "name"),
    [
        ({}, 0.04, ValueError, "ref_per_token_logps"),  # beta != 0 and no reference log-probs at all
        ({"selected_token_ids": torch.zeros(B, T)}, 0.0, TypeError, "selected_token_ids"),
        ({"_input": torch.randn(B, T, H + 1)}, 0.0, ValueError, "_input|lin_weight"),
        ({"attention_mask": torch.ones(B, T + 1)}, 0.0, ValueError, "attention_mask"),
        ({"old_per_token_logps": -torch.rand(B, T + 1)}, 0.0, ValueError, "old_per_token_logps"),
    ],
    ids=["no_ref", "float_ids", "hidden_width", "mask_shape", "old_shape"],
)
def test_grpo_module_errors_name_liger_arguments(over, beta, exc, name):
    # A Liger/TRL user passes `ref_per_token_logps`, `selected_token_ids`, ...: an error that names
    # the functional API's `ref_logp` / `targets` points at an argument they never wrote.
    with pytest.raises(exc, match=name):
        GRPOLoss(beta=beta)(**{**module_args(), **over})
