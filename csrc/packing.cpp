// mgrpo_fast._C: the optional C++ half of mgrpo_fast.packing.
//
// Plain CPython extension (Python C API, C++17, no torch headers) so that it builds in seconds and
// the build environment needs no torch. Every function here has a pure-Python twin (in
// mgrpo_fast/packing.py and mgrpo_fast/_packing_python.py) that returns bit-identical results;
// tests/test_packing_ffd.py and tests/test_packing_planner.py check that. The cores run without the GIL.
//
// first_fit_decreasing(lengths, capacity) -> list[int]
//   Assigns each item to a bin, returns the bin index of each item (in input order).
//   1. Order items by length descending, ties by original index ascending.
//   2. For each item of length L, take the lowest-index open bin whose remaining capacity is >= L;
//      if there is none, open a new bin (bins are numbered in the order they are opened).
//   3. A new bin starts with remaining = max(0, capacity - L): an item longer than `capacity` gets a
//      bin of its own that nothing of positive length can join.
//   Errors: TypeError if `lengths` is not iterable or an element / `capacity` is not an integer
//   (anything with __index__); ValueError if a length is negative, `capacity` <= 0, or a value does
//   not fit in a signed 64-bit integer.
//
// plan_microbatches(...): the packing planner, in csrc/planner.cpp.
//
// Lowest-index-fit query in O(log n): a max segment tree over n bin slots (n = number of items, the
// most bins there can ever be). Slots not opened yet hold `capacity`, so "lowest open bin that fits,
// else a new one" is simply "lowest slot that fits" whenever L <= capacity: every opened bin comes
// before every unopened one. Only L > capacity needs the explicit new-bin branch.

#include "packing.h"

#include <algorithm>
#include <new>
#include <utility>

