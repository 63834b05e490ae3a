"""Triton `linear_logprobs` kernels (kernels/linear_logprobs.py) against `linear_logprobs_ref` in fp64.

Runs on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, small shapes). Covers values and gradients (logp + entropy, logp only), odd
shapes (N=333, H=72, V=1001), temperature, bias, fp32 / fp16 / bf16 (docs/kernels.md rule for the
low-precision dtypes), vocab splits, chunked backward, the z stash path, determinism, bad input,
the public API, and the AOT spec table.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

triton = pytest.importorskip("triton")

from conftest import TOL, assert_within_rule  # noqa: E402

from mgrpo_fast import linear_logprobs  # noqa: E402
from mgrpo_fast.kernels import linear_logprobs as K  # noqa: E402
from mgrpo_fast.reference import linear_logprobs_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = DEVICE == "cpu"
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(n, h, v, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g).to(dtype)
    weight = (torch.randn(v, h, dtype=torch.float64, generator=g) / h**0.5).to(dtype)
    b = torch.randn(v, dtype=torch.float64, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    move = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return move(hidden), move(weight), move(b), move(targets)


def run_kernel(hidden, weight, bias, targets, temperature, g_logp, g_ent):
    """(logp, entropy, lse) and grads of <g_logp, logp> (+ <g_ent, entropy> unless g_ent is None)."""
    leaves = [
        x.detach().clone().requires_grad_(True)
        for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    b = leaves[2] if bias is not None else None
    logp, entropy, lse = K.triton_linear_logprobs(leaves[0], leaves[1], targets, b, temperature)
    loss = (logp * g_logp).sum() + ((entropy * g_ent).sum() if g_ent is not None else 0.0)
    return (logp.detach(), entropy.detach(), lse), torch.autograd.grad(loss, leaves)


def run_reference(hidden, weight, bias, targets, temperature, g_logp, g_ent):
    leaves = [
        x.detach().double().requires_grad_(True)
        for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    b = leaves[2] if bias is not None else None
    logp, entropy, lse = linear_logprobs_ref(leaves[0], leaves[1], targets, bias=b, temperature=temperature)
    loss = (logp * g_logp.double()).sum() + ((entropy * g_ent.double()).sum() if g_ent is not None else 0.0)
    return (logp.detach(), entropy.detach(), lse.detach()), torch.autograd.grad(loss, leaves)


def run_plain(hidden, weight, bias, targets, temperature, g_logp, g_ent):
    """Plain eager torch at the inputs' dtype (the baseline of the low-precision rule)."""
    leaves = [
        x.detach().clone().requires_grad_(True)
        for x in (hidden, weight) + ((bias,) if bias is not None else ())
    ]
    z = leaves[0] @ leaves[1].T
    if bias is not None:
        z = z + leaves[2]
    logprobs = torch.log_softmax(z / temperature, dim=-1)
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    lse = torch.logsumexp(z / temperature, dim=-1)
    dtype = hidden.dtype
    loss = (logp * g_logp.to(dtype)).sum() + ((entropy * g_ent.to(dtype)).sum() if g_ent is not None else 0.0)
    return (logp.detach(), entropy.detach(), lse.detach()), torch.autograd.grad(loss, leaves)


def upstream(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)


NAMES = ("logp", "entropy", "lse")
GRAD_NAMES = ("hidden", "weight", "bias")


# ------------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "h", "v", "bias", "temperature"),
    [(1, 16, 17, True, 1.0), (7, 72, 1001, False, 0.7), (333, 72, 1001, True, 1.3), (333, 16, 17, True, 0.7)],
)
def test_fp32_matches_reference(n, h, v, bias, temperature):
    hidden, weight, b, targets = make_inputs(n, h, v, torch.float32, bias=bias)
    g_logp, g_ent = upstream(n)
    got, got_grads = run_kernel(hidden, weight, b, targets, temperature, g_logp, g_ent)
    exp, exp_grads = run_reference(hidden, weight, b, targets, temperature, g_logp, g_ent)
    for name, a, e in zip(NAMES, got, exp):
        assert a.dtype == torch.float32 and a.shape == (n,), name
        torch.testing.assert_close(a.double(), e, **F32_TOL, msg=lambda m, name=name: f"{name}: {m}")
    for name, a, e in zip(GRAD_NAMES, got_grads, exp_grads):
        assert a.dtype == torch.float32, name
        # gradients are O(1) sums over many rows/columns: compare relative to their scale
        torch.testing.assert_close(
            a.double(),
            e,
            rtol=1e-5,
            atol=1e-5 * float(e.abs().max()),
            msg=lambda m, name=name: f"grad {name}: {m}",
        )


