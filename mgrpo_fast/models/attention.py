"""Packed-sequence (varlen) causal attention, registered in transformers as ``"mgrpo_packed"``.

Sequences are laid end to end in one flat row (no padding, see ``mgrpo_fast.packing.microbatch``); each
token attends only to earlier tokens of its own sequence. Importing this module registers
``packed_attention_forward`` in transformers' ``AttentionInterface`` and ``packed_attention_mask``
in its ``AttentionMaskInterface`` under ``ATTN_IMPLEMENTATION = "mgrpo_packed"``; select it with
``from_pretrained(..., attn_implementation="mgrpo_packed")`` or
``model.set_attn_implementation("mgrpo_packed")``. The mask function never builds a dense 4-D
mask: the packing reaches the attention function as keyword arguments of the model forward.

How the packing reaches the attention (transformers 5.x): the decoder model forwards its
``**kwargs`` through every decoder layer into ``attention_interface(module, q, k, v, mask, **kwargs)``.
The packing is read from, in this order:

1. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``(S+1,)`` int, over the flattened ``B*T`` tokens) and
   ``max_length_q`` / ``max_length_k`` — the names transformers' own FlashAttention path uses;
2. else ``position_ids`` (``(B, T)``; the decoder layer passes them on): a sequence starts wherever
   a position is not the previous one plus 1, and at every row start;
3. else every batch row is one sequence.

**Training forwards must pass ``use_cache=False``.** With a KV cache transformers skips its own
packed-sequence detection, and this function refuses key lengths different from the query length
(it is a training/scoring attention; switch to ``"sdpa"`` for generation).

Backends, chosen per call (``MGRPO_FAST_ATTN_BACKEND=auto|flash_attn|torch_varlen|sdpa`` forces one):

* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the package imports (CUDA sm80+,
  bf16/fp16, head dim <= 256): native GQA, sliding window, softcap, dropout; deterministic backward
  under ``torch.use_deterministic_algorithms(True)`` or ``FLASH_ATTENTION_DETERMINISTIC=1``.
* ``torch_varlen``: PyTorch's built-in FlashAttention varlen kernel
  ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA sm80+, bf16/fp16). Its signature
  changed across releases, so it is inspected at run time: causal is ``window_size=(-1, 0)`` where
  that argument exists (2.11+), else ``is_causal=True`` (2.10); ``enable_gqa`` is used where it
  exists, else K/V heads are repeated; ``scale`` where it exists, else q is pre-scaled. No dropout.
* ``sdpa``: ``F.scaled_dot_product_attention``, exact; the CPU / fp32 fallback. Causal attention
  without a sliding window runs as ONE call on the segments right-padded into a ``(S, H, L_max, D)``
  batch (``is_causal=True``: a real query never sees a padded key, which all come after it) when
  the padding costs at most ``PADDED_ATTENTION_MAX_WASTE`` times the attention FLOPs of the segments
  (``S L_max^2 <= waste * Σ L_s^2``); one call per segment costs far more on CPU for short segments.
  Otherwise one call per segment (``is_causal=True``, or a band mask for a sliding window longer
  than the segment), the segments cut by one split per tensor.

Conventions match transformers: query head ``h`` uses KV head ``h // (Hq // Hkv)``; a sliding
window ``W`` keeps keys ``j`` with ``i - W < j <= i`` (flash ``window_size=(W-1, 0)``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "mgrpo_packed"
# The padded single-call SDPA runs when S * L_max^2 <= this * sum of L_s^2 (module doc).
PADDED_ATTENTION_MAX_WASTE = 4.0
BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
BACKEND_ENV = "MGRPO_FAST_ATTN_BACKEND"
# Largest head dim the FlashAttention kernels (both packages) support.
FLASH_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# The packing of one forward
# --------------------------------------------------------------------------------------------
@dataclass
class Packing:
    """Sequence boundaries of the flattened ``(B*T)`` tokens.

    Attributes:
        cu_seqlens: ``(S+1,)`` int32 on the tensors' device, ``0 = c_0 <= ... <= c_S = B*T``.
        max_seqlen: the longest sequence.
        bounds: the same boundaries as host ints (what the per-segment SDPA loop walks).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    bounds: list[int] = field(repr=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, total: int, device: torch.device) -> Packing:
        """Validate ``cu_seqlens`` (one host sync) and build the packing for ``total`` tokens."""
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                "cu_seq_lens_q: expected a 1-D tensor (S+1,) of sequence boundaries, got "
                f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}"
            )
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"cu_seq_lens_q: expected an integer tensor, got dtype {cu_seqlens.dtype}")
        bounds = [int(b) for b in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
            raise ValueError(
                f"cu_seq_lens_q: expected non-decreasing boundaries from 0 to the number of tokens "
                f"B*T = {total}, got [{bounds[0]}, ..., {bounds[-1]}] ({len(bounds) - 1} sequences)"
            )
        max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        return cls(cu_seqlens=cu, max_seqlen=max_seqlen, bounds=bounds)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, batch: int, seq_len: int) -> Packing:
        """Sequences start where a position is not the previous one + 1, and at every row start."""
        pos = position_ids
        if pos.ndim == 1:
            pos = pos[None]
        if pos.ndim != 2 or pos.shape[-1] != seq_len or pos.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids: expected shape (B, T) = ({batch}, {seq_len}) or (1, T), "
                f"got {tuple(position_ids.shape)}"
            )
        pos = pos.expand(batch, seq_len)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        idx = starts.reshape(-1).nonzero().reshape(-1)
        total = batch * seq_len
        cu = torch.cat([idx, idx.new_tensor([total])]).to(torch.int32)
        return cls.from_cu_seqlens(cu, total, pos.device)

    @classmethod
    def one_per_row(cls, batch: int, seq_len: int, device: torch.device) -> Packing:
        bounds = [b * seq_len for b in range(batch + 1)]
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return cls(cu_seqlens=cu, max_seqlen=seq_len, bounds=bounds)


