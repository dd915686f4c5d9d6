// grouped_mae_op._core: the core kernels without TensorFlow, for tests and benchmarks on
// machines that have no TF (the borrowed GPU machine), and for checking the kernels directly.
//
//   CPU  (numpy arrays): cpu_stats, cpu_loss, cpu_backward - csrc/cpu with a std::thread pool.
//   CUDA (device arrays exposing __cuda_array_interface__, e.g. CuPy or PyTorch tensors; the
//        caller allocates the outputs): cuda_plan, cuda_stats, cuda_loss, cuda_backward.
//        `stream` is a cudaStream_t as an integer (0: the legacy default stream); the calls
//        only enqueue work. `strategy` forces a forward strategy by name; `deterministic`
//        (None: the GMAE_DETERMINISTIC environment variable) selects the deterministic one.
//        `dtype="bfloat16"` reinterprets 2-byte element arrays (PyTorch cannot export
//        bfloat16 through __cuda_array_interface__; pass tensor.view(torch.int16)).
// Thin binding: argument checks and dispatch only; the math is in csrc/core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cpu/grouped_mae_cpu.h"

#if GMAE_WITH_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "cuda/grouped_mae_cuda.h"
#endif

namespace py = pybind11;
namespace gm = grouped_mae;

namespace {

// ---------------------------------------------------------------------------------------
// Shared checks.

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

// N and D from y_true/y_pred shapes and the ids shape, with the TF op's error wording.
void rows_from_shapes(const std::vector<int64_t>& yt, const std::vector<int64_t>& yp,
                      const std::vector<int64_t>& ids, int64_t* n, int64_t* d) {
  if (yt.empty()) fail("y_true must have a batch axis (rank >= 1), got a scalar");
  if (yt != yp) {
    fail("y_true and y_pred must have the same shape, got y_true " + shape_str(yt) +
         " and y_pred " + shape_str(yp));
  }
  if (ids.size() != 1) fail("group_ids must be a vector of shape [N], got " + shape_str(ids));
  *n = yt[0];
  if (ids[0] != *n) {
    fail("group_ids has " + std::to_string(ids[0]) +
         " entries but y_true has N = " + std::to_string(*n) + " rows");
  }
  int64_t per_row = 1;
  for (size_t i = 1; i < yt.size(); ++i) per_row *= yt[i];
  if (per_row == 0) fail("y_true and y_pred rows must have at least one element");
  *d = per_row;
}

void check_num_groups(int64_t g) {
  if (g <= 0) fail("num_groups must be positive, got " + std::to_string(g));
  if (g > INT32_MAX) fail("num_groups = " + std::to_string(g) + " is too large");
}

void raise_bad_input(const gm::cpu::RowError& e, int64_t g) {
  std::ostringstream os;
  switch (e.kind) {
    case gm::BadInput::kNone:
      return;
    case gm::BadInput::kGroupId:
      os << "group_ids[" << e.index << "] = " << static_cast<int64_t>(e.value)
         << " is out of range: ids must be < num_groups = " << g
         << " (negative ids mark rows to ignore)";
      break;
    case gm::BadInput::kSampleWeight:
      os << "sample_weight[" << e.index << "] = " << e.value
         << " is invalid: sample weights must be >= 0";
      break;
    case gm::BadInput::kGroupWeight:
      os << "group_weights[" << e.index << "] = " << e.value
         << " is invalid: group weights must be >= 0";
      break;
  }
  fail(os.str());
}

// ---------------------------------------------------------------------------------------
// CPU path.

// run_shards for csrc/cpu: shard 0 on the calling thread, the rest on std::threads.
void run_shards(int64_t shards, const std::function<void(int64_t)>& fn) {
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(std::max<int64_t>(0, shards - 1)));
  for (int64_t s = 1; s < shards; ++s) pool.emplace_back(fn, s);
  fn(0);
  for (auto& t : pool) t.join();
}

int64_t thread_count(int64_t requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int64_t>(hw) : 1;
}

