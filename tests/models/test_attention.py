"""``mgrpo_fast.models.attention``: packed (varlen) attention against an explicit per-segment reference.

The reference is written out here (fp64 softmax over each segment, GQA by ``h // n_rep``, sliding
window ``i - W < j <= i``), independent of the code under test. The FlashAttention backends cannot
run on CPU; their argument adaptation (window convention, GQA, scale, head-dim padding, the torch
2.10 / 2.11+ signatures) is checked on CPU through fakes with the real functions' semantics, and
on CUDA against the real kernels (skipped without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from mgrpo_fast.models import attention as attn  # noqa: E402
from mgrpo_fast.models.attention import (
    ATTN_IMPLEMENTATION,
    Packing,
    packed_attention_forward,
    packed_attention_mask,
    select_backend,
    varlen_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Reference and inputs
# --------------------------------------------------------------------------------------------
def reference_attention(q, k, v, lengths, *, causal=True, scale=None, window=None):
    """Per segment, explicit fp64 softmax. ``window``: ``(left, right)``, -1 unbounded (flash convention)."""
    n_rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if window is None:
        window = (-1, 0) if causal else (-1, -1)
    left, right = window
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].double().transpose(0, 1) for x in (q, k, v))  # (H, n, D)
        ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
        s = qs @ ks.transpose(1, 2) * scale
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(n, device=q.device)[None, :]
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if left >= 0:
            keep &= (i - j) <= left
        if right >= 0:
            keep &= (j - i) <= right
        s = s.masked_fill(~keep, float("-inf"))
        outs.append((s.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs, 0) if outs else q.new_zeros((0, q.shape[1], v.shape[-1])).double()


def window_of(causal, sliding):
    left = -1 if sliding is None else sliding - 1
    return (left, 0) if causal else (left, left)


LENGTHS = [1, 0, 5, 17, 2, 40, 9]


def qkv(lengths=LENGTHS, hq=6, hkv=2, d=24, dv=None, dtype=torch.float64, requires_grad=False):
    t = sum(lengths)
    q = torch.randn(t, hq, d, dtype=dtype)
    k = torch.randn(t, hkv, d, dtype=dtype)
    v = torch.randn(t, hkv, dv or d, dtype=dtype)
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v


def cu_of(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def test_registered_in_transformers_interfaces():
    assert ATTN_IMPLEMENTATION == "mgrpo_packed"
    assert AttentionInterface()[ATTN_IMPLEMENTATION] is packed_attention_forward
    assert AttentionMaskInterface()[ATTN_IMPLEMENTATION] is packed_attention_mask


def test_mask_function_builds_no_mask_and_refuses_padding():
    assert packed_attention_mask(1, 8, 8, attention_mask=None) is None
    assert packed_attention_mask(2, 8, 8, attention_mask=torch.ones(2, 8, dtype=torch.bool)) is None
    padded = torch.ones(2, 8, dtype=torch.bool)
    padded[1, 6:] = False
    with pytest.raises(ValueError, match="padding"):
        packed_attention_mask(2, 8, 8, attention_mask=padded)


# --------------------------------------------------------------------------------------------
# SDPA per segment (the CPU backend) against the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sliding", [None, 1, 7, 64])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4), (3, 1)])
def test_sdpa_backend_matches_reference_fp64(causal, sliding, hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv, requires_grad=True)
    scale = 0.37
    out = varlen_attention(q, k, v, cu_of(LENGTHS), causal=causal, scale=scale, sliding_window=sliding)
    ref = reference_attention(q, k, v, LENGTHS, causal=causal, scale=scale, window=window_of(causal, sliding))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("waste", [0.0, 1e9])  # 0: one SDPA call per segment; 1e9: the padded single call
def test_sdpa_padded_and_per_segment_paths_match_reference(monkeypatch, waste):
    monkeypatch.setattr(attn, "PADDED_ATTENTION_MAX_WASTE", waste)
    lengths = [5, 0, 1, 9, 3]  # an empty and a one-token segment
    q, k, v = qkv(hq=6, hkv=2, lengths=lengths, requires_grad=True)
    assert attn._padded_eligible(lengths, True, None, None) == (waste > 0)
    out = varlen_attention(q, k, v, cu_of(lengths), scale=0.37)
    ref = reference_attention(q, k, v, lengths, scale=0.37)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_padded_path_only_where_it_is_exact_and_cheap():
    assert not attn._padded_eligible([4, 4], False, None, None)  # bidirectional: padded keys visible
    assert not attn._padded_eligible([4, 4], True, 2, None)  # sliding window: per segment
    assert not attn._padded_eligible([1000] + [10] * 50, True, None, None)  # padding waste > 4x
    assert attn._padded_eligible([40, 120, 194, 77], True, None, None)


def test_sdpa_backend_fp32_value_head_dim_and_default_scale():
    q, k, v = qkv(hq=4, hkv=2, d=16, dv=12, dtype=torch.float32)
    out = varlen_attention(q, k, v, cu_of(LENGTHS))
    assert out.shape == (sum(LENGTHS), 4, 12) and out.dtype == torch.float32
    ref = reference_attention(q, k, v, LENGTHS, scale=1 / math.sqrt(16))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_no_leakage_between_segments():
    q, k, v = qkv()
    out = varlen_attention(q, k, v, cu_of(LENGTHS), sliding_window=5)
    seg = slice(sum(LENGTHS[:3]), sum(LENGTHS[:4]))  # the 17-token segment
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[seg] = torch.randn_like(x[seg]) * 10
    out2 = varlen_attention(q2, k2, v2, cu_of(LENGTHS), sliding_window=5)
    keep = torch.ones(sum(LENGTHS), dtype=torch.bool)
    keep[seg] = False
    assert torch.equal(out[keep], out2[keep])
    assert not torch.equal(out[seg], out2[seg])


def test_varlen_attention_rejects_bad_inputs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="boundaries"):
        varlen_attention(q, k, v, torch.tensor([0, 5, sum(LENGTHS) + 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="boundaries"):
        varlen_attention(q, k, v, torch.tensor([0, 9, 5, sum(LENGTHS)], dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        varlen_attention(q, k, v, torch.tensor([0.0, float(sum(LENGTHS))]))
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q[:, :5], k, v, cu_of(LENGTHS))
    with pytest.raises(ValueError, match=r"\(T, H, D\)"):
        varlen_attention(q[None], k, v, cu_of(LENGTHS))


# --------------------------------------------------------------------------------------------
# The transformers interface function: layout and where the packing comes from
# --------------------------------------------------------------------------------------------
class _Module(torch.nn.Module):
    is_causal = True

    def __init__(self, sliding_window=None):
        super().__init__()
        self.sliding_window = sliding_window


def _hf_layout(q, k, v, batch=1):
    """(T, H, D) -> (B, H, T/B, D) as the model passes them."""
    return tuple(x.reshape(batch, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))


@pytest.mark.parametrize("source", ["cu_seq_lens", "position_ids"])
def test_interface_function_reads_packing_from_kwargs(source):
    lengths = [3, 1, 12, 7]  # no empty sequence: position_ids cannot express one
    q, k, v = qkv(lengths)
    query, key, value = _hf_layout(q, k, v)
    cu = cu_of(lengths)
    if source == "cu_seq_lens":
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 12, "max_length_k": 12}
    else:
        kwargs = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    out, weights = packed_attention_forward(_Module(4), query, key, value, None, scaling=0.2, **kwargs)
    assert weights is None and out.shape == (1, sum(lengths), 6, 24)
    ref = reference_attention(q, k, v, lengths, scale=0.2, window=(3, 0))
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)


def test_interface_function_batch_rows_are_sequences_without_packing_info():
    q, k, v = qkv([10, 10, 10])
    query, key, value = _hf_layout(q, k, v, batch=3)
    out, _ = packed_attention_forward(_Module(), query, key, value, None)
    ref = reference_attention(q, k, v, [10, 10, 10])
    torch.testing.assert_close(out.reshape(30, 6, 24), ref, rtol=1e-10, atol=1e-10)
    # Positions that do not restart across rows still split at every row start.
    pos = torch.arange(10)[None].expand(3, 10)
    out2, _ = packed_attention_forward(_Module(), query, key, value, None, position_ids=pos)
    assert torch.equal(out, out2)


def test_interface_function_is_causal_false():
    q, k, v = qkv([6, 9])
    query, key, value = _hf_layout(q, k, v)
    cu = cu_of([6, 9])
    out, _ = packed_attention_forward(_Module(), query, key, value, None, is_causal=False, cu_seq_lens_q=cu)
    ref = reference_attention(q, k, v, [6, 9], causal=False)
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)


def test_interface_function_errors():
    q, k, v = qkv([4, 4])
    query, key, value = _hf_layout(q, k, v)
    with pytest.raises(ValueError, match="mask"):
        packed_attention_forward(_Module(), query, key, value, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="use_cache=False"):
        packed_attention_forward(_Module(), query[:, :, :1], key, value, None)
    with pytest.raises(ValueError, match="max_length_q"):
        packed_attention_forward(
            _Module(), query, key, value, None, cu_seq_lens_q=torch.tensor([0, 2, 8]), max_length_q=3
        )
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        packed_attention_forward(
            _Module(), query, key, value, None,
            cu_seq_lens_q=torch.tensor([0, 4, 8]), cu_seq_lens_k=torch.tensor([0, 3, 8]),
        )  # fmt: skip
    with pytest.raises(NotImplementedError, match="sinks"):
        packed_attention_forward(_Module(), query, key, value, None, s_aux=torch.zeros(6))


def test_packing_cache_follows_in_place_changes():
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    p1 = attn.resolve_packing(1, 8, torch.device("cpu"), {"cu_seq_lens_q": cu})
    assert p1.bounds == [0, 4, 8] and p1.max_seqlen == 4
    assert attn.resolve_packing(1, 8, torch.device("cpu"), {"cu_seq_lens_q": cu}) is p1  # cached
    cu[1] = 6
    p2 = attn.resolve_packing(1, 8, torch.device("cpu"), {"cu_seq_lens_q": cu})
    assert p2.bounds == [0, 6, 8] and p2.max_seqlen == 6


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------
def test_backend_selection_on_cpu(monkeypatch):
    q = torch.randn(4, 2, 8)
    assert select_backend(q, head_dim=8) == "sdpa"
    with pytest.raises(RuntimeError, match="flash_attn"):
        select_backend(q, head_dim=8, backend="flash_attn")
    with pytest.raises(RuntimeError, match="torch_varlen"):
        select_backend(q, head_dim=8, backend="torch_varlen")
    with pytest.raises(ValueError, match="backend"):
        select_backend(q, head_dim=8, backend="xformers")
    monkeypatch.setenv(attn.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=attn.BACKEND_ENV):
        select_backend(q, head_dim=8)
    monkeypatch.setenv(attn.BACKEND_ENV, "sdpa")
    assert select_backend(q, head_dim=8) == "sdpa"


# --------------------------------------------------------------------------------------------
# FlashAttention argument adaptation, through fakes with the real functions' semantics
# --------------------------------------------------------------------------------------------
def _fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, enable_gqa):
    """What the FlashAttention varlen kernels compute (same arg conventions), on CPU."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max(lengths)
    if not enable_gqa:
        assert q.shape[1] == k.shape[1], "GQA needs enable_gqa or repeated K/V heads"
    assert q.shape[-1] % 8 == 0 and q.shape[-1] == k.shape[-1] == v.shape[-1]
    return reference_attention(q, k, v, lengths, scale=scale, window=tuple(window)).to(q.dtype)


