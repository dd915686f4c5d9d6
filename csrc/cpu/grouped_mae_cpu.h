// CPU implementation of the grouped-MAE forward and backward passes.
//
// Forward: rows are split into a fixed number of contiguous shards. Each shard accumulates
// S and W in float64 partials of shape [G, 2] (S_g and W_g side by side: one cache line per
// update); the partials are then summed per group in a fixed order (shard, then copy). The
// split depends only on N, G and the shard count the caller asks for, and each block's path
// (below) only on its ids, so a given machine gets bitwise-identical results from run to run.
// Validation (ids < G, weights >= 0) happens in the same pass; the first bad row (lowest
// index) is reported.
//
// Within a shard, rows go in blocks of kBlock, each added with the cheapest update for its
// id pattern:
//   - one id for the whole block and D == 1 (sorted ids, runs of 256 rows or more): its ids
//     are checked and its rows summed straight from the inputs, one update (`span_sums`);
//   - otherwise the ids (and weights) are range-checked in one vectorisable sweep; a block
//     with a negative or bad id, or a bad weight, takes the plain per-row loop, which skips
//     ignored rows and finds the first bad row. A clean block that does not look unsorted
//     (`looks_unsorted`: 8 sampled neighbour pairs) has its run ends found as a bit mask
//     (`run_ends`), and then:
//   - few runs (sorted ids, runs of 32 rows or more, D == 1): each run summed straight from
//     the inputs, one update per run;
//   - runs of 4 rows or more on average: the row errors staged in a small buffer, one
//     update per run from prefix sums (`runs`);
//   - otherwise (unsorted ids): the rows scattered (`scatter_rows`), row k of a block into copy
//     k % kCopies of the partials when G is small, so that repeated ids do not wait on each
//     other's read-modify-write through memory, and into a single copy when G is large
//     (repeats are rare there, and copies would multiply memory).
// Every update adds (S, W) to a group in one 16-byte read-modify-write (`add_pair`).
//
// Sparse path: with few rows and many groups (N <= G / 4, G >= 4096), clearing, merging and
// finalizing [G] partials would cost more than the rows (at N = 1024, G = 1e5: 0.15 ms
// against a few microseconds). One thread then clears and fills only the groups that have
// rows, and `finalize` / `unpack` visit only those.
//
// Memory: shards * copies * G * 16 bytes of partials. The shard count is capped so that
// this stays under kPartialBudgetBytes (copies > 1 only for G <= kMaxGroupsForCopies).
//
// Accumulation is in float64 for every input type (the spec asks for at least float32 for
// 16-bit inputs). Measured with benchmarks/kernel_bench.cc: float32 partials would be no
// faster on sorted ids and 10-25% faster on the unsorted scatter, but 4M rows in one group
// would already be off by 1e-6 relative, against ~1e-11 in float64.
//
// After the merge, `finalize` (the loss and the [G] gradient scales) and `unpack` (S and W as
// two arrays) split the groups over the threads too. The loss sums fixed chunks of groups, so
// from given statistics it gets the same bits on any number of threads (the statistics
// themselves depend on the shard count, as above).
//
// The threading is injected: `run_shards(n, fn)` must call fn(s) for s in [0, n), in any
// order and concurrently. The TF binding passes TF's intra-op pool.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/grouped_mae.h"

