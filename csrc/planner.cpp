// The packing planner of mgrpo_fast._C: the core of mgrpo_fast.packing.plan_microbatches, whose
// docstring holds the contract; the pure-Python twin mgrpo_fast._packing_python.plan returns the same
// plans (tests/test_packing_planner.py checks that).
//
// plan_microbatches(lengths, budget, world_size, max_model_len, attention_len)
//     -> (ranks, tokens_per_rank, attention_per_rank, num_padding, num_overlong)
//   max_model_len = 0: no limit; attention_len = 0: balance="tokens".
//   1. Visit the sequences by length descending (ties: index ascending); give each to the rank with
//      the least key among the admissible ranks (tokens + L <= min tokens + longest):
//      key (tokens, attention, rank) for balance="tokens", (attention_len * tokens + attention,
//      tokens, rank) for balance="attention". Keys end with the rank, so the argmin is unique and
//      no tie depends on a data structure's layout.
//   2. First-fit-decreasing of each rank's sequences under `budget`.
//   3. A rank's micro-batches fullest first (ties: opening order), each listing its sequence indices
//      ascending; every rank padded with () to the same count.
//
// Speed (100k sequences in ~10 ms, a third of it reading the input and making the output objects): a
// tournament tree over the ranks (O(log W) per sequence), first-fit on per-rank trees that stay in
// cache, counting sorts, scratch buffers kept per thread between calls (no page faults, no zeroing),
// shared index ints, and no cyclic-GC passes while the output tuples are made.

#include "packing.h"

#include <algorithm>
#include <new>
#include <numeric>

namespace mgrpo_fast {
namespace {

constexpr int64_t kInt32Max = 2147483647;
constexpr size_t kNone = SIZE_MAX;
constexpr size_t kKeepBuffers = size_t{1} << 20;  // larger plans free their scratch buffers afterwards
constexpr const char* kTooManyTokens =
    "plan_microbatches: too many tokens to plan at once: sum(lengths) * (max(lengths) + "
    "attention_len) must be < 2**63 (the balance keys are int64); plan fewer sequences at a time";

// The ranks' loads and a tournament tree over them: each node holds the rank with the least key in
// its subtree (kNone for an empty one) and the least token load there.
class RankTree {
 public:
  void reset(size_t world_size, int64_t attention_len) {
    attention_len_ = attention_len;
    size_ = 1;
    while (size_ < world_size) size_ <<= 1;
    tokens_.assign(world_size, 0);
    attention_.assign(world_size, 0);
    primary_.assign(world_size, 0);
    secondary_.assign(world_size, 0);
    winner_.assign(2 * size_, kNone);
    min_tokens_.assign(2 * size_, INT64_MAX);
    for (size_t r = 0; r < world_size; ++r) {
      winner_[size_ + r] = r;
      min_tokens_[size_ + r] = 0;
    }
    for (size_t node = size_ - 1; node >= 1; --node) pull(node);
  }

  int64_t min_tokens() const { return min_tokens_[1]; }

  // The least key among the ranks with tokens <= limit (the least-loaded rank always qualifies).
  size_t best(int64_t limit) const { return search(1, limit); }

  void add(size_t rank, int64_t len) {
    tokens_[rank] += len;
    attention_[rank] += len * len;
    if (attention_len_ == 0) {
      primary_[rank] = tokens_[rank];
      secondary_[rank] = attention_[rank];
    } else {
      primary_[rank] = attention_len_ * tokens_[rank] + attention_[rank];
      secondary_[rank] = tokens_[rank];
    }
    size_t node = size_ + rank;
    min_tokens_[node] = tokens_[rank];
    for (node >>= 1; node >= 1; node >>= 1) pull(node);
  }

  const std::vector<int64_t>& tokens() const { return tokens_; }
  const std::vector<int64_t>& attention() const { return attention_; }

 private:
  bool less(size_t a, size_t b) const {  // key order; kNone comes after every rank
    if (a == kNone || b == kNone) return b == kNone && a != kNone;
    if (primary_[a] != primary_[b]) return primary_[a] < primary_[b];
    if (secondary_[a] != secondary_[b]) return secondary_[a] < secondary_[b];
    return a < b;
  }