std::vector<int64_t> shape_of(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

template <typename T, typename Idx>
struct CpuCall {
  CArray<T> y_true, y_pred, sample_weight;
  CArray<Idx> ids;
  gm::cpu::Inputs<T, Idx> in{};

  CpuCall(const py::array& yt, const py::array& yp, const py::array& id, const py::object& sw,
          int64_t g)
      : y_true(CArray<T>::ensure(yt)), y_pred(CArray<T>::ensure(yp)), ids(CArray<Idx>::ensure(id)) {
    const auto dtype = py::dtype::of<T>();
    if (!yp.dtype().is(dtype)) fail("y_pred must have the dtype of y_true");
    int64_t n = 0, d = 1;
    rows_from_shapes(shape_of(y_true), shape_of(y_pred), shape_of(ids), &n, &d);
    in.y_true = y_true.data();
    in.y_pred = y_pred.data();
    in.ids = ids.data();
    in.sample_weight = nullptr;
    in.n = n, in.d = d, in.g = g;
    if (!sw.is_none()) {
      sample_weight = CArray<T>::ensure(sw);
      if (!py::array::ensure(sw).dtype().is(dtype) || !sample_weight || sample_weight.ndim() != 1 ||
          sample_weight.shape(0) != n) {
        fail("sample_weight must have shape [N] = [" + std::to_string(n) +
             "] and the dtype of y_true");
      }
      in.sample_weight = sample_weight.data();
    }
  }
};

template <typename T, typename Idx>
py::tuple cpu_stats_impl(const py::array& yt, const py::array& yp, const py::array& ids, int64_t g,
                         const py::object& sw, int64_t threads) {
  check_num_groups(g);
  CpuCall<T, Idx> c(yt, yp, ids, sw, g);
  py::array_t<double> sums(g), weights(g);
  const int64_t shards = gm::cpu::forward_shards(c.in.n, g, thread_count(threads));
  // stats writes (S_k, W_k) pairs: [G, 2] first, then its scratch.
  std::vector<double> acc(2 * g + gm::cpu::forward_scratch_doubles(g, shards));
  gm::cpu::RowError err;
  {
    py::gil_scoped_release release;
    gm::cpu::Touched touched;
    err = gm::cpu::stats(c.in, shards, acc.data(), acc.data() + 2 * g, run_shards, &touched);
    if (err.kind == gm::BadInput::kNone) {
      gm::cpu::unpack(acc.data(), touched, g, sums.mutable_data(), weights.mutable_data(),
                      thread_count(threads), run_shards);
    }
  }
  raise_bad_input(err, g);
  return py::make_tuple(sums, weights);
}

template <typename T, typename Idx>
py::tuple cpu_loss_impl(const py::array& yt, const py::array& yp, const py::array& ids, int64_t g,
                        const py::object& sw, const py::object& gw, int64_t threads) {
  check_num_groups(g);
  CpuCall<T, Idx> c(yt, yp, ids, sw, g);
  CArray<T> group_weights;  // default-constructed: an empty array, not a null handle
  const T* gw_ptr = nullptr;
  if (!gw.is_none()) {
    group_weights = CArray<T>::ensure(gw);
    if (!py::array::ensure(gw).dtype().is(py::dtype::of<T>()) || !group_weights ||
        group_weights.ndim() != 1 || group_weights.shape(0) != g) {
      fail("group_weights must have shape [num_groups] = [" + std::to_string(g) +
           "] and the dtype of y_true");
    }
    gw_ptr = group_weights.data();
    raise_bad_input(gm::cpu::check_group_weights(gw_ptr, g), g);
  }
  using Out = typename gm::OutType<T>::type;
  py::array_t<Out> scale(g);
  const int64_t shards = gm::cpu::forward_shards(c.in.n, g, thread_count(threads));
  // stats writes (S_k, W_k) pairs: [G, 2] first, then its scratch.
  std::vector<double> acc(2 * g + gm::cpu::forward_scratch_doubles(g, shards));
  gm::cpu::RowError err;
  double value = 0;
  {
    py::gil_scoped_release release;
    gm::cpu::Touched touched;
    err = gm::cpu::stats(c.in, shards, acc.data(), acc.data() + 2 * g, run_shards, &touched);
    if (err.kind == gm::BadInput::kNone) {
      value = gm::cpu::finalize(acc.data(), touched, gw_ptr, g, scale.mutable_data(),
                                thread_count(threads), run_shards);
    }
  }
  raise_bad_input(err, g);
  return py::make_tuple(value, scale);
}

template <typename T, typename Idx>
py::array cpu_backward_impl(const py::array& yt, const py::array& yp, const py::array& ids,
                            const py::array& scale_in, double upstream, const py::object& sw,
                            int64_t threads) {
  using Out = typename gm::OutType<T>::type;
  auto scale = CArray<Out>::ensure(scale_in);
  if (!scale || scale.ndim() != 1 || scale.shape(0) < 1) {
    fail("group_scale must be a non-empty vector [num_groups] of the op's scale dtype");
  }
  const int64_t g = scale.shape(0);
  CpuCall<T, Idx> c(yt, yp, ids, sw, g);
  py::array_t<T> out(shape_of(c.y_true));
  const int64_t shards = gm::cpu::backward_shards(c.in.n, thread_count(threads));
  std::vector<gm::cpu::RowError> errs(shards);
  {
    py::gil_scoped_release release;
    T* o = out.mutable_data();
    const Out up = static_cast<Out>(upstream);
    run_shards(shards, [&](int64_t s) {
      errs[s] = gm::cpu::backward(c.in, scale.data(), up, c.in.n * s / shards,
                                  c.in.n * (s + 1) / shards, o);
    });
  }
  gm::cpu::RowError first;
  for (const auto& e : errs) first.keep_first(e);
  raise_bad_input(first, g);
  return out;
}

// Dispatch on (y dtype, ids dtype) for the CPU entry points.
template <template <typename, typename> class F, typename... Args>
auto cpu_dispatch(const py::array& y_true, const py::array& ids, Args&&... args) {
  const bool i32 = ids.dtype().is(py::dtype::of<int32_t>());
  const bool i64 = ids.dtype().is(py::dtype::of<int64_t>());
  if (!i32 && !i64)
    fail("group_ids must be int32 or int64, got " + std::string(py::str(ids.dtype())));
  if (y_true.dtype().is(py::dtype::of<float>())) {
    return i32 ? F<float, int32_t>::call(std::forward<Args>(args)...)
               : F<float, int64_t>::call(std::forward<Args>(args)...);
  }
  if (y_true.dtype().is(py::dtype::of<double>())) {
    return i32 ? F<double, int32_t>::call(std::forward<Args>(args)...)
               : F<double, int64_t>::call(std::forward<Args>(args)...);
  }
  fail("y_true must be float32 or float64 on the CPU path, got " +
       std::string(py::str(y_true.dtype())));
}

template <typename T, typename Idx>
struct CpuStats {
  template <typename... A>
  static py::object call(A&&... a) {
    return cpu_stats_impl<T, Idx>(std::forward<A>(a)...);
  }
};
template <typename T, typename Idx>
struct CpuLoss {
  template <typename... A>
  static py::object call(A&&... a) {
    return cpu_loss_impl<T, Idx>(std::forward<A>(a)...);
  }
};
template <typename T, typename Idx>
struct CpuBackward {
  template <typename... A>
  static py::object call(A&&... a) {
    return cpu_backward_impl<T, Idx>(std::forward<A>(a)...);
  }
};

#if GMAE_WITH_CUDA
// ---------------------------------------------------------------------------------------
// CUDA path.

// A device array described by __cuda_array_interface__ (C-contiguous only).
struct DeviceArray {
  void* ptr = nullptr;
  std::string type;  // "float16", "bfloat16", "float32", "float64", "int32", "int64"
  std::vector<int64_t> shape;
  bool present = false;

  int64_t size() const {
    int64_t s = 1;
    for (auto v : shape) s *= v;
    return s;
  }
};

std::string type_from_typestr(const std::string& ts) {
  if (ts.size() < 3 || ts[0] == '>') return ts;
  const std::string k = ts.substr(1);
  if (k == "f2") return "float16";
  if (k == "f4") return "float32";
  if (k == "f8") return "float64";
  if (k == "i4") return "int32";
  if (k == "i8") return "int64";
  if (k == "i2") return "int16";
  return ts;
}

size_t type_size(const std::string& t) {
  if (t == "float16" || t == "bfloat16" || t == "int16") return 2;
  if (t == "float32" || t == "int32") return 4;
  return 8;
}

DeviceArray device_array(const py::object& obj, const char* name, bool writable = false) {
  DeviceArray a;
  if (obj.is_none()) return a;
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    fail(std::string(name) +
         " must be a CUDA device array exposing __cuda_array_interface__ "
         "(CuPy array or PyTorch CUDA tensor)");
  }
  py::dict cai = obj.attr("__cuda_array_interface__");
  auto data = cai["data"].cast<py::tuple>();
  a.ptr = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  if (writable && data[1].cast<bool>()) fail(std::string(name) + " is read-only");
  a.type = type_from_typestr(cai["typestr"].cast<std::string>());
  a.shape = cai["shape"].cast<std::vector<int64_t>>();
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    auto strides = cai["strides"].cast<std::vector<int64_t>>();
    int64_t expect = static_cast<int64_t>(type_size(a.type));
    for (size_t i = a.shape.size(); i-- > 0;) {
      if (a.shape[i] > 1 && strides[i] != expect) {
        fail(std::string(name) + " must be C-contiguous");
      }
      expect *= a.shape[i];
    }
  }
  a.present = true;
  return a;
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("grouped_mae CUDA ") + what +
                             " failed: " + cudaGetErrorString(err));
  }
}