class _OneEntryCache:
    """The packing of the current forward, keyed on the identity (and version) of its source tensor.

    Every layer of one forward receives the same ``cu_seq_lens_q`` / ``position_ids`` object, so
    the host sync that validates the boundaries happens once per forward, not once per layer. A
    reference to the source is kept, so its ``id`` cannot be reused while it is cached.
    """

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._key: tuple = ()
        self._value: Packing | None = None

    def get(self, source: torch.Tensor, key: tuple, build) -> Packing:
        try:
            version = source._version
        except RuntimeError:  # inference tensors have no version counter (and cannot change)
            version = -1
        full_key = (version, source.device, *key)
        if self._source is source and self._key == full_key and self._value is not None:
            return self._value
        value = build()
        self._source, self._key, self._value = source, full_key, value
        return value


_PACKING_CACHE = _OneEntryCache()


def resolve_packing(batch: int, seq_len: int, device: torch.device, kwargs: dict) -> Packing:
    """The packing of ``(B, T) = (batch, seq_len)`` tokens from the attention kwargs (see module doc)."""
    total = batch * seq_len
    cu_q = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is not None:
        cu_q = cu_k
    if cu_q is not None:
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.to(cu_q.device), cu_q):
            raise ValueError(
                "cu_seq_lens_k differs from cu_seq_lens_q: mgrpo_packed is self-attention over the same "
                "packed tokens; pass the same boundaries for both"
            )
        given = kwargs.get("max_length_q")

        def build() -> Packing:
            packing = Packing.from_cu_seqlens(cu_q, total, device)
            if given is not None and int(given) < packing.max_seqlen:
                raise ValueError(
                    f"max_length_q: {int(given)} is shorter than the longest packed sequence "
                    f"({packing.max_seqlen}); pass the true maximum (PackedMicroBatch.max_seqlen)"
                )
            return packing

        return _PACKING_CACHE.get(cu_q, (total,), build)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return _PACKING_CACHE.get(
            position_ids, (batch, seq_len), lambda: Packing.from_position_ids(position_ids, batch, seq_len)
        )
    return Packing.one_per_row(batch, seq_len, device)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
