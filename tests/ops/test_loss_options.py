"""One ``LossOptions`` per call: ``options=`` and the keyword form give the same loss, conflicts are
refused by name; and the implementation choice (``dispatch.choose_impl``) follows its documented rules.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import random_packed_batch

from mgrpo_fast import LossOptions, fused_linear_grpo_loss, grpo_loss
from mgrpo_fast.ops import dispatch
from mgrpo_fast.ops.options import LossOptionFields

OPTION_SETS = [
    dict(loss_type="grpo", beta=0.04, kl_estimator="k2", delta=1.5),
    dict(loss_type="dr_grpo", max_completion_length=9, epsilon_high=0.28),
    dict(loss_type="cispo", epsilon_high=1.1),
    dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04),
]
LENGTHS = [5, 3, 7, 1]


def loss_inputs() -> dict:
    batch = random_packed_batch(LENGTHS)
    return dict(
        logp=batch["logp"].requires_grad_(True),
        old_logp=batch["old_logp"],
        ref_logp=batch["ref_logp"],
        advantages=batch["advantages"],
        mask=batch["mask"],
        cu_seqlens=batch["cu_seqlens"],
    )


def fused_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, t, h, v = 3, 5, 8, 13
    return dict(
        hidden=torch.randn(b, t, h, generator=g, dtype=torch.float64).requires_grad_(True),
        weight=torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_(True),
        targets=torch.randint(0, v, (b, t), generator=g),
        advantages=torch.randn(b, generator=g, dtype=torch.float64),
        mask=(torch.rand(b, t, generator=g) > 0.2).double(),
        old_logp=-torch.rand(b, t, generator=g, dtype=torch.float64) * 3,
        ref_logp=-torch.rand(b, t, generator=g, dtype=torch.float64) * 3,
    )


def call_grpo_loss(d: dict, **kw):
    return grpo_loss(
        d["logp"],
        d["old_logp"],
        d["ref_logp"],
        d["advantages"],
        d["mask"],
        cu_seqlens=d["cu_seqlens"],
        impl="torch",
        **kw,
    )


def call_fused(d: dict, **kw):
    return fused_linear_grpo_loss(
        d["hidden"],
        d["weight"],
        d["targets"],
        d["advantages"],
        d["mask"],
        old_logp=d["old_logp"],
        ref_logp=d["ref_logp"],
        temperature=0.7,
        impl="torch",
        **kw,
    )


def assert_same_result(a, b, params) -> None:
    (loss_a, metrics_a), (loss_b, metrics_b) = a, b
    assert torch.equal(loss_a, loss_b)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert torch.equal(metrics_a[key], metrics_b[key]), key
    grads_a = torch.autograd.grad(loss_a, params)
    grads_b = torch.autograd.grad(loss_b, params)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


@pytest.mark.parametrize("fields", OPTION_SETS, ids=lambda f: f["loss_type"] + "-" + str(len(f)))
def test_options_object_equals_keywords(fields):
    d = loss_inputs()
    by_keywords = call_grpo_loss(d, **fields)
    by_object = call_grpo_loss(d, options=LossOptions(**fields))
    assert_same_result(by_keywords, by_object, (d["logp"],))
    # a keyword that repeats the options' value is redundant, not a conflict
    both = call_grpo_loss(d, options=LossOptions(**fields), loss_type=fields["loss_type"])
    assert torch.equal(both[0], by_object[0])

    f = fused_inputs()
    params = (f["hidden"], f["weight"])
    assert_same_result(call_fused(f, **fields), call_fused(f, options=LossOptions(**fields)), params)


def test_no_options_means_the_defaults():
    d = loss_inputs()
    assert_same_result(call_grpo_loss(d), call_grpo_loss(d, options=LossOptions()), (d["logp"],))


@pytest.mark.parametrize("call", [call_grpo_loss, call_fused], ids=["grpo_loss", "fused_linear_grpo_loss"])
def test_conflicting_keyword_is_refused_by_name(call):
    d = loss_inputs() if call is call_grpo_loss else fused_inputs()
    options = LossOptions(loss_type="grpo", beta=0.04)
    with pytest.raises(ValueError, match=r"loss_type: got loss_type='dapo' and options.loss_type='grpo'"):
        call(d, options=options, loss_type="dapo")  # "dapo" is the default: passing it still conflicts
    with pytest.raises(ValueError, match="delta"):
        call(d, options=options, delta=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        call(d, epsilon=0.2)
    with pytest.raises(TypeError, match="options: expected a LossOptions"):
        call(d, options={"loss_type": "grpo"})
    with pytest.raises(ValueError, match="loss_type"):  # keywords are checked as LossOptions checks them
        call(d, loss_type="ppo")


def test_keyword_types_match_the_options():
    assert set(LossOptionFields.__annotations__) == {f.name for f in dataclasses.fields(LossOptions)}
    for fn in (grpo_loss, fused_linear_grpo_loss):
        params = inspect.signature(fn).parameters
        assert params["options"].default is None
        assert params["option_fields"].kind is inspect.Parameter.VAR_KEYWORD


# ------------------------------------------------------------------------------------------
# choose_impl: the one place that picks the implementation
# ------------------------------------------------------------------------------------------
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.fixture
def kernels_import(monkeypatch):
    """Pretend every kernel module imports (the rules, not this machine, are under test)."""
    monkeypatch.setattr(dispatch, "triton_op_status", lambda module: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize(
    ("op", "impl", "device", "dtypes", "level", "expected"),
    [
        ("linear_logprobs", "auto", CUDA, (BF16, BF16), "token", "triton"),
        ("linear_logprobs", "auto", CUDA, (F64, F64), "token", "torch"),
        ("linear_logprobs", "auto", CUDA, (BF16, F32), "token", "torch"),
        ("linear_logprobs", "auto", CPU, (F32, F32), "token", "torch"),
        ("linear_logprobs", "torch", CUDA, (F32, F32), "token", "torch"),
        ("grpo_loss", "auto", CUDA, (F32,), "token", "triton"),
        ("grpo_loss", "auto", CUDA, (F32,), "sequence", "torch"),
        ("grpo_loss", "auto", CUDA, (F64,), "token", "torch"),
        ("fused_linear_grpo_loss", "auto", CUDA, (BF16, BF16), "token", "triton"),
        ("fused_linear_grpo_loss", "auto", CUDA, (BF16, BF16), "sequence", "torch"),
        ("fused_linear_grpo_loss", "triton", CUDA, (BF16, BF16), "sequence", "torch"),  # two stages
        ("fused_linear_grpo_loss", "triton", CUDA, (F32, F32), "token", "triton"),
        ("group_advantages", "auto", CUDA, (), "token", "triton"),
        ("group_advantages", "auto", CPU, (), "token", "torch"),
    ],
)
def test_choose_impl_rules(kernels_import, op, impl, device, dtypes, level, expected):
    got = dispatch.choose_impl(op, impl, device, dtypes=dtypes, importance_sampling_level=level)
    assert got == expected


def test_choose_impl_refusals(kernels_import, monkeypatch):
    with pytest.raises(ValueError, match="impl: expected one of"):
        dispatch.choose_impl("grpo_loss", "cuda", CUDA, dtypes=(F32,))
    with pytest.raises(ValueError, match="impl: 'triton' for grpo_loss does not serve importance_sampling"):
        dispatch.choose_impl("grpo_loss", "triton", CUDA, dtypes=(F32,), importance_sampling_level="sequence")
    with pytest.raises(ValueError, match=r"impl: 'triton' for linear_logprobs does not serve dtypes"):
        dispatch.choose_impl("linear_logprobs", "triton", CUDA, dtypes=(F64, F64))
    with pytest.raises(RuntimeError, match="impl='triton' for grpo_loss: the Triton kernels need CUDA"):
        dispatch.choose_impl("grpo_loss", "triton", CPU, dtypes=(F32,))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on CPU tensors
    assert dispatch.choose_impl("grpo_loss", "triton", CPU, dtypes=(F32,)) == "triton"
    assert dispatch.choose_impl("grpo_loss", "auto", CPU, dtypes=(F32,)) == "torch"  # auto: CUDA only
    missing = {"grpo_loss": "mgrpo_fast.kernels.grpo_loss is not available (test)"}
    monkeypatch.setattr(dispatch, "triton_op_status", missing.get)
    assert dispatch.choose_impl("fused_linear_grpo_loss", "auto", CUDA, dtypes=(F32, F32)) == "torch"
    with pytest.raises(RuntimeError, match="fused_linear_grpo_loss: mgrpo_fast.kernels.grpo_loss is not"):
        dispatch.choose_impl("fused_linear_grpo_loss", "triton", CUDA, dtypes=(F32, F32))
