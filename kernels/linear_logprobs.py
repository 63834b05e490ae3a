"""Fused ``linear -> log-softmax`` statistics: per-row log-prob, entropy and log-sum-exp of
``z = (hidden @ weight.T + bias) / T`` without ever writing the ``(M, V)`` logits to HBM.

Shapes: ``hidden (M, H)``, ``weight (V, H)``, ``bias (V,)`` or None, ``targets (M,)`` int64.
Outputs ``logp``, ``entropy``, ``lse``: ``(M,)`` fp32.

Forward (two kernels)::

    _logits_stats_kernel   grid (NUM_SPLITS, cdiv(M, BLOCK_M))
        program (s, i) forms z for BLOCK_M rows over the vocab slice of split s, one
        (BLOCK_M, BLOCK_V) tile at a time (tl.dot over H, fp32 accumulator), and keeps an online
        softmax per row:  m = max z,  s = Σ exp(z - m),  b = Σ exp(z - m) (z - m).
        When m grows to m', both are rescaled by α = exp(m - m'):  s <- α s,
        b <- α (b + s (m - m')).  It writes the partials (m, s, b) of its split, and the program
        whose tile holds the target column writes z[target] (exactly one writer per row).
    _combine_stats_kernel  grid (cdiv(M, BLOCK_R),)
        merges the NUM_SPLITS partials in split order (deterministic, no atomics):
        m* = max m_j,  S = Σ e^{m_j - m*} s_j,  B = Σ e^{m_j - m*} (b_j + s_j (m_j - m*)),
        lse = m* + log S,  entropy = log S - B / S  (= lse - E_p[z]),  logp = z[target] - lse.

    b is the sum of p (z - m) rather than of p z: every term is O(log V), so the entropy never
    comes from the difference of two large numbers (lse and E_p[z] can both be ~1e2).

Backward, with p = softmax(z) and upstream g_logp, g_ent per row::

    dL/dlogits_k = (g_logp (1[k = target] - p_k) - g_ent p_k (z_k - (lse - entropy))) / T

``_dlogits_kernel`` (1-D grouped grid over (row tile, vocab tile)) writes that (rows, V) block for
one chunk of rows, recomputing z with the same dot loop (or reading the fp32 z "stash" the forward
can leave behind); cuBLAS then forms ``grad_hidden = dlogits @ W`` and ``grad_weight += dlogits.T @ h``
(fp32 accumulator across chunks). Memory: forward O(M) extra (3 x NUM_SPLITS x M fp32 partials);
backward one (chunk, V) dlogits block (<= ~1 GiB by default) + the fp32 (V, H) accumulator.

Layers: kernels -> launchers (``linear_logprobs_forward``, ``dlogits``, ``apply_dlogits``,
``linear_logprobs_backward``) -> ``torch.library`` custom ops ``mgrpo_fast::linear_logprobs_fwd/bwd``
(fake impls: opaque to ``torch.compile(fullgraph=True)``) -> ``TritonLinearLogprobs`` ->
``triton_linear_logprobs`` (what ``mgrpo_fast.linear_logprobs(impl="triton")`` calls).

Numerics: logits are accumulated and kept in fp32 in registers (never rounded to bf16). fp32
inputs use ``input_precision="ieee"`` (no TF32); bf16/fp16 inputs use tensor cores (wgmma on
sm_90, mma on sm_80) with fp32 accumulation. The dlogits block is rounded to the GEMM dtype
before the two cuBLAS GEMMs (as the eager bf16 backward would); the bias gradient sums it in fp32.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from ._common import GEMM_DTYPES, AotSpec, check_kernel_device, interpreting, matmul_fp32, pointer_type

# ------------------------------------------------------------------------------------------------
# Config table: the only configs the launchers pick, and exactly what aot_specs() compiles.
# 16-bit: 128x128 tiles, K=64, 3 stages -> 3 x (128x64 + 64x128) x 2 B = 96 KB of shared memory
# (fits A100 and H100). fp32 runs the IEEE FMA path (no tensor cores), so smaller tiles.
# ------------------------------------------------------------------------------------------------
_CONFIGS = {
    torch.bfloat16: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    torch.float16: dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    torch.float32: dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2),
}
_COMBINE_CONFIG = dict(BLOCK_R=128, num_warps=4, num_stages=1)
_WAVES = 3  # target programs of the stats kernel: ~3 waves of the GPU's SMs
_L2_SPLITS = 8  # at least this many vocab splits on CUDA: the grouped raster of _logits_stats_kernel
_INTERPRETER_SMS = 2  # "SM count" under TRITON_INTERPRET: a few programs, so splits get exercised
_DLOGITS_BLOCK_BYTES = 1 << 30  # default backward chunk: dlogits block of ~1 GiB at most
_M_INIT = tl.constexpr(-1.0e30)  # finite "-inf" for the running max: keeps 0 * (m_old - m_new) from being NaN


@triton.jit
def _z_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, row_mask, v_mask, H, stride_hm, stride_wv, inv_temp,
            HAS_BIAS: tl.constexpr, DOT_UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 tile of z = (h W^T + b) * inv_temp; padded rows/columns are finite."""
    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: M*H and V*H can exceed 2^31 elements
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < H
        h = tl.load(h_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & v_mask[None, :], other=0.0)  # W^T tile
        if DOT_UPCAST:  # interpreter only: its bf16 dot is wrong, an fp32 dot of the same values is exact
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # "ieee" only changes fp32 operands (no TF32); bf16/fp16 still take the tensor-core path
        acc = tl.dot(h, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0)[None, :]  # bias is fp32
    return acc * inv_temp