@functools.cache
def _flash_attn_varlen():
    """``(flash_attn_varlen_func, its parameter names)`` or ``None`` when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken build (undefined CUDA symbols)
        return None
    try:
        params = frozenset(inspect.signature(flash_attn_varlen_func).parameters)
    except (TypeError, ValueError):
        params = frozenset()
    return flash_attn_varlen_func, params


@functools.cache
def _torch_varlen():
    """``(torch.nn.attention.varlen.varlen_attn, its parameter names)`` or ``None`` (torch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of {BACKENDS}, got {value!r}")
    return value


def _flash_unsupported(q: torch.Tensor, head_dim: int) -> str | None:
    """Why neither FlashAttention backend can take these tensors (``None`` if they can)."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, FlashAttention needs CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}, FlashAttention needs bf16/fp16"
    if head_dim > FLASH_MAX_HEAD_DIM:
        return f"head dim {head_dim} > {FLASH_MAX_HEAD_DIM}"
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if _cuda_capability(index) < (8, 0):
        return "FlashAttention 2 needs an sm80+ GPU"
    return None


def _torch_varlen_unsupported(
    q: torch.Tensor, sliding_window: int | None, dropout: float, softcap: float | None
) -> str | None:
    found = _torch_varlen()
    if found is None:
        return "torch.nn.attention.varlen is not available (needs torch >= 2.10)"
    if dropout > 0:
        return f"attention dropout {dropout} (varlen_attn has no dropout)"
    if softcap is not None:
        return "logit softcapping (varlen_attn has none)"
    if sliding_window is not None and "window_size" not in found[1]:
        return "a sliding window (this torch's varlen_attn has no window_size)"
    return None


def select_backend(
    q: torch.Tensor,
    *,
    head_dim: int,
    sliding_window: int | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
) -> str:
    """The backend ``varlen_attention`` uses for ``q`` (see the module doc); ``backend`` forces one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _requested_backend()
    if backend == "sdpa":
        return "sdpa"
    why = _flash_unsupported(q, head_dim)
    if backend == "flash_attn":
        why = why or (None if _flash_attn_varlen() is not None else "flash_attn is not installed")
        if why:
            raise RuntimeError(f"attention backend 'flash_attn' cannot run: {why}")
        return "flash_attn"
    if backend == "torch_varlen":
        why = why or _torch_varlen_unsupported(q, sliding_window, dropout, softcap)
        if why:
            raise RuntimeError(f"attention backend 'torch_varlen' cannot run: {why}")
        return "torch_varlen"
    # auto
    if why:
        if q.device.type == "cuda":
            _warn_once(f"mgrpo_packed attention: using per-segment SDPA because of {why}")
        return "sdpa"
    if _flash_attn_varlen() is not None:
        return "flash_attn"
    why = _torch_varlen_unsupported(q, sliding_window, dropout, softcap)
    if why is None:
        return "torch_varlen"
    _warn_once(f"mgrpo_packed attention: flash_attn is not installed and torch varlen cannot run ({why}); "
               "using per-segment SDPA (exact, slower)")  # fmt: skip
    return "sdpa"


def _window(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """FlashAttention's inclusive ``(left, right)`` window; -1 is unbounded."""
    left = -1 if sliding_window is None else sliding_window - 1
    return (left, 0) if causal else (left, left)


def _pad_head_dim(x: torch.Tensor, multiple: int = 8, to: int | None = None) -> torch.Tensor:
    d = x.shape[-1]
    target = to if to is not None else d
    target = -(-target // multiple) * multiple
    return x if target == d else F.pad(x, (0, target - d))


def _flash_attn_forward(q, k, v, packing, *, causal, scale, sliding_window, dropout, softcap):
    fn, params = _flash_attn_varlen()
    v_dim = v.shape[-1]
    width = max(q.shape[-1], v_dim)  # one head dim for q, k and v (flash-attn pads to x8 itself)
    q, k, v = (_pad_head_dim(x, multiple=1, to=width) for x in (q, k, v))
    kwargs = {"dropout_p": dropout, "softmax_scale": scale, "causal": causal}
    if "deterministic" in params:  # deterministic backward (dq without atomics) when torch asks for it
        kwargs["deterministic"] = torch.are_deterministic_algorithms_enabled() or (
            os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
        )
    if sliding_window is not None:
        if "window_size" not in params:
            raise RuntimeError("this flash_attn has no window_size (sliding window); needs flash-attn >= 2.3")
        kwargs["window_size"] = _window(causal, sliding_window)
    if softcap is not None:
        if "softcap" not in params:
            raise RuntimeError("this flash_attn has no softcap; upgrade flash-attn >= 2.6")
        kwargs["softcap"] = softcap
    cu, m = packing.cu_seqlens, packing.max_seqlen
    out = fn(q, k, v, cu, cu, m, m, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    return out[..., :v_dim]


def _torch_varlen_forward(q, k, v, packing, *, causal, scale, sliding_window):
    fn, params = _torch_varlen()
    head_dim, v_dim = q.shape[-1], v.shape[-1]
    n_rep = q.shape[1] // k.shape[1]
    # The aten kernel wants one head dim, a multiple of 8, for q, k and v; the explicit scale keeps
    # the softmax of the unpadded dot products (zero padding adds nothing to q.k).
    width = max(head_dim, v_dim)
    q, k, v = _pad_head_dim(q, to=width), _pad_head_dim(k, to=width), _pad_head_dim(v, to=width)
    kwargs = {}
    if "window_size" in params:  # torch >= 2.11: causal is window_size == (-1, 0) (a tuple)
        kwargs["window_size"] = _window(causal, sliding_window)
    elif "is_causal" in params:  # torch 2.10
        kwargs["is_causal"] = causal
    else:
        raise RuntimeError(f"unrecognized torch.nn.attention.varlen.varlen_attn signature: {sorted(params)}")
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * math.sqrt(q.shape[-1]))  # the kernel divides by sqrt(padded head dim)
    if n_rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    cu, m = packing.cu_seqlens, packing.max_seqlen
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, m, m, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    return out[..., :v_dim]


def _band_mask(length: int, window: int, causal: bool, device: torch.device) -> torch.Tensor:
    """``(L, L)`` bool: key ``j`` visible from query ``i`` (``i - W < j <= i``, or ``|i - j| < W``)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    keep = (i - j) < window
    return keep & (j <= i) if causal else keep & ((j - i) < window)


def _sdpa_segments(q, k, v, packing, *, causal, scale, sliding_window, dropout, softcap):
    """Exact reference backend: one SDPA call per packed segment, concatenated."""
    if softcap is not None:
        raise NotImplementedError("mgrpo_packed: logit softcapping needs the flash_attn backend (CUDA)")
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    # (T, H, D) -> (1, H, T, D) views, cut into the segments by ONE split per tensor: its backward
    # concatenates the segments' gradients once, where a slice per segment would make autograd
    # allocate and fill a zero (1, H, T, D) gradient for every segment (O(S T H D) per tensor)
    # (packing.bounds run from 0 to T: the lengths sum to T)
    lengths = [b - a for a, b in zip(packing.bounds[:-1], packing.bounds[1:])]
    segments = zip(*(x.transpose(0, 1).unsqueeze(0).split(lengths, dim=2) for x in (q, k, v)))
    outs = []
    for length, (q_seg, k_seg, v_seg) in zip(lengths, segments):
        if length == 0:
            continue
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = _band_mask(length, sliding_window, causal, q.device)
        out = F.scaled_dot_product_attention(
            q_seg, k_seg, v_seg,
            attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None and length > 1, scale=scale,
        )  # fmt: skip
        outs.append(out)
    if not outs:  # no tokens at all
        return v.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.squeeze(0).transpose(0, 1)


def _padded_eligible(lengths: list[int], causal: bool, sliding_window: int | None, softcap) -> bool:
    """Whether ``_sdpa_padded`` serves: causal, no window, no softcap, padding waste bounded."""
    if not causal or sliding_window is not None or softcap is not None or len(lengths) < 2:
        return False
    longest = max(lengths)
    return len(lengths) * longest**2 <= PADDED_ATTENTION_MAX_WASTE * sum(n * n for n in lengths)


def _sdpa_padded(q, k, v, packing, *, scale, dropout):
    """Causal attention of every packed segment in ONE SDPA call: the ``(T, H, D)`` rows are scattered
    into a right-padded ``(S, H, L_max, D)`` batch (zeros elsewhere) and gathered back. Exact: with
    ``is_causal=True`` a real query attends only to keys at or before it, all real; the padded
    queries' outputs are dropped (and get no gradient)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    bounds = packing.bounds
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])])
    count, longest = lengths.numel(), int(lengths.max())
    starts = torch.tensor(bounds[:-1])
    # the padded row of every token: segment * L_max + position in the segment
    slot = torch.arange(q.shape[0]) + (torch.arange(count) * longest - starts).repeat_interleave(lengths)
    slot = slot.to(q.device)

    def padded(x: torch.Tensor) -> torch.Tensor:
        rows = x.new_zeros((count * longest, *x.shape[1:])).index_copy(0, slot, x)
        return rows.view(count, longest, *x.shape[1:]).transpose(1, 2)  # (S, H, L_max, D)

    out = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), dropout_p=dropout, is_causal=True, scale=scale
    )
    return out.transpose(1, 2).reshape(count * longest, q.shape[1], v.shape[-1]).index_select(0, slot)


