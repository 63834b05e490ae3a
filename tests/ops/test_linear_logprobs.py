"""`linear_logprobs` (chunked torch path) against the reference `linear_logprobs_ref`.

Covers values and gradients of logp and entropy w.r.t. hidden, weight and bias; chunk sizes;
odd shapes; temperature; padded input; `row_index`; bf16 under docs/kernels.md's tolerance rule;
the memory property (nothing of size N x V is saved for backward) and determinism.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close, assert_within_rule
from hypothesis import given
from hypothesis import strategies as st

from mgrpo_fast import linear_logprobs
from mgrpo_fast.ops.logprobs import ChunkedLinearLogprobs
from mgrpo_fast.reference import linear_logprobs_ref


def make_inputs(n, h, v, dtype, bias=True, lead=None):
    shape = (n,) if lead is None else lead
    hidden = torch.randn(*shape, h, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype)
    b = torch.randn(v, dtype=torch.float64).to(dtype) if bias else None
    targets = torch.randint(0, v, shape)
    return hidden, weight, b, targets


def grads_of(fn, hidden, weight, bias, g_logp, g_ent):
    """Value of ``fn`` -> (logp, entropy) and gradients of ``<g_logp, logp> + <g_ent, entropy>``."""
    leaves = [
        x.detach().clone().requires_grad_(True)
        for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    logp, entropy = fn(*leaves)
    grads = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), leaves)
    return logp.detach(), entropy.detach(), grads


def ours(targets, temperature=1.0, chunk_size=None, row_index=None):
    def fn(h, w, b=None):
        return linear_logprobs(
            h,
            w,
            targets,
            bias=b,
            temperature=temperature,
            return_entropy=True,
            chunk_size=chunk_size,
            row_index=row_index,
            impl="torch",
        )

    return fn


def reference(targets, temperature=1.0):
    def fn(h, w, b=None):
        logp, entropy, _ = linear_logprobs_ref(h, w, targets, bias=b, temperature=temperature)
        return logp, entropy

    return fn


def check_against_reference(n, h, v, dtype, *, bias=True, temperature=1.0, chunk_size=None, lead=None):
    hidden, weight, b, targets = make_inputs(n, h, v, dtype, bias=bias, lead=lead)
    out_shape = targets.shape
    g_logp = torch.randn(out_shape, dtype=dtype)
    g_ent = torch.randn(out_shape, dtype=dtype)
    got = grads_of(ours(targets, temperature, chunk_size), hidden, weight, b, g_logp, g_ent)
    exp = grads_of(reference(targets, temperature), hidden, weight, b, g_logp, g_ent)
    assert got[0].shape == out_shape and got[0].dtype == dtype
    assert_close(got[0], exp[0], dtype, "logp")
    assert_close(got[1], exp[1], dtype, "entropy")
    for name, a, e in zip(("hidden", "weight", "bias"), got[2], exp[2]):
        assert a.dtype == dtype, name
        assert_close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_reference(dtype, bias, temperature):
    check_against_reference(37, 16, 53, dtype, bias=bias, temperature=temperature, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "h", "v"), [(333, 72, 1001), (1, 72, 1001), (7, 5, 3)])
def test_odd_shapes(dtype, n, h, v):
    check_against_reference(n, h, v, dtype, chunk_size=64)


@pytest.mark.parametrize("chunk_size", [1, 7, 13, 1000])
def test_chunk_size_does_not_change_results(chunk_size):
    # 13 divides nothing, 1000 > N: a single block. All must match the default (one block here).
    hidden, weight, bias, targets = make_inputs(40, 12, 97, torch.float64)
    g_logp, g_ent = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    a = grads_of(ours(targets, chunk_size=chunk_size), hidden, weight, bias, g_logp, g_ent)
    b = grads_of(ours(targets), hidden, weight, bias, g_logp, g_ent)
    for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
    check_against_reference(40, 12, 97, torch.float32, chunk_size=chunk_size)


def test_padded_three_dim_input():
    check_against_reference(0, 24, 61, torch.float64, lead=(3, 5), chunk_size=4)


def test_non_contiguous_inputs():
    # TRL slices the completion part of the hidden states, hidden[:, -L - 1 : -1]: a strided view.
    targets = torch.randint(0, 31, (2, 6))
    g = torch.randn(2, 6, dtype=torch.float64)
    results = []
    for fn in (ours(targets, chunk_size=5), reference(targets)):
        full = torch.randn(2, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        w_t = torch.randn(16, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        full.requires_grad_(True)
        w_t.requires_grad_(True)
        hidden, weight = full[:, 2:-1], w_t.T  # (2, 6, 16) and (V, H) = (31, 16), both strided views
        assert not hidden.is_contiguous() and not weight.is_contiguous()
        logp, entropy = fn(hidden, weight)
        results.append(
            (logp, entropy, *torch.autograd.grad((logp * g).sum() + (entropy * g).sum(), [full, w_t]))
        )
    for a, e in zip(*results):
        assert_close(a, e, torch.float64)


def test_gradcheck_chunked_path():
    hidden, weight, bias, targets = make_inputs(6, 4, 9, torch.float64)
    leaves = tuple(x.requires_grad_(True) for x in (hidden, weight, bias))

    def f(h, w, b):
        return linear_logprobs(
            h, w, targets, bias=b, temperature=0.8, return_entropy=True, chunk_size=4, impl="torch"
        )

    assert torch.autograd.gradcheck(f, leaves)


def test_gradcheck_autograd_function_directly():
    hidden, weight, bias, targets = make_inputs(5, 3, 6, torch.float64)
    leaves = tuple(x.requires_grad_(True) for x in (hidden, weight, bias))
    f = lambda h, w, b: ChunkedLinearLogprobs.apply(h, w, b, targets, 1.3, 2)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_through_one_output_only(which):
    # The entropy gradient is optional: a loss on logp alone (or entropy alone) must still be exact.
    hidden, weight, bias, targets = make_inputs(9, 8, 31, torch.float64)
    g = torch.randn(9, dtype=torch.float64)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    logp, entropy = linear_logprobs(
        h1, weight, targets, bias=bias, return_entropy=True, chunk_size=4, impl="torch"
    )
    ((logp if which == "logp" else entropy) * g).sum().backward()
    ref_logp, ref_entropy, _ = linear_logprobs_ref(h2, weight, targets, bias=bias)
    ((ref_logp if which == "logp" else ref_entropy) * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL[torch.float64])


@given(
    n=st.integers(1, 40),
    h=st.integers(1, 20),
    v=st.integers(2, 150),
    chunk=st.integers(1, 50),
    temperature=st.floats(0.3, 3.0),
    bias=st.booleans(),
)
def test_hypothesis_shapes(n, h, v, chunk, temperature, bias):
    check_against_reference(n, h, v, torch.float64, bias=bias, temperature=temperature, chunk_size=chunk)


def test_row_index_selects_rows():
    hidden, weight, bias, targets = make_inputs(0, 8, 29, torch.float64, lead=(4, 6))
    rows = torch.tensor([22, 0, 5, 5, 13])  # unsorted, repeated, on a flattened (B*T) index
    h_sel = hidden.clone().requires_grad_(True)
    logp, entropy = linear_logprobs(
        h_sel, weight, targets, bias=bias, row_index=rows, return_entropy=True, impl="torch"
    )
    full_logp, full_entropy = linear_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=True, impl="torch"
    )
    assert logp.shape == (5,)
    torch.testing.assert_close(logp, full_logp.reshape(-1)[rows], **TOL[torch.float64])
    torch.testing.assert_close(entropy, full_entropy.reshape(-1)[rows], **TOL[torch.float64])
    (logp.sum() + entropy.sum()).backward()
    grad = h_sel.grad.reshape(24, 8)
    unselected = torch.ones(24, dtype=torch.bool)
    unselected[rows] = False
    assert grad[unselected].abs().max() == 0.0
    assert grad[rows].abs().min() > 0.0
    # the repeated row 5 accumulates twice the gradient of a single selection
    h_full = hidden.clone().requires_grad_(True)
    lp, ent, _ = linear_logprobs_ref(h_full, weight, targets, bias=bias)
    (lp.reshape(-1)[rows].sum() + ent.reshape(-1)[rows].sum()).backward()
    torch.testing.assert_close(h_sel.grad, h_full.grad, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(dtype):
    # N=333, H=72, V=1001 in bf16/fp16. "Plain torch" is the usual eager computation at that dtype:
    # logits = h @ W.T in `dtype`, then log_softmax. Our error vs the fp64 reference (on the same
    # rounded inputs) must be at most 2x plain torch's error plus a small atol.
    hidden, weight, bias, targets = make_inputs(333, 72, 1001, dtype)
    g_logp = torch.randn(333, dtype=torch.float64)
    g_ent = torch.randn(333, dtype=torch.float64)

    def plain(h, w, b):
        z = (h @ w.T + b) / 0.9
        logprobs = torch.log_softmax(z, dim=-1)
        logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return logp, entropy

    got = grads_of(ours(targets, 0.9), hidden, weight, bias, g_logp.float(), g_ent.float())
    base = grads_of(plain, hidden, weight, bias, g_logp.to(dtype), g_ent.to(dtype))
    ref = grads_of(reference(targets, 0.9), hidden.double(), weight.double(), bias.double(), g_logp, g_ent)
    assert got[0].dtype == torch.float32  # logits and outputs are kept in fp32, never rounded to bf16
    for name, a, p, r in zip(("logp", "entropy"), got[:2], base[:2], ref[:2]):
        assert_within_rule(a, p, r, dtype, name)
    for name, a, p, r in zip(("hidden", "weight", "bias"), got[2], base[2], ref[2]):
        assert a.dtype == dtype, name
        assert_within_rule(a, p, r, dtype, f"grad {name}")


def test_no_n_by_v_tensor_saved_for_backward():
    n, h, v, chunk = 64, 4, 4096, 8  # H < chunk, so even the weight (V, H) is smaller than a block
    hidden, weight, bias, targets = make_inputs(n, h, v, torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    saved: list[tuple[int, ...]] = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logp, entropy = linear_logprobs(
            hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=chunk, impl="torch"
        )
    assert saved, "the hook saw nothing: the test would prove nothing"
    biggest = max(torch.Size(s).numel() for s in saved)
    assert biggest < chunk * v, (
        f"a tensor of shape {max(saved, key=lambda s: torch.Size(s).numel())} is saved"
    )
    allowed = {(n, h), (v, h), (v,), (n,)}
    assert set(saved) <= allowed, saved
    (logp.sum() + entropy.sum()).backward()  # the saved tensors suffice for the backward
    assert hidden.grad is not None and weight.grad is not None


def test_deterministic_bit_identical():
    hidden, weight, bias, targets = make_inputs(50, 24, 300, torch.float32)
    g = torch.randn(50)

    def run():
        return grads_of(ours(targets, 0.7, chunk_size=16), hidden, weight, bias, g, g)

    a, b = run(), run()
    for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        assert torch.equal(x, y)


def test_lse_output_is_logsumexp():
    from mgrpo_fast.ops.logprobs import linear_logprobs_with_lse

    hidden, weight, bias, targets = make_inputs(11, 6, 40, torch.float64)
    _, _, lse = linear_logprobs_with_lse(
        hidden, weight, targets, bias=bias, temperature=2.0, chunk_size=3, impl="torch"
    )
    torch.testing.assert_close(
        lse, torch.logsumexp((hidden @ weight.T + bias) / 2.0, -1), **TOL[torch.float64]
    )
    assert not lse.requires_grad


def test_auto_impl_on_cpu_is_torch_path():
    hidden, weight, bias, targets = make_inputs(10, 8, 20, torch.float64)
    a = linear_logprobs(hidden, weight, targets, bias=bias, impl="auto")
    b = linear_logprobs(hidden, weight, targets, bias=bias, impl="torch")
    assert torch.equal(a, b)
