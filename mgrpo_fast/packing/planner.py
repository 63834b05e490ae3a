"""Packing of sequences into token-budgeted micro-batches, balanced across ranks.

Two public entry points, each with a C++ core in the extension ``mgrpo_fast._C`` (``csrc/packing.cpp``,
used when built) and a pure-Python twin (``impl="python"``) that returns bit-identical results:

* :func:`first_fit_decreasing`: the bin-packing building block;
* :func:`plan_microbatches`: the packing planner, which returns a :class:`Plan`.

``first_fit_decreasing(lengths, capacity)`` contract:

1. Items are visited by length descending, ties by original index ascending.
2. Each item of length ``L`` goes into the lowest-index open bin whose remaining capacity is ``>= L``;
   if there is none, a new bin is opened. Bins are numbered ``0, 1, ...`` in the order they are opened.
3. A new bin starts with ``remaining = max(0, capacity - L)``. So an item longer than ``capacity`` gets
   a bin of its own, which only zero-length items can join (and since zero-length items come last and
   every open bin has ``remaining >= 0``, all zero-length items land in bin 0).
4. The result is a list with, for each item in input order, the index of its bin.

Errors: ``TypeError`` if ``lengths`` is not an iterable of integers or ``capacity`` is not an integer
(any object with ``__index__`` counts: ``int``, numpy / torch integer scalars; floats do not);
``ValueError`` if a length is negative, ``capacity <= 0``, or a value does not fit in a signed 64-bit
integer. Lengths are checked in order (type, then value, per element) before ``capacity``.

Both implementations find "the lowest-index bin that fits" in O(log n) with a max segment tree over
the bin slots (see :func:`mgrpo_fast.packing.planner_python.ffd_in_order`).

The planner (``L`` = a sequence's token count, prompt + completion; ``L_max`` = the longest of the batch):

1. **Ranks.** Sequences are visited by ``L`` descending (ties: index ascending); each goes to one rank.
   A rank is *admissible* for a sequence if ``tokens[r] + L <= min(tokens) + L_max``. Among the
   admissible ranks the planner takes the least key, a total order, so ties are deterministic:

   * ``balance="attention"`` (default): key ``(cost[r], tokens[r], r)`` with
     ``cost[r] = attention_len * tokens[r] + attention[r]`` and ``attention[r] = sum(L**2)`` over the
     rank's sequences. ``cost`` is proportional to a transformer's FLOPs: per layer, the projections
     and the MLP cost ``~ L`` and attention ``~ L**2``; ``attention_len`` is the length at which the
     two are equal, ``~ 4 * hidden_size + 3 * intermediate_size`` for a SwiGLU model (33k for
     Qwen2.5-1.5B, hence the default 32768; 18k for 0.5B, 71k for 7B).
   * ``balance="tokens"``: key ``(tokens[r], attention[r], r)``, plain LPT on token counts (the
     least-loaded rank is always admissible, so the window never binds).

2. **Micro-batches.** Each rank's sequences are packed by first-fit-decreasing under
   ``max_tokens_per_microbatch``. A micro-batch lists its sequence indices ascending (the packing
   order); a rank's micro-batches come fullest first (ties: FFD opening order), so the ``k``-th
   micro-batches of all ranks, which run in lockstep under FSDP, are of similar size.
3. **Padding.** Every rank gets the same number of micro-batches: shorter ranks are padded at the end
   with empty micro-batches ``()``. Under FSDP / DeepSpeed every forward and backward runs collectives
   (parameter all-gathers, gradient reduce-scatters) that all ranks must join; a rank that ran out of
   micro-batches would leave the others waiting forever. An empty micro-batch builds to zero-token
   tensors; the trainer still runs its step (e.g. on one dummy token with zero loss weight).

**Guarantee** (both modes, proven): ``max(tokens) - min(tokens) <= L_max``. Proof: it holds at the
start (all zero). Let ``m`` be the least load before a sequence of length ``L`` goes to an admissible
rank ``r``. Afterwards ``tokens[r] <= m + L_max`` and every other load is unchanged, so the maximum is
at most ``max(old maximum, m + L_max) = m + L_max``; loads only grow, so the new minimum is ``>= m``.
For ``"tokens"`` the classic LPT argument gives more: the spread is at most the last sequence added to
the fullest rank. For ``"attention"`` the cost spread is, in every case tested (exhaustively on small
inputs, and by tests/packing/test_packing_planner.py), at most the cost of the longest sequence,
``attention_len * L_max + L_max**2`` -- what plain LPT on the cost would guarantee, but not proven
here. On long-tailed GRPO rollouts it cuts the FLOP imbalance across ranks by about a third versus
``"tokens"``. Every micro-batch holds at most ``max_tokens_per_microbatch`` tokens unless it is one
sequence longer than that (logged as a warning, once per plan, with the count). Why ranks first and
micro-batches second: LPT over whole micro-batches could only bound the spread by a micro-batch
(three full micro-batches on two ranks differ by one).

Cost: O(n log n + n log W) (``W`` = world size; ``"attention"`` may also pop inadmissible ranks from
its heap, at worst O(W) per sequence). The C++ path plans 100k sequences in 9-16 ms on a 2-core CI
machine (``benchmarks/test_bench_packing.py``); the Python twin takes 0.3-0.5 s.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mgrpo_fast.packing import planner_python as _py
from mgrpo_fast.packing.extension import load_error, load_extension
from mgrpo_fast.packing.microbatch import PackedMicroBatch, SequenceSpec, build_microbatch

__all__ = [
    "Plan",
    "first_fit_decreasing",
    "first_fit_decreasing_python",
    "group_by_bin",
    "plan_microbatches",
]

logger = logging.getLogger(__name__)

Impl = Literal["auto", "cpp", "python"]
Balance = Literal["tokens", "attention"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1  # cu_seqlens is int32: no sequence and no micro-batch budget beyond it


def _as_int(value: object, what: str) -> int:
    """``value`` as a Python int in int64 range, with the errors of the contract."""
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(
            f"first_fit_decreasing: {what} must be an integer, got {type(value).__name__}"
        ) from None
    if not _INT64_MIN <= as_int <= _INT64_MAX:
        raise ValueError(f"first_fit_decreasing: {what} does not fit in a signed 64-bit integer")
    return as_int


def _check_lengths(lengths: Iterable[int]) -> list[int]:
    """Validated copy of ``lengths`` as a list of non-negative Python ints."""
    try:
        items = list(lengths)
    except TypeError:
        raise TypeError("first_fit_decreasing: lengths must be an iterable of integers") from None
    out = []
    for i, value in enumerate(items):
        length = _as_int(value, f"lengths[{i}]")
        if length < 0:
            raise ValueError(f"first_fit_decreasing: lengths[{i}] = {length} is negative")
        out.append(length)
    return out


def _check_capacity(capacity: int) -> int:
    capacity = _as_int(capacity, "capacity")
    if capacity <= 0:
        raise ValueError(f"first_fit_decreasing: capacity must be > 0, got {capacity}")
    return capacity


def first_fit_decreasing_python(lengths: Iterable[int], capacity: int) -> list[int]:
    """Pure-Python first-fit-decreasing; same contract and results as the C++ version.

    Args:
        lengths: (n,) non-negative item sizes (e.g. token counts of sequences).
        capacity: bin size (e.g. the token budget of one micro-batch), > 0.

    Returns:
        (n,) bin index of each item, in input order; bins are numbered in the order they are opened.
    """
    lengths = _check_lengths(lengths)
    capacity = _check_capacity(capacity)
    n = len(lengths)
    if n == 0:
        return []

    # Python's sort is stable, also with reverse=True: ties keep ascending index order.
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)

    bins_in_order = _py.ffd_in_order([lengths[i] for i in order], capacity)
    bin_of = [0] * n
    for item, b in zip(order, bins_in_order):
        bin_of[item] = b
    return bin_of


def first_fit_decreasing(lengths: Iterable[int], capacity: int, *, impl: Impl = "auto") -> list[int]:
    """Bin index of each item under first-fit-decreasing packing (see the module docstring).

    Args:
        lengths: (n,) non-negative integer item sizes: a list/tuple/iterable of ints, or a 1-D integer
            numpy array / torch tensor.
        capacity: bin size, > 0. Items longer than ``capacity`` each get a bin of their own.
        impl: ``"auto"`` uses the C++ extension ``mgrpo_fast._C`` when it is built, else Python;
            ``"cpp"`` requires the extension (``RuntimeError`` if it is missing); ``"python"`` forces
            the pure-Python implementation. All return identical results.

    Returns:
        (n,) list of bin indices, in input order; bins are numbered in the order they are opened.

    Raises:
        TypeError: non-integer length or capacity, or ``lengths`` not iterable.
        ValueError: negative length, ``capacity <= 0``, value outside int64, or an unknown ``impl``.
        RuntimeError: ``impl="cpp"`` and the extension is not built.

    Example:
        >>> first_fit_decreasing([3, 5, 2, 4], capacity=7)
        [1, 0, 0, 1]
    """
    if impl not in ("auto", "cpp", "python"):
        raise ValueError(f"first_fit_decreasing: impl must be 'auto', 'cpp' or 'python', got {impl!r}")
    if hasattr(lengths, "tolist"):  # numpy array / torch tensor -> list of Python ints in one call
        lengths = lengths.tolist()
    ext = _extension("first_fit_decreasing", impl)
    if ext is not None:
        return ext.first_fit_decreasing(lengths, capacity)
    return first_fit_decreasing_python(lengths, capacity)


def _extension(caller: str, impl: str):
    """The C++ extension if ``impl`` asks for it and it is built; ``None`` means: use Python."""
    if impl == "python":
        return None
    ext = load_extension()
    if ext is None and impl == "cpp":
        raise RuntimeError(
            f"{caller}(impl='cpp'): the C++ extension mgrpo_fast._C is not available "
            f"({load_error()}). Reinstall with a C++17 compiler (`pip install -e .`, without "
            "MGRPO_FAST_NO_EXT=1), or use impl='auto' / 'python'."
        )
    return ext


def group_by_bin(bin_of: Iterable[int]) -> list[list[int]]:
    """Invert an assignment: ``bins[b]`` = indices of the items in bin ``b``, ascending.

    Args:
        bin_of: (n,) bin index of each item, as returned by :func:`first_fit_decreasing`
            (bins numbered ``0 .. num_bins - 1`` with none empty).

    Returns:
        ``num_bins`` lists of item indices.
    """
    bins: list[list[int]] = []
    for item, b in enumerate(bin_of):
        while len(bins) <= b:
            bins.append([])
        bins[b].append(item)
    return bins


# ------------------------------------------------------------------------------------------------
# The packing planner
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which sequences each rank packs into each of its micro-batches, plus balance statistics.

    Attributes:
        ranks: ``ranks[r][k]`` = the ``k``-th micro-batch of rank ``r``: a tuple of sequence indices
            (into the planned ``sequences``), ascending, which is the packing order. Every rank has
            ``microbatches_per_rank`` micro-batches; ``()`` is a padding micro-batch.
        lengths: ``(n,)`` token count (prompt + completion) of each planned sequence.
        max_tokens_per_microbatch: the token budget of a micro-batch.
        balance: ``"tokens"`` or ``"attention"``, the rule that assigned sequences to ranks.
        attention_len: the weight of the token count in the ``"attention"`` cost.
        tokens_per_rank: ``(W,)`` sum of the token counts of each rank's sequences.
        attention_per_rank: ``(W,)`` attention cost of each rank, the sum of squared token counts.
        num_padding_microbatches: the number of ``()`` micro-batches, over all ranks.
        num_overlong: sequences longer than ``max_tokens_per_microbatch`` (each one alone in its
            micro-batch).
    """

    ranks: tuple[tuple[tuple[int, ...], ...], ...] = field(repr=False)  # n indices: too long to print
    lengths: tuple[int, ...] = field(repr=False)
    max_tokens_per_microbatch: int
    balance: str
    attention_len: int
    tokens_per_rank: tuple[int, ...]
    attention_per_rank: tuple[int, ...]
    num_padding_microbatches: int
    num_overlong: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def microbatches_per_rank(self) -> int:
        return len(self.ranks[0])

    @property
    def cost_per_rank(self) -> tuple[int, ...]:
        """``(W,)`` the ``"attention"`` balance cost, ``attention_len * tokens + attention``."""
        return tuple(
            self.attention_len * t + a for t, a in zip(self.tokens_per_rank, self.attention_per_rank)
        )

    def microbatches_for(self, rank: int, sequences: Sequence[SequenceSpec]) -> list[PackedMicroBatch]:
        """The tensors of rank ``rank``'s micro-batches, in order (padding ones have zero tokens).

        Args:
            rank: ``0 <= rank < world_size``.
            sequences: the ``n`` sequences the plan was made for; ``loss_seq`` of each micro-batch
                holds indices into them.

        Returns:
            ``microbatches_per_rank`` :class:`PackedMicroBatch`, on the CPU.
        """
        try:
            rank = operator.index(rank)
        except TypeError:
            raise TypeError(f"microbatches_for: rank must be an integer, got {type(rank).__name__}") from None
        if not 0 <= rank < self.world_size:
            raise ValueError(f"microbatches_for: rank must be in [0, {self.world_size}), got {rank}")
        if len(sequences) != self.num_sequences:
            raise ValueError(
                f"microbatches_for: sequences: expected the {self.num_sequences} planned sequences, "
                f"got {len(sequences)}"
            )
        out = []
        for mb in self.ranks[rank]:
            specs = [sequences[i] for i in mb]
            for i, spec in zip(mb, specs):
                if not isinstance(spec, SequenceSpec):
                    raise TypeError(
                        f"microbatches_for: sequences[{i}] must be a SequenceSpec, got {type(spec).__name__}"
                    )
                if spec.num_tokens != self.lengths[i]:
                    raise ValueError(
                        f"microbatches_for: sequences[{i}] has {spec.num_tokens} tokens, but the plan was "
                        f"made for {self.lengths[i]}: pass the sequences that were planned"
                    )
            out.append(build_microbatch(specs, seq_index=mb))
        return out