def _varlen_attention(q, k, v, packing: Packing, *, causal, scale, sliding_window, dropout, softcap, backend):
    head_dim = q.shape[-1]
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    scale = float(head_dim**-0.5) if scale is None else float(scale)
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    if softcap is not None and softcap <= 0:
        softcap = None
    chosen = select_backend(
        q, head_dim=max(head_dim, v.shape[-1]), sliding_window=sliding_window, dropout=dropout,
        softcap=softcap, backend=backend,
    )  # fmt: skip
    common = {"causal": causal, "scale": scale, "sliding_window": sliding_window}
    if chosen == "flash_attn":
        return _flash_attn_forward(q, k, v, packing, dropout=dropout, softcap=softcap, **common)
    if chosen == "torch_varlen":
        return _torch_varlen_forward(q, k, v, packing, **common)
    lengths = [b - a for a, b in zip(packing.bounds[:-1], packing.bounds[1:])]
    if _padded_eligible(lengths, causal, sliding_window, softcap):
        return _sdpa_padded(q, k, v, packing, scale=scale, dropout=dropout)
    return _sdpa_segments(q, k, v, packing, dropout=dropout, softcap=softcap, **common)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each packed sequence, never across sequences.

    Args:
        q: ``(T, Hq, D)`` queries of all sequences end to end.
        k: ``(T, Hkv, D)`` keys, ``Hq`` a multiple of ``Hkv`` (GQA: query head ``h`` uses KV head
            ``h // (Hq // Hkv)``).
        v: ``(T, Hkv, Dv)`` values.
        cu_seqlens: ``(S+1,)`` int boundaries, ``0 .. T`` (empty sequences allowed).
        causal: causal (decoder) attention within each sequence.
        scale: softmax scale (default ``D ** -0.5``).
        sliding_window: ``W``: query ``i`` sees keys ``i - W < j <= i`` (transformers' convention).
        dropout: attention dropout probability (``flash_attn`` and ``sdpa`` backends).
        softcap: tanh logit softcap (``flash_attn`` backend only).
        backend: ``"auto"`` (see the module doc), ``"flash_attn"``, ``"torch_varlen"`` or ``"sdpa"``.

    Returns:
        ``(T, Hq, Dv)`` in the dtype of ``q``.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"q, k, v: expected (T, H, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k, v: expected (T, Hq, D), (T, Hkv, D), (T, Hkv, Dv), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    packing = Packing.from_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    return _varlen_attention(
        q, k, v, packing, causal=causal, scale=scale, sliding_window=sliding_window, dropout=dropout,
        softcap=softcap, backend=backend,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------
def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function: ``query (B, Hq, T, D)``, ``key/value (B, Hkv, T, D)``
    -> ``((B, T, Hq, Dv), None)``. The packing comes from ``kwargs`` (see the module doc)."""
    if attention_mask is not None:
        raise ValueError(
            "mgrpo_packed attention got an attention mask; it takes packed rows without padding. Pass "
            "position_ids restarting at 0 per sequence (and cu_seq_lens_q/k, max_length_q/k) instead of a "
            "mask, or use attn_implementation='sdpa' for padded batches"
        )
    if s_aux is not None:
        raise NotImplementedError("mgrpo_packed attention does not support attention sinks (s_aux)")
    batch, num_heads, q_len, _ = query.shape
    if key.shape[2] != q_len:
        raise ValueError(
            f"mgrpo_packed attention: key length {key.shape[2]} != query length {q_len} (a KV cache?). It "
            "is a training/scoring attention: pass use_cache=False, and use model.set_attn_implementation("
            "'sdpa') for generation"
        )
    if kwargs.get("output_attentions"):
        _warn_once("mgrpo_packed attention does not return attention weights (output_attentions ignored)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    packing = resolve_packing(batch, q_len, query.device, kwargs)
    total = batch * q_len
    q = query.transpose(1, 2).reshape(total, num_heads, query.shape[-1])
    k = key.transpose(1, 2).reshape(total, key.shape[1], key.shape[-1])
    v = value.transpose(1, 2).reshape(total, value.shape[1], value.shape[-1])
    out = _varlen_attention(
        q, k, v, packing, causal=bool(causal), scale=scaling, sliding_window=sliding_window,
        dropout=float(dropout), softcap=softcap, backend="auto",
    )  # fmt: skip
    return out.reshape(batch, q_len, num_heads, out.shape[-1]), None


def packed_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> None:
    """transformers ``AttentionMaskInterface`` function: never builds a mask (the packing travels as
    kwargs); refuses a 2-D padding mask with zeros, which this attention would otherwise ignore."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2 and bool(attention_mask.all()):
        return None
    raise ValueError(
        "mgrpo_packed attention takes packed rows without padding, got an attention_mask with padding "
        f"(shape {tuple(attention_mask.shape)}). Pack sequences end to end with position_ids restarting at "
        "0 (mgrpo_fast.packing.microbatch), or use attn_implementation='sdpa' for padded batches"
    )


def register_attention() -> str:
    """Register ``"mgrpo_packed"`` in transformers' attention and mask interfaces (idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("mgrpo_packed attention needs transformers (pip install 'mgrpo-fast[hf]')") from exc
    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packed_attention_mask)
    return ATTN_IMPLEMENTATION


try:
    register_attention()
except ImportError:  # the functional API above still works without transformers
    pass