namespace grouped_mae {
namespace cpu {

constexpr int64_t kMinRowsPerShard = 1 << 15;
constexpr int64_t kPartialBudgetBytes = int64_t(64) << 20;
constexpr int64_t kBlock = 256;
constexpr int64_t kCopies = 4;
constexpr int64_t kMaxGroupsForCopies = 256;
// The sparse path (see `stats`) runs when G >= kSparseMinGroups and N * kSparseRowsPerGroup <= G.
constexpr int64_t kSparseMinGroups = 4096;
constexpr int64_t kSparseRowsPerGroup = 4;
// Groups per fixed chunk of the loss's sum in `finalize`.
constexpr int64_t kFinalizeChunk = 16384;

// Which entries of the [G, 2] statistics `stats` wrote.
struct Touched {
  bool all = true;              // every group's (S_g, W_g), zero for an empty group
  std::vector<int64_t> groups;  // otherwise only these: the groups that have rows, each once
};

// True when `stats` takes the sparse path for n rows and g groups.
inline bool sparse_stats(int64_t n, int64_t g) {
  return g >= kSparseMinGroups && n <= g / kSparseRowsPerGroup;
}

struct RowError {
  BadInput kind = BadInput::kNone;
  int64_t index = std::numeric_limits<int64_t>::max();
  double value = 0;  // the offending id or weight
  void keep_first(const RowError& o) {
    if (o.kind != BadInput::kNone && o.index < index) *this = o;
  }
};

// Inputs of one call; pointers are to contiguous row-major data.
template <typename T, typename Idx>
struct Inputs {
  const T* y_true;
  const T* y_pred;
  const Idx* ids;
  const T* sample_weight;  // nullptr when absent
  int64_t n;               // rows
  int64_t d;               // elements per row
  int64_t g;               // num_groups
};

// Copies of the partial arrays each forward shard keeps (see the file comment).
inline int64_t forward_copies(int64_t g) { return g <= kMaxGroupsForCopies ? kCopies : 1; }

// Number of shards for the forward pass. A shard costs O(G) to clear and merge, so it must
// also have at least G rows to be worth it.
inline int64_t forward_shards(int64_t n, int64_t g, int64_t threads) {
  int64_t by_rows = std::max<int64_t>(1, n / std::max(kMinRowsPerShard, g));
  int64_t by_memory =
      std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(1, 16 * g * forward_copies(g)));
  return std::max<int64_t>(1, std::min({threads, by_rows, by_memory}));
}

// Number of shards for the backward pass: element-wise, so any split gives the same result; a
// shard gets at least kMinRowsPerShard rows.
inline int64_t backward_shards(int64_t n, int64_t threads) {
  return std::max<int64_t>(1, std::min(threads, n / kMinRowsPerShard));
}

// Each partial in the scratch starts on its own 128-byte boundary (a pair of cache lines, which
// the adjacent-line prefetcher fetches together), so that the partials of two shards never
// share a line: with G = 10 a partial is 160 bytes, and packed end to end, two shards would
// write to the same lines and make them move between cores on every update. (On the 2-vCPU VM
// this was developed on, the padding made no measurable difference.)
constexpr int64_t kPartialAlignDoubles = 16;

// Doubles from one partial in the scratch to the next.
inline int64_t partial_stride(int64_t g) {
  return (2 * g + kPartialAlignDoubles - 1) / kPartialAlignDoubles * kPartialAlignDoubles;
}

// Doubles of scratch that `stats` needs besides its [G, 2] output.
inline int64_t forward_scratch_doubles(int64_t g, int64_t shards) {
  const int64_t parts = std::max<int64_t>(1, shards) * forward_copies(g);
  return parts == 1 ? 0 : partial_stride(g) * (parts - 1) + kPartialAlignDoubles;
}

namespace detail {

// Per-row loop with every check, for blocks that hold an ignored or a bad row.
template <typename T, typename Idx>
RowError accumulate_rows(const Inputs<T, Idx>& in, int64_t begin, int64_t end, double* sw) {
  RowError err;
  const uint64_t g_max = static_cast<uint64_t>(in.g);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t id = static_cast<int64_t>(in.ids[i]);
    if (id < 0) continue;  // ignored row (padding)
    if (static_cast<uint64_t>(id) >= g_max) {
      err.kind = BadInput::kGroupId, err.index = i, err.value = static_cast<double>(id);
      return err;
    }
    double e = row_error<double>(in.y_true, in.y_pred, i, in.d);
    if (in.sample_weight != nullptr) {
      const double wi = widen(in.sample_weight[i]);
      if (!valid_weight(wi)) {
        err.kind = BadInput::kSampleWeight, err.index = i, err.value = wi;
        return err;
      }
      sw[2 * id] += wi * e;
      sw[2 * id + 1] += wi;
    } else {
      sw[2 * id] += e;
      sw[2 * id + 1] += 1.0;
    }
  }
  return err;
}

// True when every id in [0, g): one branch-free sweep (negative ids wrap to huge unsigned).
template <typename Idx>
inline bool ids_in_range(const Idx* __restrict ids, int64_t m, int64_t g) {
  using U = std::make_unsigned_t<Idx>;
  const U limit = static_cast<U>(g);
  U bad = 0;  // an integer OR-reduction vectorises, a bool one does not
  for (int64_t k = 0; k < m; ++k) bad |= static_cast<U>(static_cast<U>(ids[k]) >= limit);
  return bad == 0;
}

template <typename T>
inline bool weights_valid(const T* __restrict sw, int64_t m) {
  int32_t bad = 0;
  for (int64_t k = 0; k < m; ++k) bad |= static_cast<int32_t>(!valid_weight(widen(sw[k])));
  return bad == 0;
}

// Marks the rows that end a run of one id: bit k % 64 of ends[k / 64] is set when
// ids[k + 1] != ids[k], and for the last row m - 1 (m <= kBlock). Returns the number of runs.
// With SSE2, four (or two) ids are compared per instruction and their mask taken at once.
template <typename Idx>
inline int64_t run_ends(const Idx* __restrict ids, int64_t m, uint64_t* ends) {
  int64_t runs = 0;
  for (int64_t word = 0; word < kBlock / 64; ++word) {
    const int64_t base = 64 * word;
    const int64_t stop = std::min(base + 64, m - 1);  // rows k < stop have a next row
    uint64_t bits = 0;
    int64_t k = base;
#if defined(__SSE2__)
    if constexpr (sizeof(Idx) == 4 || sizeof(Idx) == 8) {
      constexpr int64_t kLanes = 16 / sizeof(Idx);
      for (; k + kLanes <= stop; k += kLanes) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ids + k));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ids + k + 1));
        __m128i eq = _mm_cmpeq_epi32(a, b);
        uint64_t same;
        if constexpr (sizeof(Idx) == 4) {
          same = static_cast<uint64_t>(_mm_movemask_ps(_mm_castsi128_ps(eq)));
        } else {  // a 64-bit lane is equal when both of its 32-bit halves are
          eq = _mm_and_si128(eq, _mm_shuffle_epi32(eq, _MM_SHUFFLE(2, 3, 0, 1)));
          same = static_cast<uint64_t>(_mm_movemask_pd(_mm_castsi128_pd(eq)));
        }
        bits |= (same ^ ((uint64_t(1) << kLanes) - 1)) << (k - base);
      }
    }