def plan_microbatches(
    sequences: Sequence[SequenceSpec] | Sequence[int],
    *,
    max_tokens_per_microbatch: int,
    world_size: int = 1,
    max_model_len: int | None = None,
    balance: Balance = "attention",
    attention_len: int = 32768,
    impl: Impl = "auto",
) -> Plan:
    """Pack sequences into micro-batches under a token budget, balanced across ranks.

    The rules, the tie-breaking and the proven bound are in the module docstring: longest sequence
    first onto the best admissible rank, then first-fit-decreasing per rank, then every rank padded
    with empty micro-batches ``()`` to the same count.

    Args:
        sequences: ``(n,)`` :class:`SequenceSpec` objects, or their token counts (ints, or a 1-D
            integer numpy array / torch tensor), each ``>= 1``.
        max_tokens_per_microbatch: token budget of a micro-batch, in ``[1, 2**31 - 1]``. A longer
            sequence gets a micro-batch of its own (one warning per plan, with the count).
        world_size: number of ranks, ``>= 1`` (may exceed ``n``: the extra ranks get only padding).
        max_model_len: if given, a sequence with more tokens is an error.
        balance: ``"attention"`` (default) balances ``attention_len * tokens + sum(L**2)`` (FLOPs)
            within the token window; ``"tokens"`` is plain LPT on token counts. Both keep the
            token spread across ranks ``<= max(L)``.
        attention_len: for ``"attention"``, the sequence length at which a sequence's attention
            FLOPs equal its other FLOPs (``~ 4 * hidden_size + 3 * intermediate_size``), in
            ``[1, 2**31 - 1]``.
        impl: ``"auto"`` (C++ if built, else Python), ``"cpp"`` or ``"python"``: identical plans.

    Returns:
        The :class:`Plan`; ``plan.microbatches_for(rank, sequences)`` builds the tensors.

    Raises:
        TypeError: a non-integer argument or token count.
        ValueError: an argument out of range (the message names it), a sequence with no tokens,
            or one longer than ``max_model_len`` (the message names its index, length and the limit).
        RuntimeError: ``impl="cpp"`` and the extension is not built.

    Example:
        >>> plan = plan_microbatches([5, 3, 4, 2], max_tokens_per_microbatch=8, world_size=2)
        >>> plan.ranks, plan.tokens_per_rank
        (((0, 3),), ((1, 2),)), (7, 7))
    """
    budget = _check_arg("max_tokens_per_microbatch", max_tokens_per_microbatch, _INT32_MAX)
    world_size = _check_arg("world_size", world_size, None)
    if max_model_len is not None:
        max_model_len = _check_arg("max_model_len", max_model_len, _INT32_MAX)
    if balance not in ("tokens", "attention"):
        raise ValueError(f"plan_microbatches: balance must be 'tokens' or 'attention', got {balance!r}")
    attention_len = _check_arg("attention_len", attention_len, _INT32_MAX)
    if impl not in ("auto", "cpp", "python"):
        raise ValueError(f"plan_microbatches: impl must be 'auto', 'cpp' or 'python', got {impl!r}")
    counts = _token_counts(sequences)
    weight = attention_len if balance == "attention" else 0  # the cores' switch: 0 = "tokens"

    ext = _extension("plan_microbatches", impl)
    if ext is not None:
        ranks, tokens, attn, num_padding, num_overlong = ext.plan_microbatches(
            counts, budget, world_size, max_model_len or 0, weight
        )
    else:
        counts = _check_token_counts(counts, max_model_len, weight)
        ranks, tokens, attn, num_padding, num_overlong = _py.plan(counts, budget, world_size, weight)

    if num_overlong:
        logger.warning(
            "plan_microbatches: %d of %d sequences are longer than max_tokens_per_microbatch=%d "
            "(the longest has %d tokens); each gets a micro-batch of its own",
            num_overlong, len(counts), budget, max(counts),
        )  # fmt: skip
    return Plan(
        ranks=tuple(tuple(mbs) for mbs in ranks),
        lengths=tuple(counts),
        max_tokens_per_microbatch=budget,
        balance=balance,
        attention_len=attention_len,
        tokens_per_rank=tuple(tokens),
        attention_per_rank=tuple(attn),
        num_padding_microbatches=num_padding,
        num_overlong=num_overlong,
    )