  void pull(size_t node) {
    const size_t a = winner_[2 * node], b = winner_[2 * node + 1];
    winner_[node] = less(b, a) ? b : a;
    min_tokens_[node] = std::min(min_tokens_[2 * node], min_tokens_[2 * node + 1]);
  }

  // The subtree's winner if it is admissible (then it is the best admissible rank there), else the
  // better of the children's answers; subtrees without an admissible rank are skipped.
  size_t search(size_t node, int64_t limit) const {
    if (min_tokens_[node] > limit) return kNone;
    const size_t w = winner_[node];
    if (tokens_[w] <= limit) return w;  // w is a rank: the subtree has one (min_tokens is finite)
    const size_t a = search(2 * node, limit), b = search(2 * node + 1, limit);  // node is internal
    return less(b, a) ? b : a;
  }

  size_t size_ = 1;
  int64_t attention_len_ = 0;
  std::vector<int64_t> tokens_, attention_, primary_, secondary_;  // per rank
  std::vector<size_t> winner_;                                     // per node
  std::vector<int64_t> min_tokens_;                                // per node
};

// Scratch buffers of one planning call, kept per thread between calls (see ensure()).
struct Workspace {
  std::vector<int64_t> lengths, sizes, bin_in_rank, bin_tokens, tree;
  std::vector<uint64_t> keys, scratch;
  std::vector<size_t> order, rank_of, rank_start, fill, by_rank, num_bins, bin_base, slot_of_bin, bin_order,
      slot, start, members;
  RankTree ranks;
  // Output of plan_core: micro-batch s (rank s / per_rank, position s % per_rank) holds the sequences
  // members[start[s] .. start[s + 1]), ascending.
  size_t per_rank = 0;
  int64_t num_padding = 0, num_overlong = 0;
};

#if defined(_MSC_VER)
#define MGRPO_NOINLINE __declspec(noinline)
#else
#define MGRPO_NOINLINE __attribute__((noinline))
#endif

// The calling thread's workspace. Not inlined: code that sees the thread_local itself may recompute
// its address (a __tls_get_addr call, in a shared library) at every use inside the hot loops.
MGRPO_NOINLINE Workspace& thread_workspace() {
  thread_local Workspace workspace;
  return workspace;
}

// The planner on ws.lengths[0..n), pure C++ (runs without the GIL).
void plan_core(Workspace& ws, size_t n, int64_t budget, size_t world_size, int64_t attention_len) {
  const int64_t* lengths = ws.lengths.data();
  size_t* order = ensure(ws.order, n);
  visit_order(lengths, n, order, ws.keys, ws.scratch);

  // 1. Ranks, longest sequence first.
  RankTree& tree = ws.ranks;
  tree.reset(world_size, attention_len);
  size_t* rank_of = ensure(ws.rank_of, n);
  const int64_t longest = n ? lengths[order[0]] : 0;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = order[k];
    const int64_t len = lengths[i];
    const size_t r = tree.best(tree.min_tokens() + longest - len);
    tree.add(r, len);
    rank_of[i] = r;
  }

  // 2. Each rank's sequences in visiting order (a stable split of `order`), then first-fit.
  size_t* rank_start = ensure(ws.rank_start, world_size + 1);
  std::fill(rank_start, rank_start + world_size + 1, 0);
  for (size_t i = 0; i < n; ++i) ++rank_start[rank_of[i] + 1];
  std::partial_sum(rank_start, rank_start + world_size + 1, rank_start);
  size_t* fill = ensure(ws.fill, world_size);
  std::copy(rank_start, rank_start + world_size, fill);
  size_t* by_rank = ensure(ws.by_rank, n);
  int64_t* sizes = ensure(ws.sizes, n);
  for (size_t k = 0; k < n; ++k) {
    const size_t pos = fill[rank_of[order[k]]]++;
    by_rank[pos] = order[k];
    sizes[pos] = lengths[order[k]];
  }
  int64_t* bin_in_rank = ensure(ws.bin_in_rank, n);
  size_t* num_bins = ensure(ws.num_bins, world_size);
  size_t* bin_base = ensure(ws.bin_base, world_size + 1);
  ws.per_rank = 0;
  bin_base[0] = 0;
  for (size_t r = 0; r < world_size; ++r) {
    const size_t lo = rank_start[r], hi = rank_start[r + 1];
    ffd_in_order(sizes + lo, hi - lo, budget, bin_in_rank + lo, ws.tree);
    size_t bins = 0;
    for (size_t k = lo; k < hi; ++k) bins = std::max(bins, static_cast<size_t>(bin_in_rank[k]) + 1);
    num_bins[r] = bins;
    bin_base[r + 1] = bin_base[r] + bins;
    ws.per_rank = std::max(ws.per_rank, bins);
  }

