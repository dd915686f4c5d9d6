// CUDA kernels for the grouped MAE.
//
// Forward (one kernel, finalize included): a grid-stride loop over rows. Each thread keeps a
// running (group, sum, weight) in registers and flushes it with an atomic add only when the
// group changes, so sorted runs and few groups cost almost no atomics. Flushes go to
// block-local shared-memory accumulators when 2*G accumulators fit in shared memory
// (Strategy::kShared), else straight to global memory (kGlobal). The last block to finish
// (a counter in the workspace) turns S and W into the outputs: stats, or the loss and the
// per-group gradient scales. No host synchronisation anywhere.
//
// Accumulation type: float for 16-bit inputs, double for float32 and float64, so that 16M
// float32 rows in one group stay within 1e-6 of a float64 computation.
//
// Backward: one elementwise grid-stride pass over N*D elements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "core/grouped_mae.h"
#include "cuda/grouped_mae_cuda.h"

namespace grouped_mae {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kSharedBudget = 48 * 1024;

template <typename T>
struct Acc {
  using type = double;
};
template <>
struct Acc<__half> {
  using type = float;
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
};

struct Control {
  unsigned int blocks_done;
  int bad;  // an invalid id or weight was seen
};

template <typename A>
__host__ __device__ size_t control_offset(int64_t g) {
  size_t off = 2 * static_cast<size_t>(g) * sizeof(A);
  return (off + 15) / 16 * 16;
}

int device_blocks(int64_t work) {
  static thread_local int sms = 0;
  if (sms == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (sms <= 0) sms = 1;
  }
  int64_t want = (work + kThreads - 1) / kThreads;
  int64_t cap = static_cast<int64_t>(sms) * 8;
  if (want < 1) want = 1;
  return static_cast<int>(want < cap ? want : cap);
}

template <typename A>
__device__ A block_sum(A v, A* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  A r = scratch[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ T nan_of() {
  return static_cast<T>(NAN);
}

// Runs in the last block only: turns the global S, W into the requested outputs.
template <typename T, typename A, typename Out, bool kLoss>
__device__ void finalize_block(const A* gs, const A* gw, const T* group_weights, int64_t g,
                               bool bad, T* out_loss, Out* out_a, Out* out_b) {
  __shared__ A scratch[kThreads];
  const Out qnan = static_cast<Out>(NAN);
  if (!kLoss) {
    for (int64_t k = threadIdx.x; k < g; k += blockDim.x) {
      out_a[k] = bad ? qnan : static_cast<Out>(__ldcg(gs + k));
      out_b[k] = static_cast<Out>(__ldcg(gw + k));
    }
    return;
  }
  A num = 0, vsum = 0;
  int bad_v = 0;
  for (int64_t k = threadIdx.x; k < g; k += blockDim.x) {
    A v = group_weights ? static_cast<A>(widen(group_weights[k])) : A(1);
    if (!valid_weight(v)) bad_v = 1;
    add_group_term(__ldcg(gs + k), __ldcg(gw + k), v, &num, &vsum);
  }
  num = block_sum(num, scratch);
  vsum = block_sum(vsum, scratch);
  bad = bad || __syncthreads_or(bad_v);
  if (threadIdx.x == 0) *out_loss = bad ? nan_of<T>() : static_cast<T>(finalize_loss(num, vsum));
  for (int64_t k = threadIdx.x; k < g; k += blockDim.x) {
    A v = group_weights ? static_cast<A>(widen(group_weights[k])) : A(1);
    out_a[k] = bad ? qnan : static_cast<Out>(group_grad_scale(__ldcg(gw + k), v, vsum));
  }
}

template <typename T, typename Idx, typename Out, bool kLoss, bool kShared>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(ForwardArgs<T, Idx> a, unsigned char* workspace, T* out_loss, Out* out_a,
                   Out* out_b) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  A* gs = reinterpret_cast<A*>(workspace);
  A* gw = gs + a.g;
  Control* ctl = reinterpret_cast<Control*>(workspace + control_offset<A>(a.g));

  A* s = gs;
  A* w = gw;
  if (kShared) {
    s = reinterpret_cast<A*>(smem);
    w = s + a.g;
    for (int64_t k = threadIdx.x; k < 2 * a.g; k += blockDim.x) s[k] = A(0);
    __syncthreads();
  }

  const uint64_t g_max = static_cast<uint64_t>(a.g);
  int64_t cur = -1;
  A run_s = 0, run_w = 0;
  int bad = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n;
       i += stride) {
    const int64_t id = static_cast<int64_t>(a.ids[i]);
    if (id < 0) continue;
    if (static_cast<uint64_t>(id) >= g_max) {
      bad = 1;
      continue;
    }
    const A wi = a.sample_weight ? static_cast<A>(widen(a.sample_weight[i])) : A(1);
    if (!valid_weight(wi)) {
      bad = 1;
      continue;
    }
    const A e = row_error<A>(a.y_true, a.y_pred, i, a.d);
    if (id != cur) {
      if (cur >= 0) {
        atomicAdd(s + cur, run_s);
        atomicAdd(w + cur, run_w);
      }
      cur = id, run_s = 0, run_w = 0;
    }
    run_s += wi * e;
    run_w += wi;
  }
  if (cur >= 0) {
    atomicAdd(s + cur, run_s);
    atomicAdd(w + cur, run_w);
  }
  if (bad) atomicOr(&ctl->bad, 1);

  if (kShared) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < a.g; k += blockDim.x) {
      if (w[k] != A(0) || s[k] != A(0)) {
        atomicAdd(gs + k, s[k]);
        atomicAdd(gw + k, w[k]);
      }
    }
  }

  // Last block to finish finalizes.
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&ctl->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const bool any_bad = atomicOr(&ctl->bad, 0) != 0;
  finalize_block<T, A, Out, kLoss>(gs, gw, a.group_weights, a.g, any_bad, out_loss, out_a,
                                   out_b);
}

