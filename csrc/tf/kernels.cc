// TF kernels for GroupedMae, GroupedMaeStats and GroupedMaeGrad.
//
// One OpKernel per op, templated on the device: it validates the inputs, allocates the
// outputs, and hands raw pointers to Impl<Device, T, Idx>, which calls the CPU
// (csrc/cpu) or CUDA (csrc/cuda) implementation. The math itself is in csrc/core.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/grouped_mae_cuda.h"
#include "tensorflow/core/util/determinism.h"
#endif

#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>

#include "cpu/grouped_mae_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/blocking_counter.h"
#include "tensorflow/core/platform/mutex.h"

namespace tensorflow {
namespace grouped_mae_tf {

using CPUDevice = Eigen::ThreadPoolDevice;
using GPUDevice = Eigen::GpuDevice;
namespace gm = ::grouped_mae;

// num_groups above this is rejected up front: [G] outputs would need more than 16 GiB.
constexpr int64_t kMaxGroups = std::numeric_limits<int32_t>::max();

template <typename T>
using OutT = typename gm::OutType<T>::type;

template <typename T, typename Idx>
using Rows = gm::cpu::Inputs<T, Idx>;

// ---------------------------------------------------------------------------------------
// Validation shared by all kernels.

absl::Status ValidateRows(const Tensor& y_true, const Tensor& y_pred, const Tensor& ids, int64_t* n,
                          int64_t* d) {
  if (y_true.dims() < 1) {
    return errors::InvalidArgument(
        "y_true must have a batch axis (rank >= 1), got a scalar of shape ",
        y_true.shape().DebugString());
  }
  if (y_true.shape() != y_pred.shape()) {
    return errors::InvalidArgument("y_true and y_pred must have the same shape, got y_true ",
                                   y_true.shape().DebugString(), " and y_pred ",
                                   y_pred.shape().DebugString());
  }
  if (ids.dims() != 1) {
    return errors::InvalidArgument("group_ids must be a vector of shape [N], got shape ",
                                   ids.shape().DebugString());
  }
  *n = y_true.dim_size(0);
  if (ids.dim_size(0) != *n) {
    return errors::InvalidArgument("group_ids has ", ids.dim_size(0),
                                   " entries but y_true has N = ", *n, " rows (shape ",
                                   y_true.shape().DebugString(), ")");
  }
  int64_t per_row = 1;
  for (int i = 1; i < y_true.dims(); ++i) per_row *= y_true.dim_size(i);
  if (per_row == 0) {
    return errors::InvalidArgument(
        "y_true and y_pred rows must have at least one element, got shape ",
        y_true.shape().DebugString());
  }
  *d = per_row;
  return absl::OkStatus();
}

absl::Status ValidateSampleWeight(bool has, const Tensor& sw, int64_t n) {
  if (has && (sw.dims() != 1 || sw.dim_size(0) != n)) {
    return errors::InvalidArgument("sample_weight must have shape [N] = [", n, "], got ",
                                   sw.shape().DebugString());
  }
  return absl::OkStatus();
}

absl::Status ReadNumGroups(const Tensor& t, int64_t* g) {
  if (t.dims() != 0) {
    return errors::InvalidArgument("num_groups must be a scalar, got shape ",
                                   t.shape().DebugString());
  }
  *g = t.dtype() == DT_INT32 ? static_cast<int64_t>(t.scalar<int32>()())
                             : static_cast<int64_t>(t.scalar<int64_t>()());
  if (*g <= 0) return errors::InvalidArgument("num_groups must be positive, got ", *g);
  if (*g > kMaxGroups) {
    return errors::InvalidArgument("num_groups = ", *g, " is too large (at most ", kMaxGroups, ")");
  }
  return absl::OkStatus();
}

absl::Status BadInputStatus(const gm::cpu::RowError& e, int64_t g) {
  switch (e.kind) {
    case gm::BadInput::kNone:
      return absl::OkStatus();
    case gm::BadInput::kGroupId:
      return errors::InvalidArgument("group_ids[", e.index, "] = ", static_cast<int64_t>(e.value),
                                     " is out of range: ids must be < num_groups = ", g,
                                     " (negative ids mark rows to ignore)");
    case gm::BadInput::kSampleWeight:
      return errors::InvalidArgument("sample_weight[", e.index, "] = ", e.value,
                                     " is invalid: sample weights must be >= 0");
    case gm::BadInput::kGroupWeight:
      return errors::InvalidArgument("group_weights[", e.index, "] = ", e.value,
                                     " is invalid: group weights must be >= 0");
  }
  return absl::OkStatus();
}

// Runs fn(s) for s in [0, shards) on TF's intra-op pool; shard 0 on the calling thread.
void RunShards(OpKernelContext* ctx, int64_t shards, const std::function<void(int64_t)>& fn) {
  if (shards <= 1) {
    fn(0);
    return;
  }
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  BlockingCounter done(static_cast<int>(shards - 1));
  for (int64_t s = 1; s < shards; ++s) {
    workers->Schedule([&fn, &done, s] {
      fn(s);
      done.DecrementCount();
    });
  }
  fn(0);
  done.Wait();
}

// RunShards on ctx's pool, as the CPU implementation takes it (run_shards(n, fn)).
auto ShardRunner(OpKernelContext* ctx) {
  return [ctx](int64_t n, const std::function<void(int64_t)>& fn) { RunShards(ctx, n, fn); };
}

int64_t CpuThreads(OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
}

// A large buffer a CPU kernel keeps between calls. TF's default CPU allocator returns large
// freed buffers to the OS, so a fresh one costs a page fault per 4 KiB on every call, and on
// a VM a fault costs ~3 us: the 64 MiB gradient at 16M rows took longer to fault in than to
// compute, and the forward's 3.2 MB float64 workspace at G = 100000 (2 shards) added 2.5 ms
// to a 3.8 ms call at 1M rows. A kernel therefore keeps its last buffer and hands it out
// again when it has the shape asked for and nobody else holds it (the next call of a
// training loop); a concurrent call finds it held and allocates its own. The price: the
// buffer stays allocated between calls. GMAE_CPU_REUSE_BUFFERS=0 turns this off. On the GPU
// it is a plain allocation: TF's GPU allocator keeps its memory.
template <typename Device>
class KeptBuffer {
 public:
  // ctx->allocate_temp, or the kept buffer.
  absl::Status AllocateTemp(OpKernelContext* ctx, DataType dtype, const TensorShape& shape,
                            Tensor* t) {
    if (!Wanted(dtype, shape)) return ctx->allocate_temp(dtype, shape, t);
    if (Take(dtype, shape, t)) return absl::OkStatus();
    TF_RETURN_IF_ERROR(ctx->allocate_temp(dtype, shape, t));
    Keep(*t);
    return absl::OkStatus();
  }

