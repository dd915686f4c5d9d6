// CUDA implementation of the grouped-MAE forward and backward passes: host-side launchers.
// Framework-free: the TF binding (csrc/tf) and the TF-free module (csrc/python) both call
// these with raw device pointers, a workspace they allocate, and their stream.
//
// Element types are CUDA's: __half, __nv_bfloat16, float, double. Id types: int32_t, int64_t.
// Statistics and gradient scales are `Out` = float for 16-bit and float32 inputs, double for
// double (core/grouped_mae.h, OutType).
//
// Bad input on the GPU: a kernel cannot raise without a host round trip, so an id >= G, a
// negative or NaN sample weight, or a negative or NaN group weight poisons the result instead:
// the loss, the sums and the gradient scales become NaN. Nothing is ever written out of bounds.
//
// Use: plan = plan_forward(args, Strategy::kAuto, deterministic); allocate
// plan.workspace_bytes of device memory (contents need not be zero); call stats() or loss()
// with the plan. One kernel launch, no host synchronisation. See grouped_mae_cuda.cu for the
// strategies and the rule that picks one.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace grouped_mae {
namespace cuda {

// How the forward pass accumulates per-group sums.
enum class Strategy : int {
  kAuto = -1,          // choose_strategy() decides
  kSharedRuns = 0,     // block-local shared-memory accumulators (G fits in shared memory)
  kGlobalRuns = 1,     // global atomics, after run aggregation within the warp (large G)
  kGlobalDirect = 2,   // global atomics, one per row (no warp aggregation; for comparison)
  kDeterministic = 3,  // per-warp private accumulators, fixed-order merges, no float atomics
};

const char* strategy_name(Strategy s);

template <typename T, typename Idx>
struct ForwardArgs {
  const T* y_true;
  const T* y_pred;
  const Idx* ids;
  const T* sample_weight;  // nullptr: all 1
  const T* group_weights;  // nullptr: all 1 (loss only)
  int64_t n, d, g;
};

// Everything a launch needs, decided on the host from the arguments and the current device.
struct ForwardPlan {
  Strategy strategy = Strategy::kAuto;
  bool vectorized = false;          // 128-bit loads (D == 1 and 16-byte aligned arrays)
  int blocks = 1;                   // grid size (all blocks co-resident: cooperative launch)
  int64_t partial_rows = 0;         // rows of the [rows, 2G] partial buffer (0: none)
  bool partials_in_shared = false;  // deterministic: per-warp accumulators in shared memory
  size_t shared_bytes = 0;          // dynamic shared memory per block
  size_t workspace_bytes = 0;       // device scratch the caller allocates (any contents)
};

// The rule (documented in grouped_mae_cuda.cu): from N, G and the element type only.
// acc_bytes: sizeof the accumulator type (8 for float32/float64 inputs, 4 for 16-bit ones).
Strategy choose_strategy(int64_t n, int64_t g, size_t acc_bytes);

// Plans a forward launch. requested = kAuto picks with choose_strategy(); deterministic = true
// forces kDeterministic (a requested atomic strategy together with deterministic is an error:
// returns cudaErrorInvalidValue, never a silent fallback). Queries the current device.
template <typename T, typename Idx>
cudaError_t plan_forward(const ForwardArgs<T, Idx>& a, Strategy requested, bool deterministic,
                         ForwardPlan* plan);

// Per-group S and W. out_sums/out_weights: device arrays of length g.
template <typename T, typename Idx, typename Out>
cudaError_t stats(const ForwardArgs<T, Idx>& a, const ForwardPlan& plan, void* workspace,
                  Out* out_sums, Out* out_weights, cudaStream_t stream);

// Loss (device scalar, type T) and per-group gradient scales (device array of length g).
template <typename T, typename Idx, typename Out>
cudaError_t loss(const ForwardArgs<T, Idx>& a, const ForwardPlan& plan, void* workspace,
                 T* out_loss, Out* out_scale, cudaStream_t stream);

// grad[i, j] = upstream * scale[ids[i]] * w_i / D * sign(y_pred - y_true); 0 where ids < 0,
// NaN where ids >= g. upstream: device scalar of type T. Deterministic (elementwise).
template <typename T, typename Idx, typename Out>
cudaError_t backward(const ForwardArgs<T, Idx>& a, const Out* scale, const T* upstream, T* grad,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace grouped_mae
