// CPU implementation of the grouped-MAE forward and backward passes.
//
// Forward: rows are split into a fixed number of contiguous shards. Each shard accumulates
// S and W in float64 partial arrays of length G; the partials are then summed per group in
// shard order. The split depends only on N, G and the shard count the caller asks for, so a
// given machine gets bitwise-identical results from run to run. Validation (ids < G,
// weights >= 0) happens in the same pass; the first bad row (lowest index) is reported.
//
// Memory: shards * G * 16 bytes of partials. The shard count is capped so that this stays
// under kPartialBudgetBytes; with one shard the output arrays are accumulated into directly.
//
// Accumulation is in float64 for every input type (the spec asks for at least float32 for
// 16-bit inputs): the pass is memory-bound, so the wider adds cost nothing measurable and
// they keep 16M rows in one group exact to ~1e-12.
//
// The threading is injected: `run_shards(n, fn)` must call fn(s) for s in [0, n), in any
// order and concurrently. The TF binding passes TF's intra-op pool; the TF-free module a
// std::thread pool.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/grouped_mae.h"

namespace grouped_mae {
namespace cpu {

constexpr int64_t kMinRowsPerShard = 1 << 15;
constexpr int64_t kPartialBudgetBytes = int64_t(64) << 20;

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

// Number of shards for the forward pass.
inline int64_t forward_shards(int64_t n, int64_t g, int64_t threads) {
  int64_t by_rows = std::max<int64_t>(1, n / kMinRowsPerShard);
  int64_t by_memory = std::max<int64_t>(1, kPartialBudgetBytes / std::max<int64_t>(1, 16 * g));
  return std::max<int64_t>(1, std::min({threads, by_rows, by_memory}));
}

// Accumulate rows [begin, end) into s[g], w[g] (float64). Returns the first bad row.
template <typename T, typename Idx>
RowError accumulate(const Inputs<T, Idx>& in, int64_t begin, int64_t end, double* s,
                    double* w) {
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
      s[id] += wi * e;
      w[id] += wi;
    } else {
      s[id] += e;
      w[id] += 1.0;
    }
  }
  return err;
}

// Forward statistics. `sums` and `weights` (float64, length g) receive S and W.
// `scratch` must hold 2 * g * (shards - 1) doubles when shards > 1.
template <typename T, typename Idx, typename RunShards>
RowError stats(const Inputs<T, Idx>& in, int64_t shards, double* sums, double* weights,
               double* scratch, RunShards&& run_shards) {
  std::fill(sums, sums + in.g, 0.0);
  std::fill(weights, weights + in.g, 0.0);
  if (shards <= 1) return accumulate(in, 0, in.n, sums, weights);

  std::vector<RowError> errs(shards);
  std::fill(scratch, scratch + 2 * in.g * (shards - 1), 0.0);
  run_shards(shards, [&](int64_t sh) {
    const int64_t begin = in.n * sh / shards, end = in.n * (sh + 1) / shards;
    double* s = sh == 0 ? sums : scratch + 2 * in.g * (sh - 1);
    double* w = sh == 0 ? weights : s + in.g;
    errs[sh] = accumulate(in, begin, end, s, w);
  });
  RowError first;
  for (const auto& e : errs) first.keep_first(e);
  if (first.kind != BadInput::kNone) return first;

  // Fixed-order merge, parallel over group ranges.
  const int64_t merge_parts = std::min<int64_t>(shards, std::max<int64_t>(1, in.g / 4096));
  run_shards(merge_parts, [&](int64_t part) {
    const int64_t gb = in.g * part / merge_parts, ge = in.g * (part + 1) / merge_parts;
    for (int64_t sh = 1; sh < shards; ++sh) {
      const double* s = scratch + 2 * in.g * (sh - 1);
      const double* w = s + in.g;
      for (int64_t k = gb; k < ge; ++k) {
        sums[k] += s[k];
        weights[k] += w[k];
      }
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

// Loss and per-group gradient scales from S and W. Group weights may be nullptr (all 1).
template <typename T, typename Out>
double finalize(const double* sums, const double* weights, const T* group_weights, int64_t g,
                Out* scale) {
  double num = 0, vsum = 0;
  for (int64_t k = 0; k < g; ++k) {
    const double v = group_weights ? widen(group_weights[k]) : 1.0;
    add_group_term(sums[k], weights[k], v, &num, &vsum);
  }
  if (scale != nullptr) {
    for (int64_t k = 0; k < g; ++k) {
      const double v = group_weights ? widen(group_weights[k]) : 1.0;
      scale[k] = static_cast<Out>(group_grad_scale(weights[k], v, vsum));
    }
  }
  return finalize_loss(num, vsum);
}

// Backward over rows [begin, end): out = upstream * scale[g] * w_i / D * sign(pred - true).
// Rows with a negative id get 0. Returns the first row with an id >= g.
template <typename T, typename Idx, typename Out>
RowError backward(const Inputs<T, Idx>& in, const Out* scale, Out upstream, int64_t begin,
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

}  // namespace cpu
}  // namespace grouped_mae