  // ctx->allocate_output(index, ...), or the kept buffer.
  absl::Status AllocateOutput(OpKernelContext* ctx, int index, const TensorShape& shape,
                              Tensor** out) {
    const DataType dtype = ctx->expected_output_dtype(index);
    if (!Wanted(dtype, shape)) return ctx->allocate_output(index, shape, out);
    Tensor kept;
    if (Take(dtype, shape, &kept)) {
      ctx->set_output(index, kept);
      *out = ctx->mutable_output(index);
      return absl::OkStatus();
    }
    TF_RETURN_IF_ERROR(ctx->allocate_output(index, shape, out));
    Keep(**out);
    return absl::OkStatus();
  }

 private:
  static constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller ones do not fault per call

  static bool EnabledByEnv() {
    const char* env = std::getenv("GMAE_CPU_REUSE_BUFFERS");
    return env == nullptr || std::string(env) != "0";
  }

  bool Wanted(DataType dtype, const TensorShape& shape) const {
    return enabled_ && shape.num_elements() * int64_t(DataTypeSize(dtype)) >= kMinBytes;
  }

  // The kept tensor in *t, when it has this type and shape and only this object holds it.
  bool Take(DataType dtype, const TensorShape& shape, Tensor* t) {
    mutex_lock lock(mu_);
    if (!kept_.IsInitialized() || kept_.dtype() != dtype || kept_.shape() != shape ||
        !kept_.RefCountIsOne()) {
      return false;
    }
    *t = kept_;
    return true;
  }