@triton.jit
def _logits_stats_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,  # (M, H), (V, H), (V,) fp32, (M,) int64
    part_m_ptr, part_s_ptr, part_b_ptr,  # (NUM_SPLITS, M) fp32 partials
    zt_ptr, stash_ptr,  # (M,) fp32 z[target]; (M, V) fp32 z when STORE_Z
    M, V, H, tiles_per_split, stride_hm, stride_wv, stride_zm, inv_temp,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # split is the fastest grid axis: programs running together are NUM_SPLITS splits x a few row
    # tiles, so at each step they share a few h panels and NUM_SPLITS W tiles in L2 (a grouped
    # raster) instead of ~#SMs distinct h panels that would be re-read from HBM for every V tile.
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
    m_run = tl.full((BLOCK_M,), _M_INIT, dtype=tl.float32)
    s_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    # Every split runs tiles_per_split tiles; tiles past V (last split only) are fully masked
    # no-ops (no loads, alpha = 1, p = 0). The launcher leaves no split empty, so the first tile of
    # each split holds real columns and m_run is a real logit from then on.
    for t in range(0, tiles_per_split):
        v0 = v_begin + t * BLOCK_V
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        z = _z_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, row_mask, v_mask, H, stride_hm, stride_wv, inv_temp,
                    HAS_BIAS, DOT_UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
        if STORE_Z:
            z_ptrs = stash_ptr + rows.to(tl.int64)[:, None] * stride_zm + offs_v[None, :]
            tl.store(z_ptrs, z, mask=row_mask[:, None] & v_mask[None, :])
        # z[target]: only the tile holding the target column stores it (no race between programs)
        z_t = tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        hit = (tgt >= v0) & (tgt < v0 + BLOCK_V)
        tl.store(zt_ptr + rows, z_t, mask=row_mask & hit)
        # online softmax (m_new >= the first tile's max: a real logit)
        # padded columns get the finite sentinel: exp -> 0 and 0 * shifted = 0 (no inf * 0 NaN)
        z = tl.where(v_mask[None, :], z, _M_INIT)
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        alpha = tl.exp(m_run - m_new)
        shifted = z - m_new[:, None]  # <= 0
        p = tl.exp(shifted)
        b_run = alpha * (b_run + s_run * (m_run - m_new)) + tl.sum(p * shifted, axis=1)
        s_run = alpha * s_run + tl.sum(p, axis=1)
        m_run = m_new
    part = pid_s.to(tl.int64) * M + rows
    tl.store(part_m_ptr + part, m_run, mask=row_mask)
    tl.store(part_s_ptr + part, s_run, mask=row_mask)
    tl.store(part_b_ptr + part, b_run, mask=row_mask)