#endif
    for (; k < stop; ++k) bits |= static_cast<uint64_t>(ids[k + 1] != ids[k]) << (k - base);
    if (base <= m - 1 && m - 1 < base + 64) bits |= uint64_t(1) << (m - 1 - base);
    ends[word] = bits;
    runs += __builtin_popcountll(bits);
  }
  return runs;
}

// True for a full block whose 8 sampled neighbour pairs (rows 32k and 32k + 1) all differ:
// unsorted ids, which `accumulate` scatters without looking for run ends (run_ends and its
// bit counts cost a fifth of the scatter: 3.1 -> 2.5 cycles a row in path_bench). Sorted ids
// with runs of a few rows or more fail one of the 8 tests. A wrong guess only picks a slower
// path for the block, never a wrong sum.
template <typename Idx>
inline bool looks_unsorted(const Idx* __restrict ids, int64_t m) {
  if (m != kBlock) return false;
  for (int64_t k = 0; k < kBlock; k += kBlock / 8) {
    if (ids[k] == ids[k + 1]) return false;
  }
  return true;
}

// Sum in a fixed order with four running sums (breaks the add-latency chain).
inline double sum4(const double* __restrict x, int64_t m) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) a0 += x[k], a1 += x[k + 1], a2 += x[k + 2], a3 += x[k + 3];
  for (; k < m; ++k) a0 += x[k];
  return (a0 + a1) + (a2 + a3);
}

// True when ids[0..m) all equal ids[0] and it is in [0, g): a block of one group. Cheap
// rejects first (first and last ids differ: always so for sorted ids with a run end inside),
// then 64 bytes of ids at a time XORed with the first id and ORed together, stopping at the
// first 64 bytes that differ. Written with SSE2 intrinsics: GCC leaves the plain loop scalar,
// and it then held a third of the forward's perf samples on sorted ids and a quarter of the
// backward's.
template <typename Idx>
inline bool one_valid_id(const Idx* __restrict ids, int64_t m, int64_t g) {
  const Idx first = ids[0];
  if (ids[m - 1] != first || static_cast<uint64_t>(first) >= static_cast<uint64_t>(g)) {
    return false;
  }
  int64_t k = 0;
#if defined(__SSE2__)
  if constexpr (sizeof(Idx) == 4 || sizeof(Idx) == 8) {
    constexpr int64_t kLanes = 16 / sizeof(Idx);
    const __m128i f = sizeof(Idx) == 4 ? _mm_set1_epi32(static_cast<int32_t>(first))
                                       : _mm_set1_epi64x(static_cast<int64_t>(first));
    auto diff = [&](int64_t at) {
      return _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ids + at)), f);
    };
    for (; k + 4 * kLanes <= m; k += 4 * kLanes) {
      const __m128i d = _mm_or_si128(_mm_or_si128(diff(k), diff(k + kLanes)),
                                     _mm_or_si128(diff(k + 2 * kLanes), diff(k + 3 * kLanes)));
      if (_mm_movemask_epi8(_mm_cmpeq_epi8(d, _mm_setzero_si128())) != 0xFFFF) return false;
    }
  }
#endif
  for (; k < m; ++k) {
    if (ids[k] != first) return false;
  }
  return true;
}

// Calls fn(k) for each row k marked in ends (the output of run_ends), in increasing order.
template <typename Fn>
inline void for_each_run_end(const uint64_t* ends, Fn&& fn) {
  for (int64_t word = 0; word < kBlock / 64; ++word) {
    for (uint64_t bits = ends[word]; bits != 0; bits &= bits - 1) {
      fn(64 * word + __builtin_ctzll(bits));
    }
  }
}