  void Keep(const Tensor& t) {
    mutex_lock lock(mu_);
    kept_ = t;
  }

  const bool enabled_ = std::is_same<Device, CPUDevice>::value && EnabledByEnv();
  mutex mu_;
  Tensor kept_ TF_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------------------
// Device implementations.

template <typename Device, typename T, typename Idx>
struct Impl;

template <typename T, typename Idx>
struct Impl<CPUDevice, T, Idx> {
  // S and W in float64; returns them in a temp tensor whose first 2G doubles are
  // (S_0, W_0, S_1, W_1, ...), written for the groups in *touched.
  static absl::Status Accumulate(OpKernelContext* ctx, const Rows<T, Idx>& rows,
                                 KeptBuffer<CPUDevice>* kept, Tensor* sw,
                                 gm::cpu::Touched* touched) {
    const int64_t shards = gm::cpu::forward_shards(rows.n, rows.g, CpuThreads(ctx));
    const int64_t doubles = 2 * rows.g + gm::cpu::forward_scratch_doubles(rows.g, shards);
    TF_RETURN_IF_ERROR(kept->AllocateTemp(ctx, DT_DOUBLE, TensorShape({doubles}), sw));
    double* base = sw->flat<double>().data();
    auto err = gm::cpu::stats(rows, shards, base, base + 2 * rows.g, ShardRunner(ctx), touched);
    return BadInputStatus(err, rows.g);
  }

  static void Stats(OpKernelContext* ctx, const Rows<T, Idx>& rows, KeptBuffer<CPUDevice>* kept,
                    Tensor* sums, Tensor* weights) {
    Tensor acc;
    gm::cpu::Touched touched;
    OP_REQUIRES_OK(ctx, Accumulate(ctx, rows, kept, &acc, &touched));
    gm::cpu::unpack(acc.flat<double>().data(), touched, rows.g, sums->flat<OutT<T>>().data(),
                    weights->flat<OutT<T>>().data(), CpuThreads(ctx), ShardRunner(ctx));
  }

  static void Loss(OpKernelContext* ctx, const Rows<T, Idx>& rows, const T* group_weights,
                   KeptBuffer<CPUDevice>* kept, Tensor* loss, Tensor* scale) {
    if (group_weights != nullptr) {
      OP_REQUIRES_OK(ctx,
                     BadInputStatus(gm::cpu::check_group_weights(group_weights, rows.g), rows.g));
    }
    Tensor acc;
    gm::cpu::Touched touched;
    OP_REQUIRES_OK(ctx, Accumulate(ctx, rows, kept, &acc, &touched));
    const double value =
        gm::cpu::finalize(acc.flat<double>().data(), touched, group_weights, rows.g,
                          scale->flat<OutT<T>>().data(), CpuThreads(ctx), ShardRunner(ctx));
    loss->scalar<T>()() = static_cast<T>(value);
  }