def fake_varlen_attn_2_13(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
):  # fmt: skip
    assert isinstance(window_size, tuple)  # torch computes is_causal = window_size == (-1, 0)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                        window=window_size, enable_gqa=enable_gqa)  # fmt: skip


def fake_varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                          scale=None, window_size=(-1, -1)):  # fmt: skip
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                        window=window_size, enable_gqa=False)  # fmt: skip


def fake_varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False,
                          return_aux=None):  # fmt: skip
    return _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=query.shape[-1] ** -0.5,
                        window=(-1, 0) if is_causal else (-1, -1), enable_gqa=False)  # fmt: skip


def fake_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # fmt: skip
    assert dropout_p == 0.0 and softcap == 0.0
    left, right = window_size
    if causal:
        right = 0  # flash-attn: causal is the right window bound 0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    # flash-attn pads the head dim itself: no multiple-of-8 requirement, native GQA
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    return reference_attention(q, k, v, lengths, scale=scale, window=(left, right)).to(q.dtype)


def _fake_available(fn):
    import inspect

    return lambda: (fn, frozenset(inspect.signature(fn).parameters))


@pytest.mark.parametrize("fake", [fake_varlen_attn_2_13, fake_varlen_attn_2_11, fake_varlen_attn_2_10])
@pytest.mark.parametrize("sliding", [None, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_adapts_to_signature(monkeypatch, fake, sliding, causal):
    if sliding is not None and fake is fake_varlen_attn_2_10:
        pytest.skip("torch 2.10's varlen_attn has no sliding window (the selector falls back to SDPA)")
    monkeypatch.setattr(attn, "_torch_varlen", _fake_available(fake))
    q, k, v = qkv(hq=6, hkv=2, d=20, dv=12)  # head dims not multiples of 8, GQA
    packing = Packing.from_cu_seqlens(cu_of(LENGTHS), sum(LENGTHS), q.device)
    out = attn._torch_varlen_forward(q, k, v, packing, causal=causal, scale=0.3, sliding_window=sliding)
    ref = reference_attention(q, k, v, LENGTHS, scale=0.3, window=window_of(causal, sliding))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sliding", [None, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_adaptation(monkeypatch, sliding, causal):
    monkeypatch.setattr(attn, "_flash_attn_varlen", _fake_available(fake_flash_attn_varlen_func))
    q, k, v = qkv(hq=6, hkv=2, d=20, dv=12)
    packing = Packing.from_cu_seqlens(cu_of(LENGTHS), sum(LENGTHS), q.device)
    out = attn._flash_attn_forward(
        q, k, v, packing, causal=causal, scale=0.3, sliding_window=sliding, dropout=0.0, softcap=None
    )
    ref = reference_attention(q, k, v, LENGTHS, scale=0.3, window=window_of(causal, sliding))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# CUDA: the real kernels against the reference
# --------------------------------------------------------------------------------------------
def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    names = []
    if attn._flash_attn_varlen() is not None:
        names.append("flash_attn")
    if attn._torch_varlen() is not None and torch.cuda.get_device_capability() >= (8, 0):
        names.append("torch_varlen")
    return names + ["sdpa"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen", "sdpa"])
@pytest.mark.parametrize("sliding", [None, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backends_match_reference(backend, sliding, dtype):
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} is not available here")
    if backend == "torch_varlen" and sliding is not None and "window_size" not in attn._torch_varlen()[1]:
        pytest.skip("this torch's varlen_attn has no sliding window")
    lengths = [1, 300, 0, 77, 1024, 5, 129]
    torch.manual_seed(0)
    q, k, v = (x.cuda() for x in qkv(lengths, hq=12, hkv=2, d=128, dtype=torch.float32))
    q, k, v = (x.to(dtype).requires_grad_(True) for x in (q, k, v))
    out = varlen_attention(q, k, v, cu_of(lengths).cuda(), sliding_window=sliding, backend=backend)
    ref = reference_attention(q, k, v, lengths, window=window_of(True, sliding))
    with torch.no_grad():  # plain torch at the same dtype: SDPA per segment
        plain = varlen_attention(q, k, v, cu_of(lengths).cuda(), sliding_window=sliding, backend="sdpa")
    # docs/kernels.md low-precision rule: error vs fp64 within 2x that of plain torch + atol
    bound = 2 * (plain.double() - ref).abs().max().item() + 1e-2
    assert (out.double() - ref).abs().max().item() <= bound
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        err = (a.double() - b).abs().max().item()
        assert err <= 5e-2 * max(1.0, b.abs().max().item()), f"d{name}: {err}"


def test_all_sequences_empty():
    q, k, v = qkv([0, 0])
    out = varlen_attention(q, k, v, cu_of([0, 0]))
    assert out.shape == (0, 6, 24)