namespace mgrpo_fast {
namespace {

// Converts one Python integer-like object to int64. Returns false with a Python error set.
bool to_int64(PyObject* obj, const char* what, Py_ssize_t index, int64_t* out) {
  if (!PyIndex_Check(obj)) {
    if (index >= 0) {
      PyErr_Format(PyExc_TypeError, "first_fit_decreasing: lengths[%zd] must be an integer, got %s",
                   index, Py_TYPE(obj)->tp_name);
    } else {
      PyErr_Format(PyExc_TypeError, "first_fit_decreasing: %s must be an integer, got %s", what,
                   Py_TYPE(obj)->tp_name);
    }
    return false;
  }
  int overflow = 0;
  long long value;
  if (PyLong_CheckExact(obj)) {  // fast path for plain ints
    value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  } else {
    PyObject* as_int = PyNumber_Index(obj);
    if (as_int == nullptr) return false;
    value = PyLong_AsLongLongAndOverflow(as_int, &overflow);
    Py_DECREF(as_int);
  }
  if (value == -1 && PyErr_Occurred()) return false;
  if (overflow != 0) {
    if (index >= 0) {
      PyErr_Format(PyExc_ValueError,
                   "first_fit_decreasing: lengths[%zd] does not fit in a signed 64-bit integer", index);
    } else {
      PyErr_Format(PyExc_ValueError,
                   "first_fit_decreasing: %s does not fit in a signed 64-bit integer", what);
    }
    return false;
  }
  *out = static_cast<int64_t>(value);
  return true;
}

int bit_length(uint64_t x) {
  int bits = 0;
  for (; x != 0; x >>= 1) ++bits;
  return bits;
}

}  // namespace

// Item indices ordered by (length desc, index asc), a total order, so any correct sort gives the same
// result as a stable sort. When (max - length, index) packs into one uint64 key, the keys are sorted
// (LSD radix sort for large n: several times faster than std::sort at 100k items); otherwise pairs are.
void visit_order(const int64_t* lengths, size_t n, size_t* order, std::vector<uint64_t>& key_buffer,
                 std::vector<uint64_t>& scratch_buffer) {
  if (n == 0) return;
  const auto [min_it, max_it] = std::minmax_element(lengths, lengths + n);
  const int64_t max_len = *max_it;
  const int index_bits = bit_length(n - 1);
  const int length_bits = bit_length(static_cast<uint64_t>(max_len - *min_it));
  if (length_bits + index_bits > 64) {
    std::vector<std::pair<int64_t, size_t>> pairs(n);
    for (size_t i = 0; i < n; ++i) pairs[i] = {lengths[i], i};
    std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (size_t i = 0; i < n; ++i) order[i] = pairs[i].second;
    return;
  }
  uint64_t* keys = ensure(key_buffer, n);
  for (size_t i = 0; i < n; ++i) {
    keys[i] = (static_cast<uint64_t>(max_len - lengths[i]) << index_bits) | i;
  }
  if (n < 4096) {
    std::sort(keys, keys + n);
  } else {
    // The keys start in index order and LSD radix sort is stable, so sorting on the length bits
    // alone leaves ties in index order: the index bits need no pass. Digits of <= 16 bits, as few
    // passes as possible (one for lengths spanning < 65536 tokens).
    const int passes = (length_bits + 15) / 16;
    const int digit_bits = passes ? (length_bits + passes - 1) / passes : 0;
    const uint64_t digit_mask = (uint64_t{1} << digit_bits) - 1;
    uint64_t* scratch = ensure(scratch_buffer, n);
    std::vector<size_t> start(static_cast<size_t>(digit_mask) + 2);
    for (int pass = 0; pass < passes; ++pass) {
      const int shift = index_bits + pass * digit_bits;
      std::fill(start.begin(), start.end(), 0);
      for (size_t i = 0; i < n; ++i) ++start[((keys[i] >> shift) & digit_mask) + 1];
      for (size_t d = 0; d + 1 < start.size(); ++d) start[d + 1] += start[d];
      for (size_t i = 0; i < n; ++i) scratch[start[(keys[i] >> shift) & digit_mask]++] = keys[i];
      std::swap(keys, scratch);
    }
  }
  const uint64_t index_mask = (uint64_t{1} << index_bits) - 1;  // index_bits < 64: n < 2^63
  for (size_t i = 0; i < n; ++i) order[i] = static_cast<size_t>(keys[i] & index_mask);
}

namespace {

// Upper bound on the bins first-fit opens for `sizes` (at most n): one per item longer than
// `capacity`, plus floor(2 * total / capacity) + 1 for the others, `total` = their sum. Proof: of the
// bins opened by items <= capacity at most one ends up at most half full (bin j's first item, of size
// <= content_j, would have fit into an earlier bin i that is at most half full), so with k such bins
// (k - 1) * capacity / 2 < total. Slots past the bound are never used, so a tree over only that many
// slots gives the same bins -- and a small tree stays in cache, which is most of FFD's speed.
size_t bin_slots(const int64_t* sizes, size_t n, int64_t capacity) {
  uint64_t whole = 0, rest = 0;  // total = whole * capacity + rest, rest < capacity (no overflow)
  size_t overlong = 0;
  for (size_t k = 0; k < n; ++k) {
    if (sizes[k] > capacity) {
      ++overlong;
      continue;
    }
    rest += static_cast<uint64_t>(sizes[k]);  // < 2 * capacity < 2^64
    if (rest >= static_cast<uint64_t>(capacity)) {
      rest -= static_cast<uint64_t>(capacity);
      ++whole;
    }
  }
  // floor(2 * total / capacity) = 2 * whole + floor(2 * rest / capacity), and 2 * rest < 2^64.
  const uint64_t half_full = 2 * rest >= static_cast<uint64_t>(capacity) ? 1 : 0;
  return static_cast<size_t>(std::min<uint64_t>(n, overlong + 2 * whole + half_full + 1));
}

}  // namespace

void ffd_in_order(const int64_t* sizes, size_t n, int64_t capacity, int64_t* bin_of, std::vector<int64_t>& buffer) {
  if (n == 0) return;
  const size_t slots = bin_slots(sizes, n, capacity);
  size_t size = 1;
  while (size < slots) size <<= 1;
  // tree[size + b] = remaining capacity of bin slot b; inner nodes hold the max of their children.
  // Padding slots (b >= slots) are -1 so they never fit (they are never needed either).
  int64_t* tree = ensure(buffer, 2 * size);
  std::fill(tree + size + slots, tree + 2 * size, -1);
  std::fill(tree + size, tree + size + slots, capacity);
  for (size_t node = size - 1; node >= 1; --node) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);