  static void Grad(OpKernelContext* ctx, const Rows<T, Idx>& rows, const OutT<T>* scale,
                   const Tensor& upstream, Tensor* out) {
    const OutT<T> up = static_cast<OutT<T>>(gm::widen(upstream.scalar<T>()()));
    const int64_t shards = gm::cpu::backward_shards(rows.n, CpuThreads(ctx));
    std::vector<gm::cpu::RowError> errs(shards);
    T* o = out->flat<T>().data();
    RunShards(ctx, shards, [&](int64_t s) {
      errs[s] =
          gm::cpu::backward(rows, scale, up, rows.n * s / shards, rows.n * (s + 1) / shards, o);
    });
    gm::cpu::RowError first;
    for (const auto& e : errs) first.keep_first(e);
    OP_REQUIRES_OK(ctx, BadInputStatus(first, rows.g));
  }
};

#if GOOGLE_CUDA
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<Eigen::half> {
  using type = __half;
};
template <>
struct CudaType<Eigen::bfloat16> {
  using type = __nv_bfloat16;
};

template <typename T, typename Idx>
struct Impl<GPUDevice, T, Idx> {
  using CT = typename CudaType<T>::type;
  using Out = OutT<T>;

  static gm::cuda::ForwardArgs<CT, Idx> Args(const Rows<T, Idx>& r, const T* group_weights) {
    return {reinterpret_cast<const CT*>(r.y_true),
            reinterpret_cast<const CT*>(r.y_pred),
            r.ids,
            reinterpret_cast<const CT*>(r.sample_weight),
            reinterpret_cast<const CT*>(group_weights),
            r.n,
            r.d,
            r.g};
  }

  static absl::Status Check(cudaError_t err) {
    if (err == cudaSuccess) return absl::OkStatus();
    return errors::Internal("grouped_mae CUDA launch failed: ", cudaGetErrorString(err));
  }

  // Launch plan and workspace. Under tf.config.experimental.enable_op_determinism() the
  // deterministic strategy (fixed-order sums, no float atomics) is used, never a fallback.
  static absl::Status Prepare(OpKernelContext* ctx, const gm::cuda::ForwardArgs<CT, Idx>& args,
                              gm::cuda::ForwardPlan* plan, Tensor* ws) {
    TF_RETURN_IF_ERROR(Check(
        gm::cuda::plan_forward(args, gm::cuda::Strategy::kAuto, OpDeterminismRequired(), plan)));
    return ctx->allocate_temp(DT_UINT8, TensorShape({static_cast<int64_t>(plan->workspace_bytes)}),
                              ws);
  }

  // The KeptBuffer is unused: TF's GPU allocator keeps its memory.
  static void Stats(OpKernelContext* ctx, const Rows<T, Idx>& rows, KeptBuffer<GPUDevice>*,
                    Tensor* sums, Tensor* weights) {
    const auto args = Args(rows, nullptr);
    gm::cuda::ForwardPlan plan;
    Tensor ws;
    OP_REQUIRES_OK(ctx, Prepare(ctx, args, &plan, &ws));
    auto stream = ctx->eigen_device<GPUDevice>().stream();
    OP_REQUIRES_OK(
        ctx, Check(gm::cuda::stats(args, plan, ws.flat<uint8>().data(), sums->flat<Out>().data(),
                                   weights->flat<Out>().data(), stream)));
  }

  static void Loss(OpKernelContext* ctx, const Rows<T, Idx>& rows, const T* group_weights,
                   KeptBuffer<GPUDevice>*, Tensor* loss, Tensor* scale) {
    const auto args = Args(rows, group_weights);
    gm::cuda::ForwardPlan plan;
    Tensor ws;
    OP_REQUIRES_OK(ctx, Prepare(ctx, args, &plan, &ws));
    auto stream = ctx->eigen_device<GPUDevice>().stream();
    OP_REQUIRES_OK(ctx, Check(gm::cuda::loss(args, plan, ws.flat<uint8>().data(),
                                             reinterpret_cast<CT*>(loss->flat<T>().data()),
                                             scale->flat<Out>().data(), stream)));
  }

