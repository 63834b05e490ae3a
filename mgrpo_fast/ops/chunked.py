"""The blocks of the chunked torch path: one ``(chunk, V)`` fp32 logits block at a time.

Shared by the two-pass log-prob op (``logprobs.ChunkedLinearLogprobs``: forward, then a backward
that recomputes each block) and the one-pass fused loss (``fused_torch``: each block's gradient is
formed while it is hot). Every function takes one chunk of rows.

Numerics and memory, per operand dtype:

* fp32 / fp64: plain GEMMs in that dtype.
* bf16 / fp16 on CUDA: tensor-core GEMMs with fp32 output (``torch.mm(out_dtype=fp32)``).
* bf16 / fp16 on CPU: torch has no 16-bit GEMM with an fp32 output on CPU, and its bf16 GEMM
  rounds the output to bf16 (the logits error that flips clip decisions). So the **logits** GEMM
  upcasts the weight one vocabulary slice at a time into a reused fp32 buffer
  (``WEIGHT_SLICE_BYTES``, no full fp32 copy of the weight) and runs an fp32 GEMM: the logits are
  exact fp32 dot products of the bf16 values. The **gradient** GEMMs take ``dlogits`` in the
  operand dtype and run the native 16-bit GEMM (fp32 accumulation inside, AVX512-BF16/AMX where
  the CPU has them): ``grad_hidden`` is rounded once, to its bf16 output, as it would be anyway;
  ``grad_weight`` of a chunk is added into the fp32 ``(V, H)`` accumulator.

Chunk size: a ``(chunk, V)`` fp32 block of about ``CPU_BLOCK_BYTES`` on CPU (a few times the last
level cache: the softmax passes over the block stay cheap next to the GEMMs) and
``GPU_BLOCK_BYTES`` elsewhere, in multiples of 64 rows.
"""

from __future__ import annotations

import torch