gm::cuda::Strategy strategy_from_name(const std::string& s) {
  using S = gm::cuda::Strategy;
  for (S v : {S::kAuto, S::kSharedRuns, S::kGlobalRuns, S::kGlobalDirect, S::kDeterministic}) {
    if (s == gm::cuda::strategy_name(v)) return v;
  }
  fail(
      "strategy must be one of auto, shared_runs, global_runs, global_direct, deterministic; got "
      "'" +
      s + "'");
}

bool env_deterministic() {
  const char* v = std::getenv("GMAE_DETERMINISTIC");
  if (v == nullptr) return false;
  std::string s(v);
  return s == "1" || s == "true" || s == "TRUE" || s == "yes" || s == "on";
}

bool resolve_deterministic(const py::object& det) {
  return det.is_none() ? env_deterministic() : det.cast<bool>();
}

py::dict plan_dict(const gm::cuda::ForwardPlan& p) {
  py::dict d;
  d["strategy"] = gm::cuda::strategy_name(p.strategy);
  d["vectorized"] = p.vectorized;
  d["blocks"] = p.blocks;
  d["partial_rows"] = p.partial_rows;
  d["partials_in_shared"] = p.partials_in_shared;
  d["shared_bytes"] = p.shared_bytes;
  d["workspace_bytes"] = p.workspace_bytes;
  return d;
}