  // 3. Output position of every micro-batch: fullest first, ties by opening order; padding last.
  const size_t total_bins = bin_base[world_size];
  int64_t* bin_tokens = ensure(ws.bin_tokens, total_bins);
  std::fill(bin_tokens, bin_tokens + total_bins, 0);
  for (size_t r = 0; r < world_size; ++r) {
    for (size_t k = rank_start[r]; k < rank_start[r + 1]; ++k) bin_tokens[bin_base[r] + bin_in_rank[k]] += sizes[k];
  }
  size_t* slot_of_bin = ensure(ws.slot_of_bin, total_bins);
  ws.num_padding = 0;
  for (size_t r = 0; r < world_size; ++r) {
    const size_t base = bin_base[r];
    size_t* bins = ensure(ws.bin_order, num_bins[r]);
    std::iota(bins, bins + num_bins[r], size_t{0});
    std::sort(bins, bins + num_bins[r], [&](size_t x, size_t y) {
      const int64_t tx = bin_tokens[base + x], ty = bin_tokens[base + y];
      return tx != ty ? tx > ty : x < y;
    });
    for (size_t k = 0; k < num_bins[r]; ++k) slot_of_bin[base + bins[k]] = r * ws.per_rank + k;
    ws.num_padding += static_cast<int64_t>(ws.per_rank - num_bins[r]);
  }