// p[0] += s and p[1] += w in one 16-byte read-modify-write (the same two float64 additions,
// half the memory operations of two scalar updates).
inline void add_pair(double* p, double s, double w) {
  typedef double Pair __attribute__((vector_size(16)));
  Pair v;
  std::memcpy(&v, p, sizeof v);
  const Pair a = {s, w};
  v += a;
  std::memcpy(p, &v, sizeof v);
}

// S and W of rows [0, m) of one group, D == 1, read straight from the inputs (no staging):
// the row errors of `row_error`, times the weights when kWeighted (already checked), row k
// into running sum k % 8 (a fixed order that the compiler vectorises), then a fixed tree.
template <bool kWeighted, typename T>
inline void span_sums(const T* __restrict t, const T* __restrict p, const T* __restrict w,
                      int64_t m, double* s, double* ws) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, wacc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= m; k += 8) {
    double x[8];
    for (int64_t j = 0; j < 8; ++j) x[j] = row_error<double>(t, p, k + j, 1);
    if constexpr (kWeighted) {
      double wv[8];
      for (int64_t j = 0; j < 8; ++j) wv[j] = static_cast<double>(widen(w[k + j]));
      for (int64_t j = 0; j < 8; ++j) acc[j] += x[j] * wv[j], wacc[j] += wv[j];
    } else {
      for (int64_t j = 0; j < 8; ++j) acc[j] += x[j];
    }
  }
  double tail = 0, wtail = 0;
  for (; k < m; ++k) {
    const double x = row_error<double>(t, p, k, 1);
    if constexpr (kWeighted) {
      const double wk = static_cast<double>(widen(w[k]));
      tail += x * wk, wtail += wk;
    } else {
      tail += x;
    }
  }
  auto tree = [](const double* a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  };
  *s = tree(acc) + tail;
  *ws = kWeighted ? tree(wacc) + wtail : static_cast<double>(m);
}

// span_sums of rows [a, b) of the inputs, added to group `id`.
template <typename T, typename Idx>
inline void add_span(const Inputs<T, Idx>& in, int64_t a, int64_t b, int64_t id, double* p0) {
  double s, w;
  if (in.sample_weight != nullptr) {
    span_sums<true>(in.y_true + a, in.y_pred + a, in.sample_weight + a, b - a, &s, &w);
  } else {
    span_sums<false>(in.y_true + a, in.y_pred + a, static_cast<const T*>(nullptr), b - a, &s, &w);
  }
  add_pair(p0 + 2 * id, s, w);
}

// Runs of one id (sorted ids), given their ends (run_ends): one update per run, from prefix
// sums. The block is cut into four quarters; each quarter's row errors (and weights) get a
// running sum, the four chains in step so that their additions overlap. A run's (S, W) is
// the prefix at its last row minus the prefix before its first row (zero at a quarter's
// start), so a run that crosses a quarter's end gets two updates. A difference is exact to
// a few ulps of a quarter's sum (64 rows). A running sum would carry an Inf or NaN into the
// groups after it, so a block whose sum is not finite returns false, having written
// nothing, and is scattered row by row instead. Needs m >= 4.
template <typename Idx>
inline bool runs(const Idx* __restrict ids, const uint64_t* ends_in, const double* __restrict e,
                 const double* __restrict wt, int64_t m, double* p0) {
  alignas(64) double ps[kBlock];
  alignas(64) double pw[kBlock];
  const int64_t q = m / 4;  // quarters start at 0, q, 2q, 3q; the last takes the rest
  double s[4] = {0, 0, 0, 0}, w[4] = {0, 0, 0, 0};
  for (int64_t k = 0; k < q; ++k) {
    for (int64_t c = 0; c < 4; ++c) s[c] += e[c * q + k], ps[c * q + k] = s[c];
  }
  for (int64_t i = 4 * q; i < m; ++i) s[3] += e[i], ps[i] = s[3];
  if (!std::isfinite((s[0] + s[1]) + (s[2] + s[3]))) return false;  // e >= 0: all finite
  if (wt != nullptr) {
    for (int64_t k = 0; k < q; ++k) {
      for (int64_t c = 0; c < 4; ++c) w[c] += wt[c * q + k], pw[c * q + k] = w[c];
    }
    for (int64_t i = 4 * q; i < m; ++i) w[3] += wt[i], pw[i] = w[3];
    if (!std::isfinite((w[0] + w[1]) + (w[2] + w[3]))) return false;
  }
  uint64_t ends[kBlock / 64];
  std::memcpy(ends, ends_in, sizeof ends);
  for (int64_t c = 1; c < 4; ++c) ends[(c * q - 1) / 64] |= uint64_t(1) << ((c * q - 1) % 64);
  int64_t start = 0;
  for_each_run_end(ends, [&](int64_t k) {
    const bool fresh = start == 0 || start == q || start == 2 * q || start == 3 * q;
    const double s_before = fresh ? 0.0 : ps[start - 1];
    const double run_w =
        wt != nullptr ? pw[k] - (fresh ? 0.0 : pw[start - 1]) : static_cast<double>(k + 1 - start);
    add_pair(p0 + 2 * static_cast<int64_t>(ids[k]), ps[k] - s_before, run_w);
    start = k + 1;
  });
  return true;
}