def _check_arg(name: str, value: object, upper: int | None) -> int:
    """``value`` as an int in ``[1, upper]`` (no upper bound if ``None``); errors name ``name``."""
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"plan_microbatches: {name} must be an integer, got {type(value).__name__}") from None
    if upper is None and as_int < 1:
        raise ValueError(f"plan_microbatches: {name} must be >= 1, got {as_int}")
    if upper is not None and not 1 <= as_int <= upper:
        raise ValueError(f"plan_microbatches: {name} must be in [1, 2**31 - 1], got {as_int}")
    return as_int


def _token_counts(sequences: object) -> list:
    """Token count of each sequence (unchecked when given as numbers: the cores check them)."""
    if hasattr(sequences, "tolist"):  # numpy array / torch tensor -> Python ints in one call
        counts = sequences.tolist()
        if not isinstance(counts, list):
            raise TypeError("plan_microbatches: sequences must be 1-D, got a 0-d array")
        return counts
    if not isinstance(sequences, Iterable):
        raise TypeError(
            "plan_microbatches: sequences must be a sequence of SequenceSpec or of integer token counts, "
            f"got {type(sequences).__name__}"
        )
    items = sequences if isinstance(sequences, list) else list(sequences)
    if not items or not isinstance(items[0], SequenceSpec):
        return items
    try:  # SequenceSpec.num_tokens, inlined: a third faster at 100k sequences
        return [len(spec.prompt_ids) + len(spec.completion_ids) for spec in items]
    except AttributeError:
        bad = next(i for i, spec in enumerate(items) if not isinstance(spec, SequenceSpec))
        raise TypeError(
            f"plan_microbatches: sequences[{bad}] must be a SequenceSpec like sequences[0], "
            f"got {type(items[bad]).__name__}"
        ) from None


