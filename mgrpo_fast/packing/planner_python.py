"""Pure-Python twins of the cores in ``csrc/packing.cpp`` (the C++ extension ``mgrpo_fast._C``).

No argument checking here: :mod:`mgrpo_fast.packing` validates, then calls either these functions or
the extension, and the two return identical results (``tests/packing/test_packing_ffd.py`` and
``tests/packing/test_packing_planner.py`` check that). Every tie is broken by a total order, so the result
never depends on how a sort or a heap happens to order equal keys.
"""

from __future__ import annotations

import heapq


def bin_slots(sizes: list[int], capacity: int) -> int:
    """Upper bound on the bins first-fit opens for ``sizes`` (at most ``len(sizes)``).

    One bin per item longer than ``capacity``, plus ``2 * total // capacity + 1`` for the others
    (``total`` = their sum). Proof: of the bins opened by items ``<= capacity`` at most one ends up at
    most half full -- the first item of a later such bin (no larger than that bin's content) would
    have fit into the earlier one -- so ``k`` such bins hold ``total > (k - 1) * capacity / 2``.
    """
    overlong = sum(1 for s in sizes if s > capacity)
    total = sum(s for s in sizes if s <= capacity)
    return min(len(sizes), overlong + 2 * total // capacity + 1)


def ffd_in_order(sizes: list[int], capacity: int) -> list[int]:
    """First-fit of ``sizes`` *in the given order* (the caller sorts them decreasing).

    Each item goes into the lowest-index open bin whose remaining capacity is ``>= size``, else into
    a new bin; a new bin starts with ``max(0, capacity - size)``, so an item longer than
    ``capacity`` gets a bin that only zero-size items can join.

    "Lowest bin that fits" is found in O(log n) with a max segment tree over the bin slots.
    Slots not opened yet hold ``capacity``, so for ``size <= capacity`` the lowest slot that fits is
    the lowest open bin that fits or, if there is none, the next new bin: every opened bin comes
    before every unopened slot. The tree has as many slots as first-fit can open (:func:`bin_slots`),
    so it never runs out, and extra slots would never be reached.

    Args:
        sizes: (n,) non-negative item sizes, in visiting order.
        capacity: bin size, > 0.

    Returns:
        (n,) the bin of each item (same order as ``sizes``); bins are numbered as they are opened.
    """
    n = len(sizes)
    if n == 0:
        return []
    slots = bin_slots(sizes, capacity)
    size = 1 << (slots - 1).bit_length()
    # tree[size + b] = remaining capacity of bin slot b; inner nodes hold the max of their children.
    # Padding slots (b >= slots) hold -1 so they never fit (they are never needed either).
    tree = [-1] * (2 * size)
    tree[size : size + slots] = [capacity] * slots
    for node in range(size - 1, 0, -1):
        left, right = tree[2 * node], tree[2 * node + 1]
        tree[node] = left if left >= right else right

    bin_of = [0] * n
    num_bins = 0
    for k, length in enumerate(sizes):
        if length > capacity:
            node = size + num_bins  # over-long: a new bin of its own
            tree[node] = 0
        else:
            node = 1  # descend to the leftmost slot with remaining >= length (the root always fits)
            while node < size:
                node *= 2
                if tree[node] < length:
                    node += 1
            tree[node] -= length
        bin_index = node - size
        bin_of[k] = bin_index
        if bin_index >= num_bins:
            num_bins = bin_index + 1
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            best = left if left >= right else right
            if tree[node] == best:  # ancestors are unchanged too
                break
            tree[node] = best
            node //= 2
    return bin_of


def assign_ranks(
    lengths: list[int], order: list[int], world_size: int, attention_len: int
) -> tuple[list[list[int]], list[int], list[int]]:
    """Greedy partition of the sequences (visited in ``order``) across ``world_size`` ranks.

    Each sequence of length ``L`` goes to the rank with the least key among the admissible ones:

    * ``attention_len == 0`` (``balance="tokens"``): key ``(tokens, attention, rank)`` over all ranks
      (plain LPT);
    * ``attention_len > 0`` (``balance="attention"``): key ``(cost, tokens, rank)`` with
      ``cost = attention_len * tokens + attention``, over the ranks with
      ``tokens + L <= min(tokens) + longest`` (the token window that keeps the token bound).

    Returns:
        (members, tokens, attention): per rank, its sequences in visiting order; per rank, the sum
        of ``L`` and the sum of ``L**2``.
    """
    members: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    attn = [0] * world_size
    if attention_len == 0:
        heap = [(0, 0, r) for r in range(world_size)]  # sorted, hence a valid heap
        for i in order:
            length = lengths[i]
            t, a, r = heap[0]
            heapq.heapreplace(heap, (t + length, a + length * length, r))
            members[r].append(i)
        for t, a, r in heap:
            tokens[r], attn[r] = t, a
        return members, tokens, attn

    longest = lengths[order[0]] if order else 0
    by_cost = [(0, 0, r) for r in range(world_size)]  # (cost, tokens, rank): one exact entry per rank
    # (tokens, rank) entries; stale ones (tokens moved on) are dropped lazily. Loads only grow.
    by_tokens = [(0, r) for r in range(world_size)]
    skipped: list[tuple[int, int, int]] = []
    for i in order:
        length = lengths[i]
        while by_tokens[0][0] != tokens[by_tokens[0][1]]:
            heapq.heappop(by_tokens)
        limit = by_tokens[0][0] + longest - length  # admissible: tokens <= limit
        while by_cost[0][1] > limit:  # the least-loaded rank is admissible, so this stops
            skipped.append(heapq.heappop(by_cost))
        c, t, r = by_cost[0]
        heapq.heapreplace(by_cost, (c + attention_len * length + length * length, t + length, r))
        for entry in skipped:
            heapq.heappush(by_cost, entry)
        skipped.clear()
        tokens[r] = t + length
        attn[r] += length * length
        heapq.heappush(by_tokens, (t + length, r))
        members[r].append(i)
    return members, tokens, attn


def plan(
    lengths: list[int], budget: int, world_size: int, attention_len: int
) -> tuple[list[list[tuple[int, ...]]], list[int], list[int], int, int]:
    """The planner core: see :func:`mgrpo_fast.packing.planner.plan_microbatches` for the contract.

    Args:
        lengths: (n,) token count of each sequence, each in ``[1, 2**31 - 1]``, with
            ``sum(lengths) * (max(lengths) + attention_len) < 2**63`` (every key fits in int64, as
            in the C++ core).
        budget: ``max_tokens_per_microbatch``, in ``[1, 2**31 - 1]``.
        world_size: number of ranks, >= 1.
        attention_len: 0 for ``balance="tokens"``, else the ``attention_len`` of
            ``balance="attention"``.

    Returns:
        (ranks, tokens, attention, num_padding, num_overlong): ``ranks[r]`` = micro-batches of rank
        ``r``, each a tuple of ascending sequence indices, padded with ``()`` to a common count;
        token and attention sums per rank; the number of ``()`` added; the number of sequences
        longer than ``budget``.
    """
    n = len(lengths)
    # Visit by length descending, ties by index ascending (Python's sort is stable with reverse=True).
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)
    members, tokens, attn = assign_ranks(lengths, order, world_size, attention_len)

    ranks: list[list[tuple[int, ...]]] = []
    for items in members:
        bin_of = ffd_in_order([lengths[i] for i in items], budget)
        num_bins = max(bin_of) + 1 if bin_of else 0
        bins: list[list[int]] = [[] for _ in range(num_bins)]
        bin_tokens = [0] * num_bins
        for i, b in zip(items, bin_of):
            bins[b].append(i)
            bin_tokens[b] += lengths[i]
        # Fullest micro-batch first, ties by opening order: the k-th micro-batches of all ranks
        # (which run in lockstep under FSDP) are then of similar size, and padding comes last.
        by_size = sorted(range(num_bins), key=lambda b: (-bin_tokens[b], b))
        ranks.append([tuple(sorted(bins[b])) for b in by_size])

    per_rank = max(len(mbs) for mbs in ranks)
    num_padding = 0
    for mbs in ranks:
        num_padding += per_rank - len(mbs)
        mbs.extend([()] * (per_rank - len(mbs)))
    num_overlong = sum(1 for length in lengths if length > budget)
    return ranks, tokens, attn, num_padding, num_overlong