// Everything one CUDA call needs, checked.
struct CudaCall {
  DeviceArray y_true, y_pred, ids, sample_weight;
  std::string elem;  // element type of y
  int64_t n = 0, d = 1;

  CudaCall(const py::object& yt, const py::object& yp, const py::object& id, const py::object& sw,
           const py::object& dtype) {
    y_true = device_array(yt, "y_true");
    y_pred = device_array(yp, "y_pred");
    ids = device_array(id, "group_ids");
    sample_weight = device_array(sw, "sample_weight");
    elem = y_true.type;
    if (!dtype.is_none()) {
      elem = dtype.cast<std::string>();
      if (type_size(elem) != type_size(y_true.type))
        fail("dtype does not match y_true's element size");
    }
    if (elem != "float16" && elem != "bfloat16" && elem != "float32" && elem != "float64") {
      fail("y_true must be float16, bfloat16, float32 or float64, got " + elem);
    }
    if (y_pred.type != y_true.type) fail("y_pred must have the dtype of y_true");
    if (ids.type != "int32" && ids.type != "int64") {
      fail("group_ids must be int32 or int64, got " + ids.type);
    }
    rows_from_shapes(y_true.shape, y_pred.shape, ids.shape, &n, &d);
    if (sample_weight.present &&
        (sample_weight.type != y_true.type || sample_weight.shape != std::vector<int64_t>{n})) {
      fail("sample_weight must have shape [N] = [" + std::to_string(n) +
           "] and the dtype of y_true");
    }
  }

  std::string out_type() const { return elem == "float64" ? "float64" : "float32"; }

  void check_out(const DeviceArray& a, const char* name, int64_t len) const {
    if (a.type != out_type() || a.shape != std::vector<int64_t>{len}) {
      fail(std::string(name) + " must be a " + out_type() + " device array of shape [" +
           std::to_string(len) + "]");
    }
  }
};