@pytest.mark.parametrize(("n", "h", "v"), [(7, 72, 1001), (1, 16, 17)])
def test_fp32_logp_only_gradient(n, h, v):
    # set_materialize_grads(False): no entropy grad -> the entropy term is skipped, still exact
    hidden, weight, b, targets = make_inputs(n, h, v, torch.float32)
    g_logp, _ = upstream(n)
    _, got = run_kernel(hidden, weight, b, targets, 0.8, g_logp, None)
    _, exp = run_reference(hidden, weight, b, targets, 0.8, g_logp, None)
    for name, a, e in zip(GRAD_NAMES, got, exp):
        torch.testing.assert_close(
            a.double(),
            e,
            rtol=1e-5,
            atol=1e-5 * float(e.abs().max()),
            msg=lambda m, name=name: f"grad {name}: {m}",
        )


@pytest.mark.parametrize(
    ("dtype", "n", "h", "v"),
    [(torch.bfloat16, 333, 72, 1001), (torch.bfloat16, 1, 16, 17), (torch.float16, 7, 72, 1001)],
)
def test_low_precision_tolerance_rule(dtype, n, h, v):
    # docs/kernels.md: |ours - fp64 ref| <= 2 |plain torch at dtype - fp64 ref| + atol(dtype), where the
    # fp64 reference runs on the same (already rounded) inputs.
    hidden, weight, b, targets = make_inputs(n, h, v, dtype)
    g_logp, g_ent = upstream(n)
    got, got_grads = run_kernel(hidden, weight, b, targets, 0.9, g_logp, g_ent)
    plain, plain_grads = run_plain(hidden, weight, b, targets, 0.9, g_logp, g_ent)
    ref, ref_grads = run_reference(hidden, weight, b, targets, 0.9, g_logp, g_ent)
    assert all(x.dtype == torch.float32 for x in got)  # logits and outputs stay fp32
    for name, a, p, r in zip(NAMES, got, plain, ref):
        assert_within_rule(a, p, r, dtype, name)
    for name, a, p, r in zip(GRAD_NAMES, got_grads, plain_grads, ref_grads):
        assert a.dtype == dtype, name
        assert_within_rule(a, p, r, dtype, f"grad {name}")