  static void Grad(OpKernelContext* ctx, const Rows<T, Idx>& rows, const Out* scale,
                   const Tensor& upstream, Tensor* out) {
    auto stream = ctx->eigen_device<GPUDevice>().stream();
    OP_REQUIRES_OK(ctx,
                   Check(gm::cuda::backward(Args(rows, nullptr), scale,
                                            reinterpret_cast<const CT*>(upstream.flat<T>().data()),
                                            reinterpret_cast<CT*>(out->flat<T>().data()), stream)));
  }
};
#endif  // GOOGLE_CUDA

// ---------------------------------------------------------------------------------------
// Op kernels.

// Reads and validates the row inputs common to every op.
template <typename T, typename Idx>
absl::Status ReadRows(OpKernelContext* ctx, bool has_sample_weight, int sample_weight_index,
                      Rows<T, Idx>* rows) {
  const Tensor& y_true = ctx->input(0);
  const Tensor& y_pred = ctx->input(1);
  const Tensor& ids = ctx->input(2);
  const Tensor& sw = ctx->input(sample_weight_index);
  int64_t n = 0, d = 1;
  TF_RETURN_IF_ERROR(ValidateRows(y_true, y_pred, ids, &n, &d));
  TF_RETURN_IF_ERROR(ValidateSampleWeight(has_sample_weight, sw, n));
  rows->y_true = y_true.flat<T>().data();
  rows->y_pred = y_pred.flat<T>().data();
  rows->ids = ids.flat<Idx>().data();
  rows->sample_weight = has_sample_weight ? sw.flat<T>().data() : nullptr;
  rows->n = n;
  rows->d = d;
  rows->g = 1;
  return absl::OkStatus();
}

template <typename Device, typename T, typename Idx>
class GroupedMaeOp : public OpKernel {
 public:
  explicit GroupedMaeOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("has_sample_weight", &has_sample_weight_));
    OP_REQUIRES_OK(c, c->GetAttr("has_group_weights", &has_group_weights_));
  }

  void Compute(OpKernelContext* ctx) override {
    Rows<T, Idx> rows;
    OP_REQUIRES_OK(ctx, ReadRows(ctx, has_sample_weight_, 4, &rows));
    OP_REQUIRES_OK(ctx, ReadNumGroups(ctx->input(3), &rows.g));
    const Tensor& gw = ctx->input(5);
    OP_REQUIRES(ctx, !has_group_weights_ || (gw.dims() == 1 && gw.dim_size(0) == rows.g),
                errors::InvalidArgument("group_weights must have shape [num_groups] = [", rows.g,
                                        "], got ", gw.shape().DebugString()));
    Tensor* loss = nullptr;
    Tensor* scale = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &loss));
    OP_REQUIRES_OK(ctx, kept_scale_.AllocateOutput(ctx, 1, TensorShape({rows.g}), &scale));
    Impl<Device, T, Idx>::Loss(ctx, rows, has_group_weights_ ? gw.flat<T>().data() : nullptr,
                               &workspace_, loss, scale);
  }

 private:
  bool has_sample_weight_ = false;
  bool has_group_weights_ = false;
  // On the CPU, buffers of 1 MiB or more are kept between calls (see KeptBuffer).
  KeptBuffer<Device> workspace_;
  KeptBuffer<Device> kept_scale_;
};

template <typename Device, typename T, typename Idx>
class GroupedMaeStatsOp : public OpKernel {
 public:
  explicit GroupedMaeStatsOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("has_sample_weight", &has_sample_weight_));
  }

  void Compute(OpKernelContext* ctx) override {
    Rows<T, Idx> rows;
    OP_REQUIRES_OK(ctx, ReadRows(ctx, has_sample_weight_, 4, &rows));
    OP_REQUIRES_OK(ctx, ReadNumGroups(ctx->input(3), &rows.g));
    Tensor* sums = nullptr;
    Tensor* weights = nullptr;
    OP_REQUIRES_OK(ctx, kept_sums_.AllocateOutput(ctx, 0, TensorShape({rows.g}), &sums));
    OP_REQUIRES_OK(ctx, kept_weights_.AllocateOutput(ctx, 1, TensorShape({rows.g}), &weights));
    Impl<Device, T, Idx>::Stats(ctx, rows, &workspace_, sums, weights);
  }

 private:
  bool has_sample_weight_ = false;
  // On the CPU, buffers of 1 MiB or more are kept between calls (see KeptBuffer).
  KeptBuffer<Device> workspace_;
  KeptBuffer<Device> kept_sums_;
  KeptBuffer<Device> kept_weights_;
};