// Row errors of rows [i0, i0 + m) into e; with sample weights, e = w * err and wt = w.
template <typename T, typename Idx>
inline void row_errors(const Inputs<T, Idx>& in, int64_t i0, int64_t m, double* __restrict e,
                       double* __restrict wt) {
  if (in.d == 1) {
    const T* __restrict t = in.y_true + i0;
    const T* __restrict p = in.y_pred + i0;
    for (int64_t k = 0; k < m; ++k) e[k] = row_error<double>(t, p, k, 1);
  } else {
    for (int64_t k = 0; k < m; ++k) e[k] = row_error<double>(in.y_true, in.y_pred, i0 + k, in.d);
  }
  if (in.sample_weight != nullptr) {
    const T* __restrict sw = in.sample_weight + i0;
    for (int64_t k = 0; k < m; ++k) {
      wt[k] = widen(sw[k]);
      e[k] *= wt[k];
    }
  }
}

// Rows [i0, i0 + m) of one block (ids in range, weights valid) scattered row by row: row k
// adds (w_k * e_k, w_k) to its group in copy k % copies of the partials (copies is 1 or
// kCopies). Each row's error is computed in the loop, not staged first: at 16M rows in
// kernel_bench, staging made the forward 13-18% slower for G = 1000 and 100000 (uniform or
// Zipf ids, one thread; 12-23% on two) and 1-3% faster for G <= 256. The sums are the same.
template <bool kWeighted, bool kOneElement, typename T, typename Idx>
inline void scatter_rows(const Inputs<T, Idx>& in, int64_t i0, int64_t m, double* const* part,
                         int64_t copies) {
  const Idx* __restrict ids = in.ids + i0;
  const int64_t d = kOneElement ? 1 : in.d;
  const T* __restrict t = in.y_true + i0 * d;
  const T* __restrict p = in.y_pred + i0 * d;
  const T* __restrict sw = kWeighted ? in.sample_weight + i0 : nullptr;
  auto add = [=](double* q, int64_t k) {
    const double e = row_error<double>(t, p, k, d);
    double* const at = q + 2 * static_cast<int64_t>(ids[k]);
    if constexpr (kWeighted) {
      const double w = widen(sw[k]);
      add_pair(at, e * w, w);
    } else {
      add_pair(at, e, 1.0);
    }
  };
  double* const q0 = part[0];
  int64_t k = 0;
  if (copies == kCopies) {
    double *const q1 = part[1], *const q2 = part[2], *const q3 = part[3];
    for (; k + 4 <= m; k += 4) add(q0, k), add(q1, k + 1), add(q2, k + 2), add(q3, k + 3);
  }
  for (; k < m; ++k) add(q0, k);
}

// The sparse path: N rows, G much larger. Clears only the entries of the groups that have
// rows (touched->groups lists them in order of first row), then accumulates and checks every
// row with the per-row loop, which reports the first bad row. Ids >= G are left for that loop
// to report, never written.
template <typename T, typename Idx>
RowError sparse_accumulate(const Inputs<T, Idx>& in, double* sw, Touched* touched) {
  const uint64_t g_max = static_cast<uint64_t>(in.g);
  auto in_range = [&](int64_t id) { return id >= 0 && static_cast<uint64_t>(id) < g_max; };
  // W_g >= 0 for every real group, so -1 marks "cleared, not yet listed".
  for (int64_t i = 0; i < in.n; ++i) {
    const int64_t id = static_cast<int64_t>(in.ids[i]);
    if (in_range(id)) sw[2 * id] = 0.0, sw[2 * id + 1] = -1.0;
  }
  touched->all = false;
  touched->groups.clear();
  for (int64_t i = 0; i < in.n; ++i) {
    const int64_t id = static_cast<int64_t>(in.ids[i]);
    if (in_range(id) && sw[2 * id + 1] == -1.0) touched->groups.push_back(id), sw[2 * id + 1] = 0.0;
  }
  return accumulate_rows(in, 0, in.n, sw);
}

}  // namespace detail