def _check_token_counts(counts: list, max_model_len: int | None, attention_len: int) -> list[int]:
    """Validated token counts as Python ints; same checks, order and messages as the C++ core."""
    out = []
    total = longest = 0
    for i, value in enumerate(counts):
        try:
            length = operator.index(value)
        except TypeError:
            raise TypeError(
                f"plan_microbatches: sequences[{i}] must be a SequenceSpec or an integer token count, "
                f"got {type(value).__name__}"
            ) from None
        if length < 1:
            raise ValueError(
                f"plan_microbatches: sequences[{i}] has {length} tokens; a sequence has at least 1"
            )
        if max_model_len is not None and length > max_model_len:
            raise ValueError(
                f"plan_microbatches: sequences[{i}] has {length} tokens, "
                f"more than max_model_len={max_model_len}"
            )
        if length > _INT32_MAX:
            raise ValueError(
                f"plan_microbatches: sequences[{i}] has {length} tokens, "
                "more than 2**31 - 1 (cu_seqlens is int32)"
            )
        out.append(length)
        total += length
        longest = max(longest, length)
    # Every balance key is at most attention_len * total + sum(L**2) <= total * (attention_len + longest).
    if total * (longest + attention_len) > _INT64_MAX:
        raise ValueError(
            "plan_microbatches: too many tokens to plan at once: sum(lengths) * (max(lengths) + "
            "attention_len) must be < 2**63 (the balance keys are int64); plan fewer sequences at a time"
        )
    return out