# One fp32 logits block: bytes per device type.
CPU_BLOCK_BYTES = 96 << 20
GPU_BLOCK_BYTES = 256 << 20
# The fp32 weight slice the CPU logits GEMM upcasts into (reused across slices and chunks).
WEIGHT_SLICE_BYTES = 16 << 20
# Rows per step of the in-place softmax statistics (``softmax_stats(in_place=True)``).
STATS_ROWS = 16
LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_chunk_size(num_rows: int, vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: the ``(chunk, V)`` fp32 block fits the device's budget; at least 1, at most
    ``num_rows``, a multiple of 64 when that is possible."""
    budget = CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else GPU_BLOCK_BYTES
    rows = budget // (4 * max(vocab, 1))
    if rows >= 64:
        rows = rows // 64 * 64
    return max(1, min(num_rows, rows))


def accumulation_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the logits and the accumulators: fp32, or fp64 when an operand is fp64."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def low_precision_cpu(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """16-bit operands of one dtype on a non-CUDA device: the GEMMs that need care (module doc)."""
    return hidden.dtype == weight.dtype and hidden.dtype in LOW_PRECISION and not hidden.is_cuda


class LogitsGemm:
    """``z = (h_chunk @ W.T + b) / T`` into an fp32 block, for one ``(hidden, weight)`` pair.

    Holds what the chunks of one call share: the weight in the GEMM's dtype (the caller's tensor,
    or an upcast copy only for mixed dtypes) and, for 16-bit operands on CPU, the reused fp32
    weight-slice buffer.
    """

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
    ):
        self.acc = accumulation_dtype(hidden, weight)
        self.temperature = float(temperature)
        self.bias = None if bias is None else bias.to(self.acc)
        self.sliced = low_precision_cpu(hidden, weight)
        same_16bit = hidden.dtype == weight.dtype and hidden.dtype in LOW_PRECISION
        # mixed dtypes (rare): one upcast copy of the weight, as before
        self.weight = weight if same_16bit or weight.dtype == self.acc else weight.to(self.acc)
        self.buffer = None
        if self.sliced:
            width = max(weight.shape[1], 1)
            slice_rows = max(64, min(weight.shape[0], WEIGHT_SLICE_BYTES // (4 * width)))
            self.buffer = torch.empty(
                (slice_rows, weight.shape[1]), dtype=torch.float32, device=weight.device
            )

    def hidden_operand(self, h_chunk: torch.Tensor) -> torch.Tensor:
        """The chunk's rows in the dtype the logits GEMM reads."""
        if self.sliced or (h_chunk.dtype not in LOW_PRECISION and h_chunk.dtype != self.acc):
            return h_chunk.to(self.acc)
        if h_chunk.dtype in LOW_PRECISION and h_chunk.dtype != self.weight.dtype:
            return h_chunk.to(self.acc)
        return h_chunk

    def __call__(self, h_chunk: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``h_chunk (c, H)`` -> ``z (c, V)`` in fp32 (fp64 for fp64), written into ``out`` if given."""
        rows, vocab = h_chunk.shape[0], self.weight.shape[0]
        z = out if out is not None else torch.empty((rows, vocab), dtype=self.acc, device=h_chunk.device)
        h = self.hidden_operand(h_chunk)
        if self.sliced:
            step = self.buffer.shape[0]
            for start in range(0, vocab, step):
                stop = min(start + step, vocab)
                w32 = self.buffer[: stop - start]
                w32.copy_(self.weight[start:stop])
                torch.mm(h, w32.T, out=z[:, start:stop])
        elif h.dtype in LOW_PRECISION:  # CUDA: tensor cores, fp32 output
            torch.mm(h, self.weight.T, out_dtype=torch.float32, out=z)
        else:
            torch.mm(h, self.weight.T, out=z)
        if self.bias is not None:
            z += self.bias
        if self.temperature != 1.0:
            z /= self.temperature
        return z


def softmax_stats(
    z: torch.Tensor, targets: torch.Tensor, *, keep_probs: bool = False, in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp, entropy, lse, p)`` of each row of the logits block ``z (c, V)``.

    ``p = softmax(z)`` is returned with ``keep_probs`` (for :func:`dlogits_`), else ``None``. With
    ``in_place`` the probabilities overwrite ``z`` (``p`` is ``z``, the logits are gone) and the
    call needs no second ``(c, V)`` block: it walks ``STATS_ROWS`` rows at a time; without it
    ``z`` is kept and ``p`` is a second block.
    """
    m = z.amax(dim=1, keepdim=True)
    logp = z.gather(1, targets[:, None]).squeeze(1) - m.squeeze(1)  # - log Σ exp(z - m) below
    if in_place:
        total = torch.empty_like(m)
        weighted = torch.empty_like(m)  # Σ_k e_k z_k, e = exp(z - m)
        for start in range(0, z.shape[0], STATS_ROWS):
            rows = slice(start, start + STATS_ROWS)
            e = torch.sub(z[rows], m[rows]).exp_()  # (STATS_ROWS, V): the only temporary
            total[rows] = e.sum(dim=1, keepdim=True)
            weighted[rows] = (e[:, None, :] @ z[rows, :, None]).view(-1, 1)
            z[rows] = e
        p = z
    else:
        p = torch.sub(z, m).exp_()  # one pass for both the normalizer and the probabilities
        total = p.sum(dim=1, keepdim=True)
        weighted = (p[:, None, :] @ z[:, :, None]).view(-1, 1)
    lse = (m + total.log()).squeeze(1)
    logp -= total.log().squeeze(1)
    entropy = lse - (weighted / total).view(-1)  # lse - Σ p z
    if not keep_probs:
        return logp, entropy, lse, None
    return logp, entropy, lse, p.div_(total)


def probs_(z: torch.Tensor, lse: torch.Tensor, *, keep_logits: bool) -> torch.Tensor:
    """``softmax(z) = exp(z - lse)`` of a block from its saved ``lse``: a new block with
    ``keep_logits``, else in place in ``z``."""
    return torch.sub(z, lse[:, None]).exp_() if keep_logits else z.sub_(lse[:, None]).exp_()


def dlogits_(
    p: torch.Tensor,
    z: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``dL/dlogits (c, V)`` of the block, written **in place into** ``p`` (returned).

    ``p``: the block's probabilities ``softmax(z)``; ``z``: its logits, needed (and destroyed)
    only with ``grad_entropy``. With upstream ``g = grad_logp``, ``e = grad_entropy``::

        d logp / dz_k = 1[k = t] - p_k
        d entropy / dz_k = -p_k (z_k - E_p[z]),   E_p[z] = lse - entropy
        dL/dlogits = (g (1[k = t] - p_k) - e p_k (z_k - E_p[z])) / T
    """
    if grad_entropy is not None:
        z -= (lse - entropy)[:, None]  # z - E_p[z]
        z.mul_(p).mul_(-grad_entropy[:, None])
        if grad_logp is not None:
            p.mul_(-grad_logp[:, None]).add_(z)
        else:
            p.copy_(z)
    else:
        p.mul_(-grad_logp[:, None])
    if grad_logp is not None:  # + g at each row's target (one element per row)
        flat = torch.arange(p.shape[0], device=p.device) * p.shape[1] + targets
        p.view(-1).index_add_(0, flat, grad_logp.to(p.dtype))
    if temperature != 1.0:
        p /= temperature
    return p


def gradient_gemms(
    dz: torch.Tensor,
    h_chunk: torch.Tensor,
    gemm: LogitsGemm,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> None:
    """One chunk's share of the GEMM gradients from its ``dz = dL/dlogits (c, V)`` as
    :func:`gradient_operand` returns it: ``grad_hidden[:] = dz @ W`` (written in its own dtype),
    ``grad_weight += dz.T @ h_chunk`` into the fp32/fp64 ``(V, H)`` accumulator.
    """
    weight = gemm.weight
    if weight.dtype in LOW_PRECISION and h_chunk.dtype == weight.dtype:
        # dz in the operand dtype (a no-op after gradient_operand); the GEMMs accumulate in fp32
        # (CUDA: fp32 output; CPU: the native 16-bit GEMM, its output rounded once)
        d = dz.to(weight.dtype)
        if d.is_cuda:
            if grad_hidden is not None:
                grad_hidden.copy_(torch.mm(d, weight, out_dtype=torch.float32))
            if grad_weight is not None:
                grad_weight.add_(torch.mm(d.T, h_chunk, out_dtype=torch.float32))
            return
        if grad_hidden is not None:
            torch.mm(d, weight, out=grad_hidden)
        if grad_weight is not None:
            # one vocabulary slice at a time: the 16-bit product of a slice is the only temporary
            step = gemm.buffer.shape[0] if gemm.buffer is not None else weight.shape[0]
            for start in range(0, weight.shape[0], step):
                stop = min(start + step, weight.shape[0])
                grad_weight[start:stop] += torch.mm(d[:, start:stop].T, h_chunk)
        return
    if grad_hidden is not None:
        grad_hidden.copy_(torch.mm(dz, weight.to(dz.dtype)))
    if grad_weight is not None:
        grad_weight.addmm_(dz.T, h_chunk.to(dz.dtype))


def gradient_operand(
    dz: torch.Tensor, gemm: LogitsGemm, h_chunk: torch.Tensor, grad_bias: torch.Tensor | None
) -> torch.Tensor:
    """``grad_bias += dz.sum(0)`` from the accumulation-dtype block, then ``dz`` in the dtype the
    gradient GEMMs read: the 16-bit operand dtype for 16-bit operands of one dtype, else ``dz``
    itself (16-bit: in place, :func:`narrow_in_place`)."""
    if grad_bias is not None:
        grad_bias += dz.sum(0)
    weight = gemm.weight
    if weight.dtype in LOW_PRECISION and h_chunk.dtype == weight.dtype:
        return narrow_in_place(dz, weight.dtype)
    return dz


def narrow_in_place(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The contiguous fp32 ``block (c, V)`` rounded to the 16-bit ``dtype``, written into the first
    half of its own storage (the fp32 values are gone): no second block.

    ``STATS_ROWS`` rows at a time through a small temporary: 16-bit rows ``[a, b)`` occupy the bytes
    of fp32 rows ``[a/2, b/2)``, all of which were read by then.
    """
    rows, vocab = block.shape
    out = block.view(-1).view(dtype)[: rows * vocab].view(rows, vocab)
    for start in range(0, rows, STATS_ROWS):
        sl = slice(start, start + STATS_ROWS)
        out[sl] = block[sl].to(dtype)
    return out