// Accumulate rows [begin, end) into the partials part[c] (c in [0, copies)), each holding
// S_g at [2g] and W_g at [2g + 1] (float64; one cache line per update). Returns the first
// bad row.
template <typename T, typename Idx>
RowError accumulate(const Inputs<T, Idx>& in, int64_t begin, int64_t end, double* const* part,
                    int64_t copies) {
  using namespace detail;
  const bool weighted = in.sample_weight != nullptr;
  alignas(64) double e[kBlock];
  alignas(64) double wt[kBlock];
  double* const p0 = part[0];
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t m = std::min(kBlock, end - i0);
    const Idx* __restrict ids = in.ids + i0;
    // A block of one group (the common case for sorted ids): one pass over its rows, no
    // staging.
    if (in.d == 1 && one_valid_id(ids, m, in.g) &&
        (!weighted || weights_valid(in.sample_weight + i0, m))) {
      add_span(in, i0, i0 + m, static_cast<int64_t>(ids[0]), p0);
      continue;
    }
    if (!ids_in_range(ids, m, in.g) || (weighted && !weights_valid(in.sample_weight + i0, m))) {
      RowError err = accumulate_rows(in, i0, i0 + m, p0);
      if (err.kind != BadInput::kNone) return err;
      continue;
    }
    uint64_t ends[kBlock / 64];
    // A block that looks unsorted counts as m runs: the scatter below, `ends` unused.
    const int64_t nruns = looks_unsorted(ids, m) ? m : run_ends(ids, m, ends);
    if (in.d == 1 && nruns * 32 <= m) {  // long runs of one id: each summed straight
      int64_t a = 0;
      for_each_run_end(ends, [&](int64_t k) {
        add_span(in, i0 + a, i0 + k + 1, static_cast<int64_t>(ids[k]), p0);
        a = k + 1;
      });
      continue;
    }
    if (nruns == 1) {  // one id for the whole block, D > 1
      row_errors(in, i0, m, e, wt);
      const int64_t id = static_cast<int64_t>(ids[0]);
      p0[2 * id] += sum4(e, m);
      p0[2 * id + 1] += weighted ? sum4(wt, m) : static_cast<double>(m);
      continue;
    }
    if (nruns * 4 <= m) {  // short runs of one id (sorted ids): one update per run
      row_errors(in, i0, m, e, wt);
      if (runs(ids, ends, e, weighted ? wt : nullptr, m, p0)) continue;
    }
    // Unsorted ids (runs of under 4 rows on average), or a block whose sum is not finite:
    // row by row.
    if (weighted) {
      in.d == 1 ? scatter_rows<true, true>(in, i0, m, part, copies)
                : scatter_rows<true, false>(in, i0, m, part, copies);
    } else {
      in.d == 1 ? scatter_rows<false, true>(in, i0, m, part, copies)
                : scatter_rows<false, false>(in, i0, m, part, copies);
    }
  }
  return RowError{};
}

// Forward statistics: sw[2k] = S_k and sw[2k + 1] = W_k (float64, [G, 2] interleaved, the
// layout the accumulation uses, so that one shard needs no copy). `scratch` must hold
// forward_scratch_doubles(g, shards) doubles.
//
// When N is small next to G (sparse_stats(n, g)), clearing, merging and finalizing all G
// groups would cost more than the rows: the sparse path (one thread) writes only the groups
// that have rows and lists them in *touched; read the result through `finalize` and
// `unpack`, which handle both cases.
template <typename T, typename Idx, typename RunShards>
RowError stats(const Inputs<T, Idx>& in, int64_t shards, double* sw, double* scratch,
               RunShards&& run_shards, Touched* touched) {
  touched->all = true;
  touched->groups.clear();
  if (sparse_stats(in.n, in.g)) return detail::sparse_accumulate(in, sw, touched);
  shards = std::max<int64_t>(1, shards);
  const int64_t g = in.g;
  const int64_t copies = forward_copies(g);
  const int64_t parts = shards * copies;
  // Partial p belongs to shard p / copies; its copy is p % copies. Partial 0 is the output.
  std::vector<double*> part(parts);
  part[0] = sw;
  if (parts > 1) {  // the first partial in the scratch at the next 128-byte boundary
    const uintptr_t align = kPartialAlignDoubles * sizeof(double);
    double* const first = reinterpret_cast<double*>(
        (reinterpret_cast<uintptr_t>(scratch) + align - 1) / align * align);
    for (int64_t p = 1; p < parts; ++p) part[p] = first + partial_stride(g) * (p - 1);
  }
  std::vector<RowError> errs(shards);
  run_shards(shards, [&](int64_t sh) {
    for (int64_t c = 0; c < copies; ++c) {
      std::fill(part[sh * copies + c], part[sh * copies + c] + 2 * g, 0.0);
    }
    const int64_t begin = in.n * sh / shards, end = in.n * (sh + 1) / shards;
    errs[sh] = accumulate(in, begin, end, &part[sh * copies], copies);
  });
  RowError first;
  for (const auto& e : errs) first.keep_first(e);
  if (first.kind != BadInput::kNone || parts == 1) return first;

  // Fixed-order merge (partial 1, 2, ... into partial 0), parallel over group ranges.
  const int64_t merge_parts = std::min<int64_t>(shards, std::max<int64_t>(1, g / 4096));
  run_shards(merge_parts, [&](int64_t mp) {
    const int64_t kb = 2 * (g * mp / merge_parts), ke = 2 * (g * (mp + 1) / merge_parts);
    for (int64_t p = 1; p < parts; ++p) {
      const double* __restrict q = part[p];
      for (int64_t k = kb; k < ke; ++k) sw[k] += q[k];
    }
  });
  return first;
}