  // 4. Counting sort of the sequences into their micro-batches, visiting indices ascending.
  size_t* slot = ensure(ws.slot, n);
  for (size_t r = 0; r < world_size; ++r) {
    for (size_t k = rank_start[r]; k < rank_start[r + 1]; ++k) {
      slot[by_rank[k]] = slot_of_bin[bin_base[r] + static_cast<size_t>(bin_in_rank[k])];
    }
  }
  const size_t num_slots = world_size * ws.per_rank;
  size_t* start = ensure(ws.start, num_slots + 1);
  std::fill(start, start + num_slots + 1, 0);
  ws.num_overlong = 0;
  for (size_t i = 0; i < n; ++i) {
    ++start[slot[i] + 1];
    ws.num_overlong += lengths[i] > budget;
  }
  std::partial_sum(start, start + num_slots + 1, start);
  size_t* members = ensure(ws.members, n);
  fill = ensure(ws.fill, num_slots);
  std::copy(start, start + num_slots, fill);
  for (size_t i = 0; i < n; ++i) members[fill[slot[i]]++] = i;
}

// Reads sequences[i]'s token count with the checks (and messages) of packing._check_token_counts.
bool read_length(PyObject* obj, Py_ssize_t i, int64_t max_model_len, int64_t* out) {
  if (!PyIndex_Check(obj)) {
    PyErr_Format(PyExc_TypeError,
                 "plan_microbatches: sequences[%zd] must be a SequenceSpec or an integer token count, got %s",
                 i, Py_TYPE(obj)->tp_name);
    return false;
  }
  PyObject* value = obj;  // a new reference either way: plain ints are used as they are
  if (PyLong_CheckExact(obj)) {
    Py_INCREF(value);
  } else if ((value = PyNumber_Index(obj)) == nullptr) {
    return false;
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
  if (v == -1 && PyErr_Occurred()) {
    Py_DECREF(value);
    return false;
  }
  // overflow > 0 means above int64, so above every limit; overflow < 0 means below 1.
  if (overflow < 0 || (overflow == 0 && v < 1)) {
    PyErr_Format(PyExc_ValueError, "plan_microbatches: sequences[%zd] has %S tokens; a sequence has at least 1",
                 i, value);
  } else if (max_model_len > 0 && (overflow > 0 || v > max_model_len)) {
    PyErr_Format(PyExc_ValueError, "plan_microbatches: sequences[%zd] has %S tokens, more than max_model_len=%lld",
                 i, value, static_cast<long long>(max_model_len));
  } else if (overflow > 0 || v > kInt32Max) {
    PyErr_Format(PyExc_ValueError,
                 "plan_microbatches: sequences[%zd] has %S tokens, more than 2**31 - 1 (cu_seqlens is int32)", i,
                 value);
  } else {
    Py_DECREF(value);
    *out = static_cast<int64_t>(v);
    return true;
  }
  Py_DECREF(value);
  return false;
}

PyObject* int64_list(const std::vector<int64_t>& values) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (list == nullptr) return nullptr;
  for (size_t k = 0; k < values.size(); ++k) {
    PyObject* v = PyLong_FromLongLong(static_cast<long long>(values[k]));
    if (v == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(k), v);
  }
  return list;
}

// The ints 0, 1, ... that name sequences, shared by all plans (guarded by the GIL; like CPython's
// small-int cache): making and freeing 100k int objects per plan would cost about a third of it.
// Holds at most kCachedIndices of them (about 10 MB); larger plans make the rest per call.
constexpr size_t kCachedIndices = size_t{1} << 18;

std::vector<PyObject*>& index_cache() {
  static std::vector<PyObject*> cache;  // never freed: lives as long as the module
  return cache;
}

// ranks[r][k] = tuple of the sequence indices of micro-batch k of rank r.
// Tuples of ints can never be part of a reference cycle, so they are untracked by the cyclic GC right
// away (CPython does the same lazily), and the GC is paused while they are made: otherwise the ~n/20
// new containers trigger collections, whose passes over a big heap (torch is imported) would cost
// more than the planning itself.
PyObject* ranks_list(const Workspace& ws, size_t n, size_t world_size) {
  std::vector<PyObject*>& cache = index_cache();
  const size_t cached = std::min(n, kCachedIndices);
  cache.reserve(cached);                                        // may throw: before any Python object
  std::vector<PyObject*> extra(n > cached ? n - cached : 0, nullptr);  // ints past the cache
  bool ok = true;
  while (ok && cache.size() < cached) {
    PyObject* v = PyLong_FromSize_t(cache.size());
    if ((ok = v != nullptr)) cache.push_back(v);  // no reallocation: reserved
  }
  for (size_t i = 0; ok && i < extra.size(); ++i) ok = (extra[i] = PyLong_FromSize_t(cached + i)) != nullptr;
  const int gc_was_enabled = PyGC_Disable();
  PyObject* ranks = ok ? PyList_New(static_cast<Py_ssize_t>(world_size)) : nullptr;
  ok = ranks != nullptr;
  for (size_t r = 0; ok && r < world_size; ++r) {
    PyObject* mbs = PyList_New(static_cast<Py_ssize_t>(ws.per_rank));
    if (!(ok = mbs != nullptr)) break;
    PyList_SET_ITEM(ranks, static_cast<Py_ssize_t>(r), mbs);
    for (size_t k = 0; ok && k < ws.per_rank; ++k) {
      const size_t s = r * ws.per_rank + k, lo = ws.start[s], hi = ws.start[s + 1];
      PyObject* mb = PyTuple_New(static_cast<Py_ssize_t>(hi - lo));
      if (!(ok = mb != nullptr)) break;
      for (size_t m = lo; m < hi; ++m) {
        const size_t i = ws.members[m];
        PyObject* v = i < cached ? cache[i] : extra[i - cached];
        Py_INCREF(v);
        PyTuple_SET_ITEM(mb, static_cast<Py_ssize_t>(m - lo), v);
      }
      if (hi > lo) PyObject_GC_UnTrack(mb);  // () is a shared singleton: leave it alone
      PyList_SET_ITEM(mbs, static_cast<Py_ssize_t>(k), mb);
    }
  }
  for (PyObject* v : extra) Py_XDECREF(v);
  if (gc_was_enabled) PyGC_Enable();
  if (!ok) {
    Py_XDECREF(ranks);
    return nullptr;
  }
  return ranks;
}

PyObject* plan(Workspace& ws, PyObject* lengths_obj, int64_t budget, size_t world_size, int64_t max_model_len,
               int64_t attention_len) {
  PyObject* seq = PySequence_Fast(lengths_obj, "plan_microbatches: sequences must be an iterable");
  if (seq == nullptr) return nullptr;
  const size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(seq));
  PyObject** items = PySequence_Fast_ITEMS(seq);
  int64_t* lengths = ensure(ws.lengths, n);
  int64_t total = 0, longest = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!read_length(items[i], static_cast<Py_ssize_t>(i), max_model_len, &lengths[i])) {
      Py_DECREF(seq);
      return nullptr;
    }
    total += lengths[i];  // < n * 2^31: no overflow
    longest = std::max(longest, lengths[i]);
  }
  Py_DECREF(seq);
  // Every key is at most attention_len * total + sum(L^2) <= total * (attention_len + longest): checking
  // that bound keeps all of them inside int64.
  if (longest > 0 && total > INT64_MAX / (longest + attention_len)) {
    PyErr_SetString(PyExc_ValueError, kTooManyTokens);
    return nullptr;
  }

  bool out_of_memory = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    plan_core(ws, n, budget, world_size, attention_len);
  } catch (const std::bad_alloc&) {  // never let an exception cross the GIL macros
    out_of_memory = true;
  }
  Py_END_ALLOW_THREADS
  if (out_of_memory) return PyErr_NoMemory();

  PyObject* ranks = ranks_list(ws, n, world_size);
  PyObject* tokens = ranks ? int64_list(ws.ranks.tokens()) : nullptr;
  PyObject* attention = tokens ? int64_list(ws.ranks.attention()) : nullptr;
  PyObject* result = nullptr;
  if (attention != nullptr) {
    result = Py_BuildValue("(NNNLL)", ranks, tokens, attention, static_cast<long long>(ws.num_padding),
                           static_cast<long long>(ws.num_overlong));
  } else {
    Py_XDECREF(ranks);
    Py_XDECREF(tokens);
  }
  return result;
}

}  // namespace