template <typename T, typename Idx>
gm::cuda::ForwardArgs<T, Idx> forward_args(const CudaCall& c, const DeviceArray& gw, int64_t g) {
  return {static_cast<const T*>(c.y_true.ptr),
          static_cast<const T*>(c.y_pred.ptr),
          static_cast<const Idx*>(c.ids.ptr),
          static_cast<const T*>(c.sample_weight.ptr),
          static_cast<const T*>(gw.ptr),
          c.n,
          c.d,
          g};
}

template <typename T, typename Idx>
gm::cuda::ForwardPlan make_plan(const gm::cuda::ForwardArgs<T, Idx>& a, const std::string& strategy,
                                bool deterministic) {
  const auto s = strategy_from_name(strategy);
  if (deterministic && s != gm::cuda::Strategy::kAuto && s != gm::cuda::Strategy::kDeterministic) {
    fail("strategy '" + strategy +
         "' uses floating-point atomics and is not deterministic, but "
         "deterministic mode is on (deterministic=True or GMAE_DETERMINISTIC=1)");
  }
  const size_t acc_bytes = sizeof(T) == 2 ? 4 : 8;  // accumulator: float for 16-bit inputs
  if (s == gm::cuda::Strategy::kSharedRuns &&
      gm::cuda::choose_strategy(INT64_MAX, a.g, acc_bytes) != gm::cuda::Strategy::kSharedRuns) {
    fail(
        "strategy 'shared_runs' needs 2 * num_groups accumulators in shared memory; "
        "num_groups = " +
        std::to_string(a.g) + " is too many");
  }
  gm::cuda::ForwardPlan plan;
  check_cuda(gm::cuda::plan_forward(a, s, deterministic, &plan), "plan");
  return plan;
}

// Workspace from the stream-ordered allocator: no synchronisation.
struct StreamBuffer {
  void* ptr = nullptr;
  cudaStream_t stream;
  StreamBuffer(size_t bytes, cudaStream_t s) : stream(s) {
    check_cuda(cudaMallocAsync(&ptr, bytes, s), "workspace allocation");
  }
  ~StreamBuffer() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
};

enum class Op { kPlan, kStats, kLoss };

template <typename T, typename Idx>
py::dict forward_impl(Op op, const CudaCall& c, int64_t g, const DeviceArray& gw,
                      const DeviceArray& out_a, const DeviceArray& out_b,
                      const std::string& strategy, bool det, uintptr_t stream_handle) {
  using Out = typename gm::OutType<T>::type;
  const auto args = forward_args<T, Idx>(c, gw, g);
  const auto plan = make_plan(args, strategy, det);
  if (op == Op::kPlan) return plan_dict(plan);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  StreamBuffer ws(plan.workspace_bytes, stream);
  if (op == Op::kStats) {
    check_cuda(gm::cuda::stats(args, plan, ws.ptr, static_cast<Out*>(out_a.ptr),
                               static_cast<Out*>(out_b.ptr), stream),
               "forward launch");
  } else {
    check_cuda(gm::cuda::loss(args, plan, ws.ptr, static_cast<T*>(out_a.ptr),
                              static_cast<Out*>(out_b.ptr), stream),
               "forward launch");
  }
  return plan_dict(plan);
}

template <typename T, typename Idx>
void backward_impl(const CudaCall& c, int64_t g, const DeviceArray& scale,
                   const DeviceArray& upstream, const DeviceArray& grad, uintptr_t stream) {
  using Out = typename gm::OutType<T>::type;
  const auto args = forward_args<T, Idx>(c, DeviceArray{}, g);
  check_cuda(gm::cuda::backward(args, static_cast<const Out*>(scale.ptr),
                                static_cast<const T*>(upstream.ptr), static_cast<T*>(grad.ptr),
                                reinterpret_cast<cudaStream_t>(stream)),
             "backward launch");
}

template <template <typename, typename> class F, typename... Args>
auto cuda_dispatch(const CudaCall& c, Args&&... args) {
  const bool i32 = c.ids.type == "int32";
#define GMAE_CASE(NAME, T)                                            \
  if (c.elem == NAME) {                                               \
    return i32 ? F<T, int32_t>::call(c, std::forward<Args>(args)...)  \
               : F<T, int64_t>::call(c, std::forward<Args>(args)...); \
  }
  GMAE_CASE("float16", __half)
  GMAE_CASE("bfloat16", __nv_bfloat16)
  GMAE_CASE("float32", float)
  GMAE_CASE("float64", double)
#undef GMAE_CASE
  fail("unsupported dtype " + c.elem);
}