// First negative or NaN group weight, if any.
template <typename T>
RowError check_group_weights(const T* v, int64_t g) {
  RowError err;
  for (int64_t k = 0; k < g; ++k) {
    const double vk = widen(v[k]);
    if (!valid_weight(vk)) {
      err.kind = BadInput::kGroupWeight, err.index = k, err.value = vk;
      break;
    }
  }
  return err;
}

// Shards for a pass over g groups after `stats`: one per kFinalizeChunk groups, at most
// `threads`.
inline int64_t group_shards(int64_t g, int64_t threads) {
  return std::max<int64_t>(1, std::min(threads, (g + kFinalizeChunk - 1) / kFinalizeChunk));
}

// fn(k) for every group k in [0, g), the groups split into group_shards(g, threads) contiguous
// ranges run by run_shards (each k exactly once; for element-wise passes over the groups).
template <typename RunShards, typename Fn>
void for_each_group(int64_t g, int64_t threads, RunShards&& run_shards, Fn&& fn) {
  const int64_t parts = group_shards(g, threads);
  run_shards(parts, [&](int64_t p) {
    for (int64_t k = g * p / parts; k < g * (p + 1) / parts; ++k) fn(k);
  });
}

// S and W as two [G] arrays (zero for an empty group) from the output of `stats`, on up to
// `threads` shards (run_shards, as in `stats`).
template <typename Out, typename RunShards>
void unpack(const double* sw, const Touched& touched, int64_t g, Out* sums, Out* weights,
            int64_t threads, RunShards&& run_shards) {
  auto one = [&](int64_t k) {
    sums[k] = static_cast<Out>(sw[2 * k]);
    weights[k] = static_cast<Out>(sw[2 * k + 1]);
  };
  if (!touched.all) {  // the sparse path: a few groups
    std::fill(sums, sums + g, Out(0)), std::fill(weights, weights + g, Out(0));
    for (const int64_t k : touched.groups) one(k);
    return;
  }
  for_each_group(g, threads, run_shards, one);
}