@triton.jit
def _combine_stats_kernel(
    part_m_ptr, part_s_ptr, part_b_ptr, zt_ptr,  # (num_splits, M) partials, (M,) z[target]
    logp_ptr, ent_ptr, lse_ptr,  # (M,) fp32 outputs
    M, num_splits,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < M
    # split j's partials sit j * M elements further: advance 64-bit pointers, no i32 product
    pm = part_m_ptr + rows
    m_max = tl.full((BLOCK_R,), _M_INIT, dtype=tl.float32)
    for _ in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(pm, mask=mask, other=_M_INIT))
        pm += M
    pm = part_m_ptr + rows
    ps = part_s_ptr + rows
    pb = part_b_ptr + rows
    s_tot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    b_tot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for _ in range(0, num_splits):  # fixed order: bit-identical across runs
        m_j = tl.load(pm, mask=mask, other=_M_INIT)
        s_j = tl.load(ps, mask=mask, other=0.0)
        b_j = tl.load(pb, mask=mask, other=0.0)
        pm += M
        ps += M
        pb += M
        scale = tl.exp(m_j - m_max)
        s_tot += scale * s_j
        b_tot += scale * (b_j + s_j * (m_j - m_max))
    s_safe = tl.where(mask, s_tot, 1.0)
    log_s = tl.log(s_safe)
    lse = m_max + log_s
    entropy = log_s - b_tot / s_safe
    z_t = tl.load(zt_ptr + rows, mask=mask, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(ent_ptr + rows, entropy, mask=mask)
    tl.store(logp_ptr + rows, z_t - lse, mask=mask)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,  # (M, H), (V, H), (V,) fp32, (M,) int64
    lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,  # (M,) fp32
    stash_ptr, out_ptr,  # (M, V) fp32 z when not RECOMPUTE; (M, V) output in the GEMM dtype
    M, V, H, stride_hm, stride_wv, stride_zm, stride_om, inv_temp,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RECOMPUTE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1-D grid in grouped order: programs running together cover GROUP_M row tiles x ~#SMs/GROUP_M
    # vocab tiles, so the h and W panels they read stay in L2 (the usual GEMM swizzle)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(V, BLOCK_V)
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_v = (pid % in_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < M
    v_mask = offs_v < V
    tile_mask = row_mask[:, None] & v_mask[None, :]
    rows64 = rows.to(tl.int64)
    if RECOMPUTE:
        z = _z_tile(h_ptr, w_ptr, b_ptr, rows, offs_v, row_mask, v_mask, H, stride_hm, stride_wv, inv_temp,
                    HAS_BIAS, DOT_UPCAST, BLOCK_M, BLOCK_V, BLOCK_K)
    else:
        z = tl.load(stash_ptr + rows64[:, None] * stride_zm + offs_v[None, :], mask=tile_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])  # fp32 softmax, never rounded before the subtraction below
    d = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
        d += g[:, None] * (onehot - p)
    if HAS_GRAD_ENT:
        ge = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        mean_z = lse - ent  # E_p[z]
        d -= ge[:, None] * p * (z - mean_z[:, None])
    d = d * inv_temp
    tl.store(out_ptr + rows64[:, None] * stride_om + offs_v[None, :], d.to(out_ptr.dtype.element_ty),
             mask=tile_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _check_operands(hidden, weight, targets, bias):
    check_kernel_device("linear_logprobs", hidden)
    if hidden.dtype != weight.dtype or hidden.dtype not in GEMM_DTYPES:
        raise ValueError(
            "linear_logprobs (triton): hidden and weight must share one dtype among fp32, fp16, bf16 "
            f"(fp64 and mixed dtypes run on impl='torch'); got hidden {hidden.dtype}, weight {weight.dtype}"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs (triton): expected hidden (M, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"linear_logprobs (triton): targets must be (M,) = ({hidden.shape[0]},), "
                         f"got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"linear_logprobs (triton): bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_logprobs (triton): {name} is on {t.device}, hidden on {hidden.device}")


def _check_stash(stash, rows: int, vocab: int) -> None:
    if stash is None:
        return
    if stash.shape != (rows, vocab) or stash.dtype != torch.float32 or stash.stride(1) != 1:
        raise ValueError(f"stash must be an fp32 ({rows}, {vocab}) tensor with unit column stride")


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along the last dim (the kernels take explicit row strides only)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _prep(hidden, weight, targets, bias):
    bias32 = None if bias is None else bias.detach().to(torch.float32).contiguous()  # (V,) cast is free
    return _rowmajor(hidden), _rowmajor(weight), targets.to(torch.int64).contiguous(), bias32


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(rows: int, vocab: int, block_m: int, block_v: int, device: torch.device) -> int:
    """Vocab splits: enough programs for ~_WAVES waves of the SMs, and at least _L2_SPLITS on CUDA.

    The floor keeps the stats kernel compute-bound at large M: with S splits running side by side,
    ~#SMs/S row tiles share each W tile, so W is read from HBM ~M_tiles * S / #SMs times
    (~2000 flop per byte at S = 8) and the h panels in flight (~#SMs/S) stay in L2. Partials cost
    3 * S * M * 4 bytes, nothing next to the GEMM.
    """
    v_tiles = triton.cdiv(vocab, block_v)
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        floor = _L2_SPLITS
    else:
        sms, floor = _INTERPRETER_SMS, 1
    return max(1, min(v_tiles, max(floor, triton.cdiv(_WAVES * sms, triton.cdiv(rows, block_m)))))


def linear_logprobs_forward(hidden, weight, targets, bias, temperature: float, *,
                            stash: torch.Tensor | None = None, num_splits: int | None = None):
    """``(logp, entropy, lse)``, each ``(M,)`` fp32, of ``z = (hidden (M, H) @ weight (V, H).T + bias) / T``.

    ``stash``: optional ``(M, V)`` fp32 buffer (unit column stride) that receives z, so a later
    ``dlogits(..., stash=stash)`` skips the GEMM. ``num_splits`` overrides the vocab split count
    (tests/benchmarks; the tile config is fixed either way).
    """
    _check_operands(hidden, weight, targets, bias)
    hidden, weight, targets, bias32 = _prep(hidden, weight, targets, bias)
    rows, width = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(rows, dtype=torch.float32, device=dev)
    entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
    if rows == 0:
        return logp, entropy, lse
    _check_stash(stash, rows, vocab)
    cfg = _CONFIGS[hidden.dtype]
    bm, bv, bk = cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    if triton.cdiv(rows, bm) > 65535:  # grid axis 1 limit of CUDA
        raise ValueError(f"linear_logprobs (triton): at most {65535 * bm} rows per call at {hidden.dtype}, "
                         f"got {rows}; split the rows (row_index) into several calls")
    v_tiles = triton.cdiv(vocab, bv)
    if num_splits is None:
        splits = _num_splits(rows, vocab, bm, bv, dev)
    else:
        splits = max(1, min(int(num_splits), v_tiles))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    part = torch.empty((3, splits, rows), dtype=torch.float32, device=dev)  # m, s, b partials
    # z[target]; stays NaN if a target is out of range (the public API validates targets first)
    z_t = torch.full((rows,), float("nan"), dtype=torch.float32, device=dev)
    _logits_stats_kernel[(splits, triton.cdiv(rows, bm))](
        hidden, weight, bias32 if bias32 is not None else z_t, targets,
        part[0], part[1], part[2], z_t, stash if stash is not None else z_t,
        rows, vocab, width, tiles_per_split, hidden.stride(0), weight.stride(0),
        stash.stride(0) if stash is not None else 0, 1.0 / temperature,
        HAS_BIAS=bias32 is not None, STORE_Z=stash is not None,
        DOT_UPCAST=interpreting() and hidden.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    cc = _COMBINE_CONFIG
    _combine_stats_kernel[(triton.cdiv(rows, cc["BLOCK_R"]),)](
        part[0], part[1], part[2], z_t, logp, entropy, lse, rows, splits,
        BLOCK_R=cc["BLOCK_R"], num_warps=cc["num_warps"], num_stages=cc["num_stages"],
    )
    return logp, entropy, lse


def dlogits(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature: float, *,
            stash: torch.Tensor | None = None) -> torch.Tensor:
    """``(M, V)`` d loss / d logits in the GEMM dtype, for ``loss = <g_logp, logp> + <g_ent, entropy>``.

    z is recomputed from ``hidden (M, H)``, ``weight (V, H)``, ``bias`` unless ``stash`` (the fp32
    ``(M, V)`` z written by ``linear_logprobs_forward(..., stash=)``) is given. ``lse``,
    ``entropy``, ``grad_*``: ``(M,)``; a ``None`` grad drops its term.
    """
    _check_operands(hidden, weight, targets, bias)
    hidden, weight, targets, bias32 = _prep(hidden, weight, targets, bias)
    rows, width = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    out = torch.empty((rows, vocab), dtype=hidden.dtype, device=dev)
    if rows == 0 or (grad_logp is None and grad_entropy is None):
        return out.zero_()
    _check_stash(stash, rows, vocab)

    def f32(x):
        return None if x is None else x.detach().to(torch.float32).contiguous()

    lse, entropy, g_logp, g_ent = f32(lse), f32(entropy), f32(grad_logp), f32(grad_entropy)
    cfg = _CONFIGS[hidden.dtype]
    bm, bv, bk = cfg["BLOCK_M"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    recompute = stash is None
    _dlogits_kernel[(triton.cdiv(rows, bm) * triton.cdiv(vocab, bv),)](
        hidden, weight, bias32 if bias32 is not None else lse, targets,
        lse, entropy, g_logp if g_logp is not None else lse, g_ent if g_ent is not None else lse,
        lse if recompute else stash, out,
        rows, vocab, width, hidden.stride(0), weight.stride(0), 0 if recompute else stash.stride(0),
        out.stride(0), 1.0 / temperature,
        HAS_GRAD_LOGP=g_logp is not None, HAS_GRAD_ENT=g_ent is not None,
        HAS_BIAS=recompute and bias32 is not None, RECOMPUTE=recompute,
        DOT_UPCAST=recompute and interpreting() and hidden.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def block_rows(dtype: torch.dtype) -> int:
    """BLOCK_M of the config for ``dtype``: callers size their row chunks in multiples of it."""
    return _CONFIGS[dtype]["BLOCK_M"]


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per backward chunk: a dlogits block of <= ~1 GiB, a multiple of BLOCK_M."""
    bm = block_rows(dtype)
    rows = _DLOGITS_BLOCK_BYTES // (max(vocab, 1) * torch.finfo(dtype).bits // 8)
    return max(bm, rows // bm * bm)


def apply_dlogits(d, hidden, weight, grad_hidden, grad_weight, grad_bias, *, need_weight: bool = True):
    """The two cuBLAS GEMMs of one chunk, given its dlogits ``d (c, V)`` (GEMM dtype), ``hidden (c, H)``
    and ``weight (V, H)``; ``grad_hidden (c, H)``, ``grad_weight (V, H)`` fp32 and ``grad_bias (V,)``
    fp32 may each be None.

    Writes ``grad_hidden (c, H) = d @ weight`` (in its dtype) when given; adds ``d.sum(0)`` (fp32)
    into ``grad_bias`` when given; returns ``grad_weight + d.T @ hidden`` as an fp32 ``(V, H)``
    accumulator (``grad_weight=None``: the first chunk creates it; ``need_weight=False``: returned
    unchanged). fp32 inputs accumulate in place (addmm_); bf16/fp16 run a tensor-core GEMM with fp32
    output on CUDA (one (V, H) fp32 temporary per chunk after the first).
    """
    if grad_hidden is not None:
        grad_hidden.copy_(matmul_fp32(d, weight))
    if need_weight:
        if grad_weight is None:
            grad_weight = matmul_fp32(d.T, hidden)
        elif d.dtype == torch.float32:
            grad_weight.addmm_(d.T, hidden)
        else:
            grad_weight += matmul_fp32(d.T, hidden)
    if grad_bias is not None:
        grad_bias += d.sum(0, dtype=torch.float32)
    return grad_weight


def linear_logprobs_backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                             temperature: float, *, chunk_rows: int | None = None,
                             needs=(True, True, True)):
    """``(grad_hidden (M, H), grad_weight (V, H), grad_bias (V,) | None)`` in the parameters' dtypes.

    Rows go in chunks: per chunk one dlogits block (recomputed z), then cuBLAS for
    ``grad_hidden[chunk] = dlogits @ W`` and ``grad_weight += dlogits.T @ h[chunk]`` into an fp32
    ``(V, H)`` accumulator. Deterministic: fixed chunk order, no atomics. ``needs`` skips grads
    (a ``False`` entry returns ``None``).
    """
    _check_operands(hidden, weight, targets, bias)
    rows = hidden.shape[0]
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    chunk = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(weight.shape[0], hidden.dtype)
    if chunk <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    h_op, w_op = _rowmajor(hidden), _rowmajor(weight)
    grad_h = torch.empty_like(hidden) if need_h else None  # chunks cover every row
    grad_w = None  # fp32 (V, H), created by the first chunk (no zeros pass)
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_b else None
    if need_h or need_w or need_b:
        for start in range(0, rows, chunk):
            sl = slice(start, min(start + chunk, rows))
            d = dlogits(h_op[sl], w_op, bias, targets[sl], lse[sl], entropy[sl],
                        None if grad_logp is None else grad_logp[sl],
                        None if grad_entropy is None else grad_entropy[sl], temperature)
            grad_w = apply_dlogits(d, h_op[sl], w_op, grad_h[sl] if need_h else None, grad_w, grad_b,
                                   need_weight=need_w)
            del d
    if need_w:
        grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
    if need_b:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


# ------------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile (fake impls give the shapes), so a compiled model that
# calls linear_logprobs(impl="triton") traces with fullgraph=True. custom_op rather than triton_op:
# triton_op's body is inlined by Inductor, which fails under the Triton interpreter.
# ------------------------------------------------------------------------------------------------
def _register_ops():
    ns = torch.ops.mgrpo_fast
    if hasattr(ns, "linear_logprobs_fwd"):  # this file imported under a second module name
        return ns.linear_logprobs_fwd.default, ns.linear_logprobs_bwd.default

    @torch.library.custom_op("mgrpo_fast::linear_logprobs_fwd", mutates_args=())
    def fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return linear_logprobs_forward(hidden, weight, targets, bias, temperature)

    @fwd.register_fake
    def _(hidden, weight, targets, bias, temperature):
        return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))

    @torch.library.custom_op("mgrpo_fast::linear_logprobs_bwd", mutates_args=())
    def bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            lse: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor | None,
            grad_entropy: torch.Tensor | None, temperature: float, needs: list[bool]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = linear_logprobs_backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                                         temperature, needs=needs)
        # ops return tensors only: a gradient that is not needed comes back empty
        return tuple(g if g is not None else hidden.new_empty(0) for g in grads)

    @bwd.register_fake
    def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature, needs):
        return (hidden.new_empty(hidden.shape if needs[0] else (0,)),
                weight.new_empty(weight.shape if needs[1] else (0,)),
                hidden.new_empty(bias.shape if needs[2] and bias is not None else (0,),
                                 dtype=bias.dtype if bias is not None else hidden.dtype))

    return fwd, bwd


_fwd_op, _bwd_op = _register_ops()


class TritonLinearLogprobs(torch.autograd.Function):
    """``(hidden (M, H), weight (V, H), bias (V,) | None, targets (M,), T)`` -> ``(logp, entropy, lse)``.

    Outputs are ``(M,)`` fp32. Saves only the inputs and the ``(M,)`` ``lse``/``entropy``; the
    backward recomputes z. ``lse`` is non-differentiable; a missing entropy (or logp) gradient
    skips its term.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        logp, entropy, lse = _fwd_op(hidden, weight, targets, bias, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = [bool(x) for x in ctx.needs_input_grad[:3]]
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        needs[2] = needs[2] and bias is not None
        gh, gw, gb = _bwd_op(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                             ctx.temperature, needs)
        return gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None, None, None


def triton_linear_logprobs(hidden2d, weight, targets1d, bias, temperature: float):
    """Entry point of ``mgrpo_fast.linear_logprobs(impl="triton")``: ``(logp, entropy, lse)``, (M,) fp32."""
    _check_operands(hidden2d, weight, targets1d, bias)
    return TritonLinearLogprobs.apply(hidden2d, weight, bias, targets1d, float(temperature))


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every (kernel, dtype, config, flags) the launchers can produce.
# ------------------------------------------------------------------------------------------------
_DTYPE_TAG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _spec(name, kernel, types: dict[str, str], consts: dict[str, object], cfg: dict, tags: dict) -> AotSpec:
    """An AotSpec whose signature follows the kernel's argument order (constexprs marked)."""
    fn = getattr(kernel, "fn", kernel)
    args = list(inspect.signature(fn).parameters)
    missing = set(args) - set(types) - set(consts)
    assert not missing, f"{name}: no type for {missing}"
    sig = {a: "constexpr" if a in consts else types[a] for a in args}
    # hidden sizes and row strides are multiples of 16 at real shapes: compile what the GPU runs
    aligned = tuple(a for a in args if a == "H" or a.startswith("stride_"))
    return AotSpec(name, kernel, sig, dict(consts), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                   tags=tags, aligned_args=aligned)


def aot_specs() -> list[AotSpec]:
    """Every (kernel, dtype, config, flags) the launchers can launch: DOT_UPCAST is always False here
    (interpreter only); HAS_BIAS is False whenever RECOMPUTE is (the stash already holds the bias)."""
    i32 = "i32"
    specs = []
    for dtype, cfg in _CONFIGS.items():
        ptr, tag = pointer_type(dtype), _DTYPE_TAG[dtype]
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K")}
        common = {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": "*fp32", "tgt_ptr": "*i64", "stash_ptr": "*fp32",
                  "M": i32, "V": i32, "H": i32, "stride_hm": i32, "stride_wv": i32, "stride_zm": i32,
                  "inv_temp": "fp32"}
        stats_types = dict(common, part_m_ptr="*fp32", part_s_ptr="*fp32", part_b_ptr="*fp32", zt_ptr="*fp32",
                           tiles_per_split=i32)
        for has_bias in (False, True):
            for store_z in (False, True):
                consts = dict(HAS_BIAS=has_bias, STORE_Z=store_z, DOT_UPCAST=False, **blocks)
                name = f"logits_stats_{tag}_bias{int(has_bias)}_storez{int(store_z)}"
                tags = {"gemm": "true", "dtype": tag}
                specs.append(_spec(name, _logits_stats_kernel, stats_types, consts, cfg, tags))
        dl_types = dict(common, lse_ptr="*fp32", ent_ptr="*fp32", g_logp_ptr="*fp32", g_ent_ptr="*fp32",
                        out_ptr=ptr, stride_om=i32)
        for recompute in (True, False):
            for has_bias in ((False, True) if recompute else (False,)):
                for g_logp, g_ent in ((True, True), (True, False), (False, True)):
                    consts = dict(HAS_GRAD_LOGP=g_logp, HAS_GRAD_ENT=g_ent, HAS_BIAS=has_bias,
                                  RECOMPUTE=recompute, DOT_UPCAST=False, GROUP_M=cfg["GROUP_M"], **blocks)
                    name = (f"dlogits_{tag}_{'recompute' if recompute else 'stash'}_bias{int(has_bias)}"
                            f"_glogp{int(g_logp)}_gent{int(g_ent)}")
                    tags = {"gemm": "true" if recompute else "false", "dtype": tag}
                    specs.append(_spec(name, _dlogits_kernel, dl_types, consts, cfg, tags))
    types = {"part_m_ptr": "*fp32", "part_s_ptr": "*fp32", "part_b_ptr": "*fp32", "zt_ptr": "*fp32",
             "logp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", "M": i32, "num_splits": i32}
    cc = _COMBINE_CONFIG
    specs.append(_spec("combine_stats", _combine_stats_kernel, types, {"BLOCK_R": cc["BLOCK_R"]}, cc,
                       {"dtype": "fp32"}))
    return specs