  size_t num_bins = 0;
  for (size_t k = 0; k < n; ++k) {
    const int64_t len = sizes[k];
    size_t node;
    if (len > capacity) {
      node = size + num_bins;  // over-long: a new bin of its own
      tree[node] = 0;
    } else {
      node = 1;  // descend to the leftmost slot with remaining >= len (the root always qualifies)
      while (node < size) node = 2 * node + (tree[2 * node] < len);  // branch-free descent
      tree[node] -= len;
    }
    const size_t bin = node - size;
    bin_of[k] = static_cast<int64_t>(bin);
    if (bin + 1 > num_bins) num_bins = bin + 1;
    for (node >>= 1; node >= 1; node >>= 1) {
      const int64_t m = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == m) break;  // ancestors are unchanged too
      tree[node] = m;
    }
  }
}

namespace {

void ffd_core(const std::vector<int64_t>& lengths, int64_t capacity, std::vector<int64_t>& bin_of) {
  const size_t n = lengths.size();
  if (n == 0) return;
  std::vector<size_t> order(n);
  std::vector<uint64_t> keys, scratch;
  visit_order(lengths.data(), n, order.data(), keys, scratch);
  std::vector<int64_t> sizes(n), bins(n), tree;
  for (size_t k = 0; k < n; ++k) sizes[k] = lengths[order[k]];
  ffd_in_order(sizes.data(), n, capacity, bins.data(), tree);
  for (size_t k = 0; k < n; ++k) bin_of[order[k]] = bins[k];
}

PyObject* first_fit_decreasing(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"lengths", "capacity", nullptr};
  PyObject* lengths_obj = nullptr;
  PyObject* capacity_obj = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:first_fit_decreasing", const_cast<char**>(keywords),
                                   &lengths_obj, &capacity_obj)) {
    return nullptr;
  }

  // Same check order as the Python twin: lengths (type, then value, per element), then capacity.
  PyObject* seq = PySequence_Fast(lengths_obj, "first_fit_decreasing: lengths must be an iterable of integers");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<int64_t> lengths(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t v;
    if (!to_int64(items[i], "lengths", i, &v)) {
      Py_DECREF(seq);
      return nullptr;
    }
    if (v < 0) {
      Py_DECREF(seq);
      PyErr_Format(PyExc_ValueError, "first_fit_decreasing: lengths[%zd] = %lld is negative", i,
                   static_cast<long long>(v));
      return nullptr;
    }
    lengths[static_cast<size_t>(i)] = v;
  }
  Py_DECREF(seq);

  int64_t capacity;
  if (!to_int64(capacity_obj, "capacity", -1, &capacity)) return nullptr;
  if (capacity <= 0) {
    PyErr_Format(PyExc_ValueError, "first_fit_decreasing: capacity must be > 0, got %lld",
                 static_cast<long long>(capacity));
    return nullptr;
  }

  std::vector<int64_t> bin_of(static_cast<size_t>(n));
  bool out_of_memory = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    ffd_core(lengths, capacity, bin_of);
  } catch (const std::bad_alloc&) {  // never let an exception cross the GIL macros
    out_of_memory = true;
  }
  Py_END_ALLOW_THREADS
  if (out_of_memory) return PyErr_NoMemory();

  PyObject* result = PyList_New(n);
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyLong_FromLongLong(static_cast<long long>(bin_of[static_cast<size_t>(i)]));
    if (v == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(result, i, v);
  }
  return result;
}

PyMethodDef methods[] = {
    {"first_fit_decreasing", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(first_fit_decreasing)),
     METH_VARARGS | METH_KEYWORDS,
     "first_fit_decreasing(lengths, capacity) -> list[int]\n\n"
     "Bin index of each item under first-fit-decreasing packing (length desc, index asc; lowest-index\n"
     "bin that fits, else a new bin). See mgrpo_fast.packing.first_fit_decreasing for the contract."},
    {"plan_microbatches", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(plan_microbatches)),
     METH_VARARGS | METH_KEYWORDS,
     "plan_microbatches(lengths, budget, world_size, max_model_len, attention_len)\n"
     "    -> (ranks, tokens_per_rank, attention_per_rank, num_padding, num_overlong)\n\n"
     "Core of mgrpo_fast.packing.plan_microbatches (max_model_len=0: no limit; attention_len=0:\n"
     "balance='tokens'); see its docstring."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "mgrpo_fast._C",
    "Optional C++ helpers of mgrpo_fast (packing); each has a pure-Python fallback with identical results.",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace
}  // namespace mgrpo_fast

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mgrpo_fast::module_def); }
