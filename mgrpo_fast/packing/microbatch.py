"""One packed micro-batch: sequences laid end to end in flat token rows, no padding.

A sequence is ``prompt + completion``. The log-prob of completion token ``j`` (at flat position
``p``) is read from the hidden state of row ``p - 1`` (next-token prediction), so the rows that
need a log-prob are ``loss_rows = p - 1`` and their targets are ``input_ids[p]``. Prompt tokens, and
completion tokens whose loss mask is 0 (e.g. the layer-1 answer that is context in a layer-2
correction), cost nothing in the log-prob computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSpec:
    """A sequence to pack.

    Attributes:
        prompt_ids: token ids of the context (at least one token).
        completion_ids: token ids of the sampled completion.
        loss_mask: per completion token, 1 if it carries the loss (default: all 1).
    """

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    loss_mask: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if len(self.prompt_ids) < 1:
            raise ValueError(
                "prompt_ids: expected at least one token (the first completion token needs a context)"
            )
        if self.loss_mask is not None and len(self.loss_mask) != len(self.completion_ids):
            raise ValueError(
                f"loss_mask: expected one entry per completion token ({len(self.completion_ids)}), "
                f"got {len(self.loss_mask)}"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_loss_tokens(self) -> int:
        if self.loss_mask is None:
            return len(self.completion_ids)
        return sum(1 for m in self.loss_mask if m)


@dataclass(frozen=True)
class PackedMicroBatch:
    """Flat tensors of one micro-batch (all on ``input_ids.device``).

    Attributes:
        input_ids: ``(T,)`` int64 tokens of all sequences, end to end.
        position_ids: ``(T,)`` int64 positions, restarting at 0 for each sequence.
        cu_seqlens: ``(S+1,)`` int32 sequence boundaries (flash-attention varlen convention).
        max_seqlen: the longest sequence.
        loss_rows: ``(L,)`` int64 rows whose hidden state predicts a loss token.
        loss_targets: ``(L,)`` int64 the predicted token ids, ``input_ids[loss_rows + 1]``.
        loss_seq: ``(L,)`` int64 for each loss row, the index of its sequence in ``seq_index``'s
            numbering (the caller's sequence ids).
        loss_pos: ``(L,)`` int64 for each loss row, the index of its token within the completion.
        seq_index: the caller's ids of the packed sequences, in packing order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss_rows: torch.Tensor
    loss_targets: torch.Tensor
    loss_seq: torch.Tensor
    loss_pos: torch.Tensor
    seq_index: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_loss_tokens(self) -> int:
        return self.loss_rows.numel()

    def to(self, device: torch.device | str) -> PackedMicroBatch:
        """The same micro-batch with every tensor on ``device`` (non-blocking where possible)."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedMicroBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            loss_rows=move(self.loss_rows),
            loss_targets=move(self.loss_targets),
            loss_seq=move(self.loss_seq),
            loss_pos=move(self.loss_pos),
            seq_index=self.seq_index,
        )


def build_microbatch(
    sequences: Sequence[SequenceSpec], seq_index: Sequence[int] | None = None
) -> PackedMicroBatch:
    """Pack ``sequences`` (in the given order) into one ``PackedMicroBatch`` on the CPU.

    ``seq_index`` gives each sequence's id for ``loss_seq`` (default ``0..S-1``).
    """
    seq_index = tuple(range(len(sequences))) if seq_index is None else tuple(seq_index)
    if len(seq_index) != len(sequences):
        raise ValueError(f"seq_index: expected {len(sequences)} ids (one per sequence), got {len(seq_index)}")
    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    rows: list[int] = []
    loss_seq: list[int] = []
    loss_pos: list[int] = []
    for sid, seq in zip(seq_index, sequences):
        start = len(ids)
        ids.extend(int(t) for t in seq.prompt_ids)
        completion_start = len(ids)
        ids.extend(int(t) for t in seq.completion_ids)
        positions.extend(range(seq.num_tokens))
        bounds.append(len(ids))
        mask = seq.loss_mask if seq.loss_mask is not None else [1] * len(seq.completion_ids)
        for j, keep in enumerate(mask):
            if keep:
                rows.append(completion_start + j - 1)
                loss_seq.append(sid)
                loss_pos.append(j)
        assert bounds[-1] - start == seq.num_tokens
    input_ids = torch.tensor(ids, dtype=torch.int64)
    loss_rows = torch.tensor(rows, dtype=torch.int64)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return PackedMicroBatch(
        input_ids=input_ids,
        position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=max(lengths, default=0),
        loss_rows=loss_rows,
        loss_targets=input_ids[loss_rows + 1] if rows else torch.zeros(0, dtype=torch.int64),
        loss_seq=torch.tensor(loss_seq, dtype=torch.int64),
        loss_pos=torch.tensor(loss_pos, dtype=torch.int64),
        seq_index=seq_index,
    )