PyObject* plan_microbatches(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"lengths", "budget", "world_size", "max_model_len", "attention_len", nullptr};
  PyObject* lengths_obj = nullptr;
  long long budget = 0, max_model_len = 0, attention_len = 0;
  Py_ssize_t world_size = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLnLL:plan_microbatches", const_cast<char**>(keywords),
                                   &lengths_obj, &budget, &world_size, &max_model_len, &attention_len)) {
    return nullptr;
  }
  // The Python wrapper checks these first (with the same messages); repeated for direct callers.
  if (budget < 1 || budget > kInt32Max) {
    PyErr_Format(PyExc_ValueError, "plan_microbatches: max_tokens_per_microbatch must be in [1, 2**31 - 1], got %lld",
                 budget);
    return nullptr;
  }
  if (world_size < 1) {
    PyErr_Format(PyExc_ValueError, "plan_microbatches: world_size must be >= 1, got %zd", world_size);
    return nullptr;
  }
  if (max_model_len < 0 || max_model_len > kInt32Max) {
    PyErr_Format(PyExc_ValueError, "plan_microbatches: max_model_len must be in [1, 2**31 - 1], got %lld",
                 max_model_len);
    return nullptr;
  }
  if (attention_len < 0 || attention_len > kInt32Max) {
    PyErr_Format(PyExc_ValueError, "plan_microbatches: attention_len must be in [1, 2**31 - 1], got %lld",
                 attention_len);
    return nullptr;
  }
  Workspace& ws = thread_workspace();
  PyObject* result = nullptr;
  try {
    result = plan(ws, lengths_obj, budget, static_cast<size_t>(world_size), max_model_len, attention_len);
  } catch (const std::bad_alloc&) {
    result = PyErr_NoMemory();
  }
  if (ws.lengths.size() > kKeepBuffers || static_cast<size_t>(world_size) > kKeepBuffers) {
    ws = Workspace();  // don't hold on to the buffers of a huge plan
  }
  return result;
}

}  // namespace mgrpo_fast
