// mgrpo_fast._C: the optional C++ half of mgrpo_fast.packing.
//
// Plain CPython extension (Python C API, C++17, no torch headers) so that it builds in seconds and
// the build environment needs no torch. Every function here has a pure-Python twin in
// mgrpo_fast/packing.py that returns bit-identical results; tests/test_packing_ffd.py checks that.
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
// Lowest-index-fit query in O(log n): a max segment tree over n bin slots (n = number of items, the
// most bins there can ever be). Slots not opened yet hold `capacity`, so "lowest open bin that fits,
// else a new one" is simply "lowest slot that fits" whenever L <= capacity: every opened bin comes
// before every unopened one. Only L > capacity needs the explicit new-bin branch.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

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

// Item indices ordered by (length desc, index asc), a total order, so any correct sort gives the same
// result as a stable sort. When (max - length, index) packs into one uint64 key, the keys are sorted
// (LSD radix sort for large n: several times faster than std::sort at 100k items); otherwise pairs are.
std::vector<size_t> visit_order(const std::vector<int64_t>& lengths) {
  const size_t n = lengths.size();
  std::vector<size_t> order(n);
  const auto [min_it, max_it] = std::minmax_element(lengths.begin(), lengths.end());
  const int64_t max_len = *max_it;
  const int index_bits = bit_length(n - 1);
  const int key_bits = bit_length(static_cast<uint64_t>(max_len - *min_it)) + index_bits;
  if (key_bits > 64) {
    std::vector<std::pair<int64_t, size_t>> pairs(n);
    for (size_t i = 0; i < n; ++i) pairs[i] = {lengths[i], i};
    std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (size_t i = 0; i < n; ++i) order[i] = pairs[i].second;
    return order;
  }
  std::vector<uint64_t> keys(n);
  for (size_t i = 0; i < n; ++i) {
    keys[i] = (static_cast<uint64_t>(max_len - lengths[i]) << index_bits) | i;
  }
  if (n < 4096) {
    std::sort(keys.begin(), keys.end());
  } else {
    constexpr int kDigitBits = 16;
    constexpr size_t kBuckets = size_t{1} << kDigitBits;
    std::vector<uint64_t> scratch(n);
    std::vector<size_t> start(kBuckets + 1);
    for (int shift = 0; shift < key_bits; shift += kDigitBits) {
      std::fill(start.begin(), start.end(), 0);
      for (uint64_t k : keys) ++start[((k >> shift) & (kBuckets - 1)) + 1];
      for (size_t d = 0; d < kBuckets; ++d) start[d + 1] += start[d];
      for (uint64_t k : keys) scratch[start[(k >> shift) & (kBuckets - 1)]++] = k;
      keys.swap(scratch);
    }
  }
  const uint64_t index_mask = (uint64_t{1} << index_bits) - 1;  // index_bits < 64: n < 2^63
  for (size_t i = 0; i < n; ++i) order[i] = static_cast<size_t>(keys[i] & index_mask);
  return order;
}

// The packing itself: pure C++, runs without the GIL.
void ffd_core(const std::vector<int64_t>& lengths, int64_t capacity, std::vector<int64_t>& bin_of) {
  const size_t n = lengths.size();
  if (n == 0) return;
  const std::vector<size_t> order = visit_order(lengths);

  size_t size = 1;
  while (size < n) size <<= 1;
  // tree[size + b] = remaining capacity of bin slot b; inner nodes hold the max of their children.
  // Padding slots (b >= n) are -1 so they never fit (they are never needed either).
  std::vector<int64_t> tree(2 * size, -1);
  for (size_t b = 0; b < n; ++b) tree[size + b] = capacity;
  for (size_t node = size - 1; node >= 1; --node) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);

  size_t num_bins = 0;
  for (const size_t item : order) {
    const int64_t len = lengths[item];
    size_t node;
    if (len > capacity) {
      node = size + num_bins;  // over-long: a new bin of its own
      tree[node] = 0;
    } else {
      node = 1;  // descend to the leftmost slot with remaining >= len (the root always qualifies)
      while (node < size) node = tree[2 * node] >= len ? 2 * node : 2 * node + 1;
      tree[node] -= len;
    }
    const size_t bin = node - size;
    bin_of[item] = static_cast<int64_t>(bin);
    if (bin + 1 > num_bins) num_bins = bin + 1;
    for (node >>= 1; node >= 1; node >>= 1) {
      const int64_t m = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == m) break;  // ancestors are unchanged too
      tree[node] = m;
    }
  }
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
  Py_BEGIN_ALLOW_THREADS
  ffd_core(lengths, capacity, bin_of);
  Py_END_ALLOW_THREADS

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

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
