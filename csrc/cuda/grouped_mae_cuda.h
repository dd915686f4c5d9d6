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
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace grouped_mae {
namespace cuda {

// How the forward pass accumulates; chosen per call by choose_strategy().
enum class Strategy : int {
  kShared = 0,  // block-local shared-memory accumulators, one global atomic per group and block
  kGlobal = 1,  // atomics straight to global memory (large G)
};

template <typename T, typename Idx>
struct ForwardArgs {
  const T* y_true;
  const T* y_pred;
  const Idx* ids;
  const T* sample_weight;  // nullptr: all 1
  const T* group_weights;  // nullptr: all 1 (loss only)
  int64_t n, d, g;
};

// Bytes of zero-initialised scratch the forward pass needs (the launcher zeroes it).
template <typename T>
size_t forward_workspace_bytes(int64_t g);

Strategy choose_strategy(int64_t n, int64_t g, size_t acc_bytes);

// Per-group S and W. out_sums/out_weights: device arrays of length g.
template <typename T, typename Idx, typename Out>
cudaError_t stats(const ForwardArgs<T, Idx>& a, void* workspace, Out* out_sums,
                  Out* out_weights, cudaStream_t stream);

// Loss (device scalar, type T) and per-group gradient scales (device array of length g).
template <typename T, typename Idx, typename Out>
cudaError_t loss(const ForwardArgs<T, Idx>& a, void* workspace, T* out_loss, Out* out_scale,
                 cudaStream_t stream);

// grad[i, j] = upstream * scale[ids[i]] * w_i / D * sign(y_pred - y_true); 0 where ids < 0.
// upstream: device scalar of type T.
template <typename T, typename Idx, typename Out>
cudaError_t backward(const ForwardArgs<T, Idx>& a, const Out* scale, const T* upstream,
                     T* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace grouped_mae
