"""Bin packing of sequences into token-budgeted micro-batches.

Today this module holds the building block, :func:`first_fit_decreasing`; the packing planner
(micro-batches under a token budget, balanced across ranks) is built on top of it.

``first_fit_decreasing(lengths, capacity)`` contract (the C++ extension ``mgrpo_fast._C`` and the
pure-Python implementation here return bit-identical results):

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
``n`` bin slots (``n`` = number of items, the most bins there can ever be). Slots not opened yet hold
``capacity``, so for ``L <= capacity`` the lowest slot that fits is either the lowest open bin that fits
or, if there is none, the next new bin: every opened bin comes before every unopened slot.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Literal

from mgrpo_fast._ext import load_error, load_extension

__all__ = ["first_fit_decreasing", "first_fit_decreasing_python", "group_by_bin"]

Impl = Literal["auto", "cpp", "python"]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


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

    size = 1 << (n - 1).bit_length()
    # tree[size + b] = remaining capacity of bin slot b; inner nodes hold the max of their children.
    # Padding slots (b >= n) hold -1 so they never fit (they are never needed either).
    tree = [-1] * (2 * size)
    tree[size : size + n] = [capacity] * n
    for node in range(size - 1, 0, -1):
        left, right = tree[2 * node], tree[2 * node + 1]
        tree[node] = left if left >= right else right

    bin_of = [0] * n
    num_bins = 0
    for item in order:
        length = lengths[item]
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
        bin_of[item] = bin_index
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
    if impl != "python":
        ext = load_extension()
        if ext is not None:
            return ext.first_fit_decreasing(lengths, capacity)
        if impl == "cpp":
            raise RuntimeError(
                "first_fit_decreasing(impl='cpp'): the C++ extension mgrpo_fast._C is not available "
                f"({load_error()}). Reinstall with a C++17 compiler (`pip install -e .`, without "
                "MGRPO_FAST_NO_EXT=1), or use impl='auto' / 'python'."
            )
    return first_fit_decreasing_python(lengths, capacity)


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