template <typename Device, typename T, typename Idx>
class GroupedMaeGradOp : public OpKernel {
 public:
  explicit GroupedMaeGradOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("has_sample_weight", &has_sample_weight_));
  }

  void Compute(OpKernelContext* ctx) override {
    Rows<T, Idx> rows;
    OP_REQUIRES_OK(ctx, ReadRows(ctx, has_sample_weight_, 3, &rows));
    const Tensor& scale = ctx->input(4);
    const Tensor& upstream = ctx->input(5);
    OP_REQUIRES(ctx, scale.dims() == 1 && scale.dim_size(0) >= 1,
                errors::InvalidArgument("group_scale must be a non-empty vector [num_groups], got ",
                                        scale.shape().DebugString()));
    OP_REQUIRES(
        ctx, upstream.dims() == 0,
        errors::InvalidArgument("upstream must be a scalar, got ", upstream.shape().DebugString()));
    rows.g = scale.dim_size(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, kept_grad_.AllocateOutput(ctx, 0, ctx->input(1).shape(), &out));
    Impl<Device, T, Idx>::Grad(ctx, rows, scale.flat<OutT<T>>().data(), upstream, out);
  }

 private:
  bool has_sample_weight_ = false;
  // The gradient is as large as y_pred: on the CPU the kernel hands out its last one again
  // once nobody else holds it (a training loop that drops each step's gradient).
  KeptBuffer<Device> kept_grad_;
};

#define GMAE_REGISTER(DEV, DEVICE, T, Idx)                     \
  REGISTER_KERNEL_BUILDER(Name("GroupedMae")                   \
                              .Device(DEV)                     \
                              .HostMemory("num_groups")        \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<OutT<T>>("Tout") \
                              .TypeConstraint<Idx>("Tidx"),    \
                          GroupedMaeOp<DEVICE, T, Idx>);       \
  REGISTER_KERNEL_BUILDER(Name("GroupedMaeStats")              \
                              .Device(DEV)                     \
                              .HostMemory("num_groups")        \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<OutT<T>>("Tout") \
                              .TypeConstraint<Idx>("Tidx"),    \
                          GroupedMaeStatsOp<DEVICE, T, Idx>);  \
  REGISTER_KERNEL_BUILDER(Name("GroupedMaeGrad")               \
                              .Device(DEV)                     \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<OutT<T>>("Tout") \
                              .TypeConstraint<Idx>("Tidx"),    \
                          GroupedMaeGradOp<DEVICE, T, Idx>);

#define GMAE_REGISTER_T(DEV, DEVICE, T) \
  GMAE_REGISTER(DEV, DEVICE, T, int32)  \
  GMAE_REGISTER(DEV, DEVICE, T, int64_t)

#define GMAE_REGISTER_ALL(DEV, DEVICE)          \
  GMAE_REGISTER_T(DEV, DEVICE, Eigen::half)     \
  GMAE_REGISTER_T(DEV, DEVICE, Eigen::bfloat16) \
  GMAE_REGISTER_T(DEV, DEVICE, float)           \
  GMAE_REGISTER_T(DEV, DEVICE, double)

GMAE_REGISTER_ALL(DEVICE_CPU, CPUDevice)
#if GOOGLE_CUDA
GMAE_REGISTER_ALL(DEVICE_GPU, GPUDevice)
#endif

}  // namespace grouped_mae_tf
}  // namespace tensorflow