def test_large_logits_and_edge_targets():
    # logits ~ +-250 (online max rescaling must not overflow); targets in the first column, the
    # last (ragged) vocab tile and the last column
    hidden, weight, b, targets = make_inputs(40, 72, 1001, torch.float32)
    hidden = hidden * 30.0
    targets[0], targets[1], targets[-1] = 0, 1000, 1000
    targets[2] = 990
    got = K.linear_logprobs_forward(hidden, weight, targets, b, 0.5)
    exp = linear_logprobs_ref(hidden.double(), weight.double(), targets, b.double(), 0.5)
    scale = float(exp[2].abs().max())  # fp32 logits carry ~6e-8 x |z| rounding: so do all outputs
    assert scale > 100.0
    for name, a, e in zip(NAMES, got, exp):
        torch.testing.assert_close(
            a.double(), e, rtol=0, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_splits_do_not_change_values(dtype):
    # one split vs many: the (m, s, b) merge is exact up to fp32 rounding
    hidden, weight, b, targets = make_inputs(5, 16, 1001, dtype)
    cfg = K._CONFIGS[dtype]
    most = triton.cdiv(1001, cfg["BLOCK_V"])
    one = K.linear_logprobs_forward(hidden, weight, targets, b, 1.1, num_splits=1)
    many = K.linear_logprobs_forward(hidden, weight, targets, b, 1.1, num_splits=most)
    odd = K.linear_logprobs_forward(hidden, weight, targets, b, 1.1, num_splits=3)
    for name, x, y, w in zip(NAMES, one, many, odd):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(x, w, rtol=2e-6, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_backward_matches_one_chunk():
    hidden, weight, b, targets = make_inputs(150, 16, 300, torch.float32)
    logp, entropy, lse = K.linear_logprobs_forward(hidden, weight, targets, b, 0.9)
    g_logp, g_ent = upstream(150)
    whole = K.linear_logprobs_backward(hidden, weight, b, targets, lse, entropy, g_logp, g_ent, 0.9)
    chunks = K.linear_logprobs_backward(
        hidden, weight, b, targets, lse, entropy, g_logp, g_ent, 0.9, chunk_rows=64
    )
    for name, x, y in zip(GRAD_NAMES, whole, chunks):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"grad {name}: {m}")
    assert K.default_chunk_rows(1001, torch.bfloat16) % K._CONFIGS[torch.bfloat16]["BLOCK_M"] == 0
    # a ~1 GiB bf16 block at a 152k vocab
    rows = K.default_chunk_rows(152064, torch.bfloat16)
    assert rows * 152064 * 2 <= (1 << 30) and rows >= K._CONFIGS[torch.bfloat16]["BLOCK_M"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stash_path_equals_recompute(dtype):
    n, h, v = 70, 24, 300
    hidden, weight, b, targets = make_inputs(n, h, v, dtype)
    stash = torch.empty((n, v), dtype=torch.float32, device=DEVICE)
    with_stash = K.linear_logprobs_forward(hidden, weight, targets, b, 0.8, stash=stash)
    without = K.linear_logprobs_forward(hidden, weight, targets, b, 0.8)
    for x, y in zip(with_stash, without):
        assert torch.equal(x, y)
    z_ref = (hidden.double() @ weight.double().T + b.double()) / 0.8
    torch.testing.assert_close(stash.double(), z_ref, rtol=1e-5, atol=1e-5)
    logp, entropy, lse = with_stash
    g_logp, g_ent = upstream(n)
    for gl, ge in ((g_logp, g_ent), (g_logp, None), (None, g_ent)):
        a = K.dlogits(hidden, weight, b, targets, lse, entropy, gl, ge, 0.8)
        s = K.dlogits(hidden, weight, b, targets, lse, entropy, gl, ge, 0.8, stash=stash)
        assert a.dtype == dtype and a.shape == (n, v)
        if INTERPRETING:  # same dot loop, same tiles: bit-identical
            assert torch.equal(a, s)
        else:
            torch.testing.assert_close(a, s, **TOL[torch.float32])


def test_deterministic_bit_identical():
    hidden, weight, b, targets = make_inputs(100, 40, 300, torch.float32)
    g_logp, g_ent = upstream(100)
    a = run_kernel(hidden, weight, b, targets, 0.7, g_logp, g_ent)
    c = run_kernel(hidden, weight, b, targets, 0.7, g_logp, g_ent)
    for x, y in zip((*a[0], *a[1]), (*c[0], *c[1])):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------
# Public API, edge cases, bad input
# ------------------------------------------------------------------------------------------------
def test_public_api_uses_kernel(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return entry(*args)

    entry = K.triton_linear_logprobs
    monkeypatch.setattr(K, "triton_linear_logprobs", spy)
    hidden, weight, b, targets = make_inputs(12, 16, 97, torch.float32)
    hidden = hidden.reshape(3, 4, 16).requires_grad_(True)
    targets = targets.reshape(3, 4)
    logp, entropy = linear_logprobs(
        hidden, weight, targets, bias=b, temperature=0.6, return_entropy=True, impl="triton"
    )
    assert logp.shape == (3, 4) and entropy.shape == (3, 4)
    ref_logp, ref_entropy, _ = linear_logprobs_ref(hidden.double(), weight.double(), targets, b.double(), 0.6)
    torch.testing.assert_close(logp.double(), ref_logp, **F32_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, **F32_TOL)
    assert len(calls) == 1  # mgrpo_fast.linear_logprobs(impl="triton") went through the kernel entry point
    (logp.sum() + entropy.sum()).backward()
    h_ref = hidden.detach().double().requires_grad_(True)
    lp, en, _ = linear_logprobs_ref(h_ref, weight.double(), targets, b.double(), 0.6)
    (lp.sum() + en.sum()).backward()
    torch.testing.assert_close(hidden.grad.double(), h_ref.grad, rtol=1e-5, atol=1e-6)
    # row_index goes through the same entry point
    rows = torch.tensor([5, 0, 11], device=DEVICE)
    sel = linear_logprobs(
        hidden.detach(), weight, targets, bias=b, temperature=0.6, row_index=rows, impl="triton"
    )
    torch.testing.assert_close(sel, logp.detach().reshape(-1)[rows])


def test_zero_rows():
    hidden, weight, b, targets = make_inputs(0, 16, 17, torch.float32)
    g = torch.zeros(0, device=DEVICE)
    (logp, entropy, lse), grads = run_kernel(hidden, weight, b, targets, 1.0, g, g)
    assert logp.shape == entropy.shape == lse.shape == (0,)
    assert (
        grads[0].shape == (0, 16)
        and float(grads[1].abs().sum()) == 0.0
        and float(grads[2].abs().sum()) == 0.0
    )


def test_non_contiguous_inputs():
    hidden, weight, b, targets = make_inputs(9, 24, 50, torch.float32)
    wide = torch.zeros(9, 48, device=DEVICE)
    wide[:, ::2] = hidden  # unit-stride violation: the launcher makes it contiguous
    got = K.linear_logprobs_forward(wide[:, ::2], weight.T.contiguous().T, targets, b, 1.0)
    exp = linear_logprobs_ref(hidden.double(), weight.double(), targets, b.double(), 1.0)
    for x, y in zip(got, exp):
        torch.testing.assert_close(x.double(), y, **F32_TOL)


def test_bad_input_is_rejected():
    hidden, weight, b, targets = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="same dtype|share one dtype"):
        K.triton_linear_logprobs(hidden.double(), weight.double(), targets, b, 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        K.triton_linear_logprobs(hidden.bfloat16(), weight, targets, b, 1.0)
    with pytest.raises(ValueError, match="targets"):
        K.triton_linear_logprobs(hidden, weight, targets[:3], b, 1.0)
    with pytest.raises(ValueError, match="stash"):
        K.linear_logprobs_forward(hidden, weight, targets, b, 1.0, stash=torch.empty(4, 9, device=DEVICE))


# ------------------------------------------------------------------------------------------------
# AOT specs: cover every launch the launchers can make, and match the kernels' signatures
# ------------------------------------------------------------------------------------------------
def test_aot_specs_cover_launcher_choices():
    specs = K.aot_specs()
    assert len({s.name for s in specs}) == len(specs)
    for spec in specs:
        args = list(inspect.signature(spec.kernel.fn).parameters)
        assert list(spec.signature) == args, spec.name
        assert all(spec.signature[k] == "constexpr" for k in spec.constexprs), spec.name
        assert spec.constexprs.get("DOT_UPCAST", False) is False, spec.name
    keys = {
        (
            s.kernel.fn.__name__,
            s.signature.get("h_ptr"),
            tuple(sorted(s.constexprs.items())),
            s.num_warps,
            s.num_stages,
        )
        for s in specs
    }
    for dtype, cfg in K._CONFIGS.items():
        ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K")}
        opts = (cfg["num_warps"], cfg["num_stages"])
        for has_bias in (False, True):
            for store_z in (False, True):
                c = dict(HAS_BIAS=has_bias, STORE_Z=store_z, DOT_UPCAST=False, **blocks)
                assert ("_logits_stats_kernel", ptr, tuple(sorted(c.items())), *opts) in keys
        for recompute, has_bias in ((True, False), (True, True), (False, False)):
            for gl, ge in ((True, True), (True, False), (False, True)):
                c = dict(
                    HAS_GRAD_LOGP=gl,
                    HAS_GRAD_ENT=ge,
                    HAS_BIAS=has_bias,
                    RECOMPUTE=recompute,
                    DOT_UPCAST=False,
                    GROUP_M=cfg["GROUP_M"],
                    **blocks,
                )
                assert ("_dlogits_kernel", ptr, tuple(sorted(c.items())), *opts) in keys
    assert any(s.kernel.fn.__name__ == "_combine_stats_kernel" for s in specs)


# ------------------------------------------------------------------------------------------------
# torch.library ops: fake impls, and torch.compile(fullgraph=True) through the autograd.Function
# ------------------------------------------------------------------------------------------------
def test_library_ops_opcheck():
    hidden, weight, b, targets = make_inputs(9, 16, 40, torch.float32)
    logp, entropy, lse = K.linear_logprobs_forward(hidden, weight, targets, b, 0.8)
    g_logp, g_ent = upstream(9)
    torch.library.opcheck(K._fwd_op, (hidden, weight, targets, b, 0.8))
    torch.library.opcheck(
        K._bwd_op, (hidden, weight, b, targets, lse, entropy, g_logp, g_ent, 0.8, [True, True, True])
    )
    torch.library.opcheck(
        K._bwd_op, (hidden, weight, None, targets, lse, entropy, g_logp, None, 0.8, [True, False, False])
    )


def test_torch_compile_fullgraph():
    hidden, weight, b, targets = make_inputs(10, 16, 50, torch.float32)
    g_logp, g_ent = upstream(10)

    def loss(h, w, bias):
        logp, entropy, _ = K.triton_linear_logprobs(h, w, targets, bias, 0.7)
        return (logp * g_logp).sum() + (entropy * g_ent).sum()

    # aot_eager: traces the graph (dynamo + AOT autograd with the fake impls) without needing a
    # C++/GPU toolchain for Inductor's own codegen
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, b)]
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    exp = loss(*leaves)
    exp_grads = torch.autograd.grad(exp, leaves)
    torch.testing.assert_close(got, exp)
    for x, y in zip(got_grads, exp_grads):
        torch.testing.assert_close(x, y)