// Loss and per-group gradient scales from the output of `stats` (S_k, W_k). Group weights
// may be nullptr (all 1); scale may be nullptr (not wanted).
//
// When `stats` wrote every group (touched.all), the groups are cut into fixed chunks of
// kFinalizeChunk: each chunk's loss terms are summed in group order, then the chunk sums in
// chunk order. Both that and the scales run on up to `threads` shards (run_shards, as in
// `stats`). The chunks do not depend on the thread count, so neither does the result from
// given statistics; for G <= kFinalizeChunk it is the plain sum in group order.
// On one thread this pass took 0.15 ms at G = 1e5 (a tenth of the forward at 1M rows). On two,
// the forward at 4M rows and G = 1e6 (kernel_bench) went from 6.6-6.7 to 5.7-5.9 ms with sorted
// ids, and from 12.2-12.4 to 11.5-11.6 ms with uniform ids.
template <typename T, typename Out, typename RunShards>
double finalize(const double* sw, const Touched& touched, const T* group_weights, int64_t g,
                Out* scale, int64_t threads, RunShards&& run_shards) {
  auto v_of = [group_weights](int64_t k) {
    return group_weights ? static_cast<double>(widen(group_weights[k])) : 1.0;
  };
  double num = 0, vsum = 0;
  if (!touched.all) {  // the sparse path: a few groups, on one thread
    for (const int64_t k : touched.groups) {
      add_group_term(sw[2 * k], sw[2 * k + 1], v_of(k), &num, &vsum);
    }
    if (scale != nullptr) {
      std::fill(scale, scale + g, Out(0));  // groups without rows
      for (const int64_t k : touched.groups) {
        scale[k] = static_cast<Out>(group_grad_scale(sw[2 * k + 1], v_of(k), vsum));
      }
    }
    return finalize_loss(num, vsum);
  }
  const int64_t chunks = (g + kFinalizeChunk - 1) / kFinalizeChunk;
  const int64_t parts = group_shards(g, threads);
  std::vector<double> chunk_num(chunks), chunk_vsum(chunks);
  run_shards(parts, [&](int64_t p) {
    for (int64_t c = chunks * p / parts; c < chunks * (p + 1) / parts; ++c) {
      double cn = 0, cv = 0;
      for (int64_t k = c * kFinalizeChunk; k < std::min(g, (c + 1) * kFinalizeChunk); ++k) {
        add_group_term(sw[2 * k], sw[2 * k + 1], v_of(k), &cn, &cv);
      }
      chunk_num[c] = cn, chunk_vsum[c] = cv;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) num += chunk_num[c], vsum += chunk_vsum[c];
  if (scale != nullptr) {
    for_each_group(g, threads, run_shards, [&](int64_t k) {
      scale[k] = static_cast<Out>(group_grad_scale(sw[2 * k + 1], v_of(k), vsum));
    });
  }
  return finalize_loss(num, vsum);
}

namespace detail {

// Per-row backward with every check, for blocks that hold an ignored or a bad row.
template <typename T, typename Idx, typename Out>
RowError backward_rows(const Inputs<T, Idx>& in, const Out* scale, Out upstream, int64_t begin,
                       int64_t end, T* out) {
  RowError err;
  const uint64_t g_max = static_cast<uint64_t>(in.g);
  const Out inv_d = Out(1) / static_cast<Out>(in.d);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t id = static_cast<int64_t>(in.ids[i]);
    T* o = out + i * in.d;
    Out factor = 0;
    if (id >= 0) {
      if (static_cast<uint64_t>(id) >= g_max) {
        err.kind = BadInput::kGroupId, err.index = i, err.value = static_cast<double>(id);
        return err;
      }
      factor = upstream * scale[id] * inv_d;
      if (in.sample_weight != nullptr) factor *= static_cast<Out>(widen(in.sample_weight[i]));
    }
    const T* t = in.y_true + i * in.d;
    const T* p = in.y_pred + i * in.d;
    for (int64_t j = 0; j < in.d; ++j) {
      o[j] = static_cast<T>(id >= 0 ? element_grad(t[j], p[j], factor) : Out(0));
    }
  }
  return err;
}

}  // namespace detail

// Backward over rows [begin, end): out = upstream * scale[g] * w_i / D * sign(pred - true).
// Rows with a negative id get 0. Returns the first row with an id >= g.
// Blocks whose ids are all in range run a branch-free loop (vectorisable for D == 1), with
// no gather of scales when the block has one id; the others, the per-row loop. Both compute
// each element with the same expression.
template <typename T, typename Idx, typename Out>
RowError backward(const Inputs<T, Idx>& in, const Out* scale, Out upstream, int64_t begin,
                  int64_t end, T* out) {
  using namespace detail;
  const Out inv_d = Out(1) / static_cast<Out>(in.d);
  const bool weighted = in.sample_weight != nullptr;
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t m = std::min(kBlock, end - i0);
    const Idx* __restrict ids = in.ids + i0;
    // One id for the whole block (sorted ids): one range check and no gather below.
    const bool one = one_valid_id(ids, m, in.g);
    if (!one && !ids_in_range(ids, m, in.g)) {
      RowError err = backward_rows(in, scale, upstream, i0, i0 + m, out);
      if (err.kind != BadInput::kNone) return err;
      continue;
    }
    const T* __restrict sw = weighted ? in.sample_weight + i0 : nullptr;
    if (in.d == 1) {
      // The gather of scales first (none for a one-id block), then a loop the compiler
      // vectorises.
      alignas(64) Out f[kBlock];
      if (one) {
        std::fill(f, f + m, scale[ids[0]]);
      } else {
        for (int64_t k = 0; k < m; ++k) f[k] = scale[ids[k]];
      }
      const T* __restrict t = in.y_true + i0;
      const T* __restrict p = in.y_pred + i0;
      T* __restrict o = out + i0;
      if (weighted) {
        for (int64_t k = 0; k < m; ++k) {
          const Out factor = upstream * f[k] * inv_d * static_cast<Out>(widen(sw[k]));
          o[k] = static_cast<T>(element_grad(t[k], p[k], factor));
        }
      } else {
        for (int64_t k = 0; k < m; ++k) {
          const Out factor = upstream * f[k] * inv_d;
          o[k] = static_cast<T>(element_grad(t[k], p[k], factor));
        }
      }
    } else {
      for (int64_t k = 0; k < m; ++k) {
        Out factor = upstream * scale[ids[k]] * inv_d;
        if (weighted) factor *= static_cast<Out>(widen(sw[k]));
        const int64_t row = (i0 + k) * in.d;
        for (int64_t j = 0; j < in.d; ++j) {
          out[row + j] =
              static_cast<T>(element_grad(in.y_true[row + j], in.y_pred[row + j], factor));
        }
      }
    }
  }
  return RowError{};
}

}  // namespace cpu
}  // namespace grouped_mae