template <typename T, typename Idx, typename Out>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(ForwardArgs<T, Idx> a, const Out* scale, const T* upstream, T* grad) {
  const int64_t total = a.n * a.d;
  const Out up = static_cast<Out>(widen(*upstream));
  const Out inv_d = Out(1) / static_cast<Out>(a.d);
  const uint64_t g_max = static_cast<uint64_t>(a.g);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t row = a.d == 1 ? e : e / a.d;
    const int64_t id = static_cast<int64_t>(a.ids[row]);
    Out r = 0;
    if (id >= 0) {
      if (static_cast<uint64_t>(id) >= g_max) {
        r = static_cast<Out>(NAN);
      } else {
        Out f = up * scale[id] * inv_d;
        if (a.sample_weight) f *= static_cast<Out>(widen(a.sample_weight[row]));
        r = element_grad(a.y_true[e], a.y_pred[e], f);
      }
    }
    grad[e] = static_cast<T>(r);
  }
}

template <typename T, typename Idx, typename Out, bool kLoss>
cudaError_t launch_forward(const ForwardArgs<T, Idx>& a, void* workspace, T* out_loss,
                           Out* out_a, Out* out_b, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  cudaError_t err = cudaMemsetAsync(workspace, 0, forward_workspace_bytes<T>(a.g), stream);
  if (err != cudaSuccess) return err;
  auto* ws = static_cast<unsigned char*>(workspace);
  const int blocks = device_blocks(a.n);
  if (choose_strategy(a.n, a.g, sizeof(A)) == Strategy::kShared) {
    const size_t smem = 2 * static_cast<size_t>(a.g) * sizeof(A);
    forward_kernel<T, Idx, Out, kLoss, true>
        <<<blocks, kThreads, smem, stream>>>(a, ws, out_loss, out_a, out_b);
  } else {
    forward_kernel<T, Idx, Out, kLoss, false>
        <<<blocks, kThreads, 0, stream>>>(a, ws, out_loss, out_a, out_b);
  }
  return cudaGetLastError();
}

}  // namespace

Strategy choose_strategy(int64_t n, int64_t g, size_t acc_bytes) {
  (void)n;
  return 2 * static_cast<size_t>(g) * acc_bytes <= kSharedBudget ? Strategy::kShared
                                                                 : Strategy::kGlobal;
}

template <typename T>
size_t forward_workspace_bytes(int64_t g) {
  return control_offset<typename Acc<T>::type>(g) + sizeof(Control);
}

template <typename T, typename Idx, typename Out>
cudaError_t stats(const ForwardArgs<T, Idx>& a, void* workspace, Out* out_sums,
                  Out* out_weights, cudaStream_t stream) {
  return launch_forward<T, Idx, Out, false>(a, workspace, nullptr, out_sums, out_weights,
                                            stream);
}

template <typename T, typename Idx, typename Out>
cudaError_t loss(const ForwardArgs<T, Idx>& a, void* workspace, T* out_loss, Out* out_scale,
                 cudaStream_t stream) {
  return launch_forward<T, Idx, Out, true>(a, workspace, out_loss, out_scale, nullptr, stream);
}

template <typename T, typename Idx, typename Out>
cudaError_t backward(const ForwardArgs<T, Idx>& a, const Out* scale, const T* upstream,
                     T* grad, cudaStream_t stream) {
  if (a.n * a.d == 0) return cudaSuccess;
  backward_kernel<T, Idx, Out><<<device_blocks(a.n * a.d), kThreads, 0, stream>>>(a, scale,
                                                                                 upstream, grad);
  return cudaGetLastError();
}

#define GMAE_INSTANTIATE(T, Idx, Out)                                                        \
  template cudaError_t stats<T, Idx, Out>(const ForwardArgs<T, Idx>&, void*, Out*, Out*,     \
                                          cudaStream_t);                                     \
  template cudaError_t loss<T, Idx, Out>(const ForwardArgs<T, Idx>&, void*, T*, Out*,        \
                                         cudaStream_t);                                      \
  template cudaError_t backward<T, Idx, Out>(const ForwardArgs<T, Idx>&, const Out*, const T*, \
                                             T*, cudaStream_t);
#define GMAE_INSTANTIATE_T(T, Out)                         \
  template size_t forward_workspace_bytes<T>(int64_t);     \
  GMAE_INSTANTIATE(T, int32_t, Out)                        \
  GMAE_INSTANTIATE(T, int64_t, Out)

GMAE_INSTANTIATE_T(__half, float)
GMAE_INSTANTIATE_T(__nv_bfloat16, float)
GMAE_INSTANTIATE_T(float, float)
GMAE_INSTANTIATE_T(double, double)

}  // namespace cuda
}  // namespace grouped_mae
