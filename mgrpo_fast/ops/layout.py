"""Token layouts: padded ``(B, T)`` batches and packed ``(N,)`` rows with ``cu_seqlens``.

The loss math works on flat token rows plus a ``seq_id`` per row, so the padded and the packed
layouts share one implementation. ``SequenceLayout`` holds that grouping and the two segmented
operations the loss needs (per-sequence sums and broadcasting a per-sequence value to its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mgrpo_fast.ops.validation import check_integer, check_ndim


@dataclass(frozen=True)
class SequenceLayout:
    """How ``num_tokens`` flat rows group into ``num_seqs`` sequences.

    Attributes:
        seq_id: ``(N,)`` int64, the sequence of each row (non-decreasing).
        lengths: ``(S,)`` int64 rows per sequence; sequences may be empty in the packed layout.
        max_len: the longest sequence (``T`` for a padded batch); the default ``dr_grpo`` length.
    """

    seq_id: torch.Tensor
    lengths: torch.Tensor
    max_len: int

    @property
    def num_seqs(self) -> int:
        return self.lengths.numel()

    @property
    def num_tokens(self) -> int:
        return self.seq_id.numel()

    @classmethod
    def padded(cls, batch: int, length: int, device: torch.device) -> SequenceLayout:
        """Row-major ``(B, T)`` flattened to ``B*T`` rows: row ``b*T + t`` belongs to sequence ``b``."""
        seq_id = torch.arange(batch, device=device).repeat_interleave(length)
        lengths = torch.full((batch,), length, dtype=torch.int64, device=device)
        return cls(seq_id=seq_id, lengths=lengths, max_len=length)

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, num_tokens: int) -> SequenceLayout:
        """From ``cu_seqlens (S+1,)``: sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``."""
        validate_cu_seqlens(cu_seqlens, num_tokens)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_id = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=num_tokens
        )
        max_len = int(lengths.max()) if lengths.numel() else 0
        return cls(seq_id=seq_id, lengths=lengths, max_len=max_len)

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``(N,)`` -> ``(S,)``: the sum of each sequence's rows (0 for an empty sequence).

        ``segment_reduce`` sums each contiguous segment in a fixed order (no atomics), so the
        result is bit-identical run to run, unlike ``index_add`` on CUDA.
        """
        return torch.segment_reduce(values, "sum", lengths=self.lengths, unsafe=True)

    def per_token(self, per_seq: torch.Tensor) -> torch.Tensor:
        """``(S,)`` -> ``(N,)``: each row gets the value of its sequence."""
        return per_seq.index_select(0, self.seq_id)


def validate_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """``cu_seqlens`` must be a 1-D integer tensor starting at 0, non-decreasing, ending at N."""
    check_integer("cu_seqlens", cu_seqlens)
    check_ndim("cu_seqlens", cu_seqlens, (1,), "a 1-D tensor (S+1,) of sequence boundaries")
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens: expected at least one entry (S+1 >= 1), got an empty tensor")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
    if last != num_tokens:
        raise ValueError(
            f"cu_seqlens: expected cu_seqlens[-1] == N = {num_tokens} (the number of token rows), got {last}"
        )
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected non-decreasing boundaries, got {cu_seqlens.tolist()[:16]}")


def cu_seqlens_from_lengths(
    lengths: list[int] | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """``[3, 1, 2]`` -> ``tensor([0, 3, 4, 6], dtype=int32)`` (the flash-attention convention)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(torch.int32)
