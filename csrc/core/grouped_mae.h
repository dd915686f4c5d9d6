// The grouped-MAE math, once, for every device.
//
//   e_i   = mean_j |y_pred[i, j] - y_true[i, j]|        (j over the D non-batch elements)
//   S_g   = sum_{i in g} w_i * e_i,   W_g = sum_{i in g} w_i
//   g is present when W_g != 0 (a NaN weight sum counts as present, so NaN reaches the loss)
//   loss  = sum_{present g} v_g * S_g / W_g  /  sum_{present g} v_g    (0 when that sum is 0)
//   dloss/dy_pred[i, j] = sign(y_pred - y_true) * w_i * v_g / (D * W_g * sum v)
//
// Everything here is a small inline function usable from host code and CUDA device code.
// The CPU (csrc/cpu) and CUDA (csrc/cuda) implementations only decide how rows are split
// across threads and how partial sums are combined; the arithmetic is these functions.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GMAE_HD __host__ __device__ __forceinline__
#else
#define GMAE_HD inline
#endif

namespace grouped_mae {

// Type in which per-group statistics and gradient scales are returned: float32 for
// 16-bit and float32 inputs, float64 for float64. (Accumulation may be wider, see the
// device files.)
template <typename T>
struct OutType {
  using type = float;
};
template <>
struct OutType<double> {
  using type = double;
};

// Widening load: every supported element type (Eigen::half, __half, bfloat16 variants,
// float) converts to float exactly; double stays double.
template <typename T>
GMAE_HD float widen(const T& x) {
  return static_cast<float>(x);
}
GMAE_HD double widen(const double& x) { return x; }

// Mean absolute error of one row of D elements, accumulated in Acc.
template <typename Acc, typename T>
GMAE_HD Acc row_error(const T* y_true, const T* y_pred, int64_t row, int64_t D) {
  const T* t = y_true + row * D;
  const T* p = y_pred + row * D;
  if (D == 1) return static_cast<Acc>(fabs(widen(p[0]) - widen(t[0])));
  Acc s = 0;
  for (int64_t j = 0; j < D; ++j) s += static_cast<Acc>(fabs(widen(p[j]) - widen(t[j])));
  return s / static_cast<Acc>(D);
}

// A sample weight is valid when >= 0; NaN is rejected too (the comparison is false).
template <typename F>
GMAE_HD bool valid_weight(F w) {
  return w >= F(0);
}

// Group g is present when its weight sum is not zero.
template <typename Acc>
GMAE_HD bool present(Acc weight_sum) {
  return !(weight_sum == Acc(0));
}

// Contribution of one group to the loss numerator and to the sum of group weights.
template <typename Acc>
GMAE_HD void add_group_term(Acc sum, Acc weight_sum, Acc group_weight, Acc* numerator,
                            Acc* group_weight_sum) {
  if (present(weight_sum)) {
    *numerator += group_weight * (sum / weight_sum);
    *group_weight_sum += group_weight;
  }
}

template <typename Acc>
GMAE_HD Acc finalize_loss(Acc numerator, Acc group_weight_sum) {
  return group_weight_sum == Acc(0) ? Acc(0) : numerator / group_weight_sum;
}

// d loss / d e_i for a row of group g, before the row's own weight and 1/D:
// v_g / (W_g * sum v), and 0 for an absent group or a zero total group weight.
template <typename Acc>
GMAE_HD Acc group_grad_scale(Acc weight_sum, Acc group_weight, Acc group_weight_sum) {
  if (!present(weight_sum) || group_weight_sum == Acc(0)) return Acc(0);
  return group_weight / (weight_sum * group_weight_sum);
}

// Derivative of |x| with tf.abs's convention: sign(0) = 0, and NaN stays NaN.
// Written as a select rather than a branch so that CPU loops over it vectorise.
template <typename F>
GMAE_HD F abs_grad(F x) {
  const F sign = F(x > F(0)) - F(x < F(0));
  return x != x ? x : sign;
}

// Gradient of one element: upstream * group scale * row weight / D * sign(pred - true).
// row_factor = upstream * scale[g] * w_i / D is computed once per row by the caller.
template <typename F, typename T>
GMAE_HD F element_grad(const T& y_true, const T& y_pred, F row_factor) {
  return abs_grad(static_cast<F>(widen(y_pred) - widen(y_true))) * row_factor;
}

// Why an input was rejected; the bindings turn it into their own error type.
enum class BadInput : int32_t { kNone = 0, kGroupId = 1, kSampleWeight = 2, kGroupWeight = 3 };

}  // namespace grouped_mae