template <typename T, typename Idx>
struct CudaForward {
  template <typename... A>
  static py::dict call(const CudaCall& c, Op op, A&&... a) {
    return forward_impl<T, Idx>(op, c, std::forward<A>(a)...);
  }
};
template <typename T, typename Idx>
struct CudaBackward {
  template <typename... A>
  static int call(const CudaCall& c, A&&... a) {
    backward_impl<T, Idx>(c, std::forward<A>(a)...);
    return 0;
  }
};
#endif  // GMAE_WITH_CUDA

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() =
      "grouped-MAE core kernels without TensorFlow (CPU on numpy arrays, CUDA on device "
      "arrays via __cuda_array_interface__)";
  m.attr("with_cuda") = static_cast<bool>(GMAE_WITH_CUDA);

  m.def(
      "cpu_stats",
      [](const py::array& yt, const py::array& yp, const py::array& ids, int64_t g,
         const py::object& sw,
         int64_t threads) { return cpu_dispatch<CpuStats>(yt, ids, yt, yp, ids, g, sw, threads); },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("num_groups"),
      py::arg("sample_weight") = py::none(), py::arg("threads") = 0,
      "(sums, weights) as float64 arrays of length num_groups; raises ValueError on bad input.");
  m.def(
      "cpu_loss",
      [](const py::array& yt, const py::array& yp, const py::array& ids, int64_t g,
         const py::object& sw, const py::object& gw, int64_t threads) {
        return cpu_dispatch<CpuLoss>(yt, ids, yt, yp, ids, g, sw, gw, threads);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("num_groups"),
      py::arg("sample_weight") = py::none(), py::arg("group_weights") = py::none(),
      py::arg("threads") = 0, "(loss as a Python float, group_scale array).");
  m.def(
      "cpu_backward",
      [](const py::array& yt, const py::array& yp, const py::array& ids, const py::array& scale,
         double upstream, const py::object& sw, int64_t threads) {
        return cpu_dispatch<CpuBackward>(yt, ids, yt, yp, ids, scale, upstream, sw, threads);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("group_scale"),
      py::arg("upstream") = 1.0, py::arg("sample_weight") = py::none(), py::arg("threads") = 0,
      "Gradient of upstream * loss with respect to y_pred.");

#if GMAE_WITH_CUDA
  m.def("deterministic_from_env", &env_deterministic,
        "True when GMAE_DETERMINISTIC is set to 1/true/yes/on.");
  m.def(
      "cuda_device_count",
      []() {
        int n = 0;
        return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
      },
      "Visible CUDA devices (0 when none or no driver).");
  m.def(
      "choose_strategy",
      [](int64_t n, int64_t g, const std::string& dtype) {
        const size_t acc = dtype == "float16" || dtype == "bfloat16" ? 4 : 8;
        return std::string(gm::cuda::strategy_name(gm::cuda::choose_strategy(n, g, acc)));
      },
      py::arg("n"), py::arg("num_groups"), py::arg("dtype"),
      "The strategy the automatic rule picks (no device needed).");
  m.def(
      "cuda_plan",
      [](const py::object& yt, const py::object& yp, const py::object& ids, int64_t g,
         const py::object& sw, const std::string& strategy, const py::object& det,
         const py::object& dtype) {
        check_num_groups(g);
        CudaCall c(yt, yp, ids, sw, dtype);
        return cuda_dispatch<CudaForward>(c, Op::kPlan, g, DeviceArray{}, DeviceArray{},
                                          DeviceArray{}, strategy, resolve_deterministic(det),
                                          uintptr_t{0});
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("num_groups"),
      py::arg("sample_weight") = py::none(), py::arg("strategy") = "auto",
      py::arg("deterministic") = py::none(), py::arg("dtype") = py::none(),
      "The launch plan (strategy, grid, workspace) a forward call would use.");
  m.def(
      "cuda_stats",
      [](const py::object& yt, const py::object& yp, const py::object& ids,
         const py::object& sums_out, const py::object& weights_out, const py::object& sw,
         const std::string& strategy, const py::object& det, uintptr_t stream,
         const py::object& dtype) {
        CudaCall c(yt, yp, ids, sw, dtype);
        auto sums = device_array(sums_out, "sums_out", true);
        auto weights = device_array(weights_out, "weights_out", true);
        if (sums.shape.size() != 1) fail("sums_out must be a vector [num_groups]");
        const int64_t g = sums.shape[0];
        check_num_groups(g);
        c.check_out(sums, "sums_out", g);
        c.check_out(weights, "weights_out", g);
        return cuda_dispatch<CudaForward>(c, Op::kStats, g, DeviceArray{}, sums, weights, strategy,
                                          resolve_deterministic(det), stream);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("sums_out"),
      py::arg("weights_out"), py::arg("sample_weight") = py::none(), py::arg("strategy") = "auto",
      py::arg("deterministic") = py::none(), py::arg("stream") = 0, py::arg("dtype") = py::none(),
      "Enqueues the forward statistics; returns the plan used. num_groups = len(sums_out).");
  m.def(
      "cuda_loss",
      [](const py::object& yt, const py::object& yp, const py::object& ids,
         const py::object& loss_out, const py::object& scale_out, const py::object& sw,
         const py::object& gw, const std::string& strategy, const py::object& det, uintptr_t stream,
         const py::object& dtype) {
        CudaCall c(yt, yp, ids, sw, dtype);
        auto loss = device_array(loss_out, "loss_out", true);
        auto scale = device_array(scale_out, "scale_out", true);
        if (scale.shape.size() != 1) fail("scale_out must be a vector [num_groups]");
        const int64_t g = scale.shape[0];
        check_num_groups(g);
        c.check_out(scale, "scale_out", g);
        if (loss.type != c.y_true.type || loss.size() != 1) {
          fail("loss_out must be a one-element device array of y_true's dtype");
        }
        auto group_weights = device_array(gw, "group_weights");
        if (group_weights.present && (group_weights.type != c.y_true.type ||
                                      group_weights.shape != std::vector<int64_t>{g})) {
          fail("group_weights must have shape [num_groups] = [" + std::to_string(g) +
               "] and the dtype of y_true");
        }
        return cuda_dispatch<CudaForward>(c, Op::kLoss, g, group_weights, loss, scale, strategy,
                                          resolve_deterministic(det), stream);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("loss_out"),
      py::arg("scale_out"), py::arg("sample_weight") = py::none(),
      py::arg("group_weights") = py::none(), py::arg("strategy") = "auto",
      py::arg("deterministic") = py::none(), py::arg("stream") = 0, py::arg("dtype") = py::none(),
      "Enqueues the loss and the gradient scales; returns the plan used.");
  m.def(
      "cuda_backward",
      [](const py::object& yt, const py::object& yp, const py::object& ids,
         const py::object& scale_in, const py::object& upstream_in, const py::object& grad_out,
         const py::object& sw, uintptr_t stream, const py::object& dtype) {
        CudaCall c(yt, yp, ids, sw, dtype);
        auto scale = device_array(scale_in, "group_scale");
        auto upstream = device_array(upstream_in, "upstream");
        auto grad = device_array(grad_out, "grad_out", true);
        if (scale.shape.size() != 1 || scale.shape[0] < 1) {
          fail("group_scale must be a non-empty vector [num_groups]");
        }
        c.check_out(scale, "group_scale", scale.shape[0]);
        if (upstream.type != c.y_true.type || upstream.size() != 1) {
          fail("upstream must be a one-element device array of y_true's dtype");
        }
        if (grad.type != c.y_true.type || grad.shape != c.y_true.shape) {
          fail("grad_out must have y_true's shape and dtype");
        }
        cuda_dispatch<CudaBackward>(c, scale.shape[0], scale, upstream, grad, stream);
      },
      py::arg("y_true"), py::arg("y_pred"), py::arg("group_ids"), py::arg("group_scale"),
      py::arg("upstream"), py::arg("grad_out"), py::arg("sample_weight") = py::none(),
      py::arg("stream") = 0, py::arg("dtype") = py::none(),
      "Enqueues grad_out = d(upstream * loss)/d y_pred.");
#endif
}
