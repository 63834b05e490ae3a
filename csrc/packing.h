// Internals shared by the sources of the extension mgrpo_fast._C (csrc/packing.cpp, csrc/planner.cpp).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mgrpo_fast {

// Building blocks (packing.cpp); pure C++, so callable without the GIL. `keys`, `scratch` and `tree`
// are scratch buffers the caller may keep between calls (their contents do not matter).

// order[0..n) = the indices of lengths[0..n) by (length descending, index ascending).
void visit_order(const int64_t* lengths, size_t n, size_t* order, std::vector<uint64_t>& keys,
                 std::vector<uint64_t>& scratch);

// First-fit of sizes[0..n) in the given order (the caller sorts them decreasing): bin_of[k] = bin of
// item k, bins numbered as they are opened; an item longer than `capacity` gets a bin of its own.
void ffd_in_order(const int64_t* sizes, size_t n, int64_t capacity, int64_t* bin_of, std::vector<int64_t>& tree);

// Grows `buffer` to at least n elements (never shrinks it; kept elements keep their values) and
// returns its data: buffers reused across calls cost neither page faults nor zeroing.
template <typename T>
T* ensure(std::vector<T>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// The planner's Python binding (planner.cpp).
PyObject* plan_microbatches(PyObject* self, PyObject* args, PyObject* kwargs);

}  // namespace mgrpo_fast
