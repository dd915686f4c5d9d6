// XLA lowering of GroupedMae, GroupedMaeStats and GroupedMaeGrad, so that the ops compile
// under tf.function(jit_compile=True) and inside Keras's XLA-compiled train step.
//
// The same formula as csrc/core, written as HLO: |y_pred - y_true| reduced over the
// non-batch axes, a scatter-add of (w * e, w) into [G] accumulators, then the finalize as
// element-wise ops and two reductions. num_groups must be a compile-time constant.
//
// XLA cannot raise on data, so (as on the GPU) an id >= num_groups or a negative/NaN
// weight makes the loss, the sums and the gradient NaN instead of dropping the row.
#include "tensorflow/compiler/tf2xla/type_util.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"
#include "xla/hlo/builder/lib/slicing.h"
#include "xla/hlo/builder/xla_builder.h"

namespace tensorflow {
namespace {

// Per-row quantities shared by all three lowerings.
struct Rows {
  xla::PrimitiveType acc;  // F32 for 16-bit inputs, F64 for float32 and float64
  int64_t n = 0, d = 1;
  xla::XlaOp ignored;  // pred[N]: id < 0
  xla::XlaOp valid;    // pred[N]: 0 <= id < G
  xla::XlaOp index;    // [N, 1]: the id where valid, else 0
  xla::XlaOp weight;   // acc[N]: the sample weight (1 when absent)
  xla::XlaOp bad;      // pred[]: some id >= G or some used weight < 0 / NaN
};

absl::Status ReadRows(XlaOpKernelContext* ctx, bool has_sample_weight, int sw_index, int64_t g,
                      xla::PrimitiveType acc, Rows* r) {
  xla::XlaBuilder* b = ctx->builder();
  const TensorShape shape = ctx->InputShape(0);
  if (shape.dims() < 1 || shape != ctx->InputShape(1)) {
    return errors::InvalidArgument("y_true and y_pred must have the same shape of rank >= 1, got ",
                                   shape.DebugString(), " and ", ctx->InputShape(1).DebugString());
  }
  const TensorShape ids_shape = ctx->InputShape(2);
  if (ids_shape.dims() != 1 || ids_shape.dim_size(0) != shape.dim_size(0)) {
    return errors::InvalidArgument("group_ids must have shape [N] = [", shape.dim_size(0),
                                   "], got ", ids_shape.DebugString());
  }
  r->acc = acc;
  r->n = shape.dim_size(0);
  r->d = 1;
  for (int i = 1; i < shape.dims(); ++i) r->d *= shape.dim_size(i);
  if (r->d == 0) {
    return errors::InvalidArgument("y_true and y_pred rows must have at least one element, got ",
                                   shape.DebugString());
  }
  xla::PrimitiveType idx_type;
  TF_RETURN_IF_ERROR(DataTypeToPrimitiveType(ctx->input_type(2), &idx_type));
  xla::XlaOp ids = ctx->Input(2);
  xla::XlaOp zero_id = xla::ConstantR0WithType(b, idx_type, 0);
  r->ignored = xla::Lt(ids, zero_id);
  xla::XlaOp out_of_range = xla::Ge(ids, xla::ConstantR0WithType(b, idx_type, g));
  r->valid = xla::Not(xla::Or(r->ignored, out_of_range));
  r->index = xla::Reshape(xla::Select(r->valid, ids, xla::Broadcast(zero_id, {r->n})), {r->n, 1});
  if (has_sample_weight) {
    if (ctx->InputShape(sw_index) != TensorShape({r->n})) {
      return errors::InvalidArgument("sample_weight must have shape [N] = [", r->n, "], got ",
                                     ctx->InputShape(sw_index).DebugString());
    }
    r->weight = xla::ConvertElementType(ctx->Input(sw_index), acc);
    xla::XlaOp bad_w =
        xla::And(xla::Not(r->ignored), xla::Not(xla::Ge(r->weight, xla::Zero(b, acc))));
    r->bad = xla::Or(xla::Any(out_of_range), xla::Any(bad_w));
  } else {
    r->weight = xla::Broadcast(xla::One(b, acc), {r->n});
    r->bad = xla::Any(out_of_range);
  }
  return absl::OkStatus();
}

xla::PrimitiveType AccType(DataType t) {
  return t == DT_FLOAT || t == DT_DOUBLE ? xla::F64 : xla::F32;
}

// S and W as acc[G], from a scatter-add over valid rows.
void Accumulate(XlaOpKernelContext* ctx, const Rows& r, int64_t g, xla::XlaOp* s, xla::XlaOp* w) {
  xla::XlaBuilder* b = ctx->builder();
  const xla::XlaOp zero = xla::Zero(b, r.acc);
  xla::XlaOp diff = xla::Abs(xla::Sub(xla::ConvertElementType(ctx->Input(1), r.acc),
                                      xla::ConvertElementType(ctx->Input(0), r.acc)));
  const int rank = ctx->InputShape(0).dims();
  xla::XlaOp e = diff;
  if (rank > 1) {
    std::vector<int64_t> dims;
    for (int i = 1; i < rank; ++i) dims.push_back(i);
    e = xla::Div(xla::Reduce(diff, zero, xla::CreateScalarAddComputation(r.acc, b), dims),
                 xla::ConstantR0WithType(b, r.acc, static_cast<double>(r.d)));
  }
  const xla::XlaOp zeros_n = xla::Broadcast(zero, {r.n});
  xla::XlaOp ws = xla::Select(r.valid, xla::Mul(r.weight, e), zeros_n);
  xla::XlaOp wv = xla::Select(r.valid, r.weight, zeros_n);

  xla::ScatterDimensionNumbers dn;
  dn.add_inserted_window_dims(0);
  dn.add_scatter_dims_to_operand_dims(0);
  dn.set_index_vector_dim(1);
  const xla::XlaComputation add = xla::CreateScalarAddComputation(r.acc, b);
  const xla::XlaOp zeros_g = xla::Broadcast(zero, {g});
  *s = xla::Scatter(zeros_g, r.index, ws, add, dn);
  *w = xla::Scatter(zeros_g, r.index, wv, add, dn);
}

xla::XlaOp Poison(xla::XlaOp bad, xla::XlaOp x, xla::PrimitiveType type,
                  absl::Span<const int64_t> dims) {
  xla::XlaOp nan = xla::NanValue(x.builder(), type);
  return xla::Select(xla::Broadcast(bad, dims), xla::Broadcast(nan, dims), x);
}

class GroupedMaeXla : public XlaOpKernel {
 public:
  explicit GroupedMaeXla(OpKernelConstruction* c) : XlaOpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("has_sample_weight", &has_sample_weight_));
    OP_REQUIRES_OK(c, c->GetAttr("has_group_weights", &has_group_weights_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    int64_t g = 0;
    OP_REQUIRES_OK(ctx, ctx->ConstantInputAsIntScalar("num_groups", &g));
    OP_REQUIRES(ctx, g > 0, errors::InvalidArgument("num_groups must be positive, got ", g));
    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType acc = AccType(ctx->input_type(0));
    Rows r;
    OP_REQUIRES_OK(ctx, ReadRows(ctx, has_sample_weight_, 4, g, acc, &r));
    xla::XlaOp s, w;
    Accumulate(ctx, r, g, &s, &w);

    const xla::XlaOp zero = xla::Zero(b, acc);
    const xla::XlaOp zeros_g = xla::Broadcast(zero, {g});
    xla::XlaOp v = xla::Broadcast(xla::One(b, acc), {g});
    xla::XlaOp bad = r.bad;
    if (has_group_weights_) {
      OP_REQUIRES(ctx, ctx->InputShape(5) == TensorShape({g}),
                  errors::InvalidArgument("group_weights must have shape [num_groups] = [", g,
                                          "], got ", ctx->InputShape(5).DebugString()));
      v = xla::ConvertElementType(ctx->Input(5), acc);
      bad = xla::Or(bad, xla::Any(xla::Not(xla::Ge(v, zeros_g))));
    }
    const xla::XlaOp present = xla::Ne(w, zeros_g);
    const xla::XlaComputation add = xla::CreateScalarAddComputation(acc, b);
    xla::XlaOp num =
        xla::ReduceAll(xla::Select(present, xla::Mul(v, xla::Div(s, w)), zeros_g), zero, add);
    xla::XlaOp vsum = xla::ReduceAll(xla::Select(present, v, zeros_g), zero, add);
    const xla::XlaOp no_weight = xla::Eq(vsum, zero);
    xla::XlaOp loss = xla::Select(no_weight, zero, xla::Div(num, vsum));
    xla::XlaOp scale = xla::Select(xla::And(present, xla::Not(xla::Broadcast(no_weight, {g}))),
                                   xla::Div(v, xla::Mul(w, xla::Broadcast(vsum, {g}))), zeros_g);
    loss = Poison(bad, loss, acc, {});
    scale = Poison(bad, scale, acc, {g});

    xla::PrimitiveType t, out;
    OP_REQUIRES_OK(ctx, DataTypeToPrimitiveType(ctx->input_type(0), &t));
    OP_REQUIRES_OK(ctx, DataTypeToPrimitiveType(ctx->expected_output_dtype(1), &out));
    ctx->SetOutput(0, xla::ConvertElementType(loss, t));
    ctx->SetOutput(1, xla::ConvertElementType(scale, out));
  }

 private:
  bool has_sample_weight_ = false;
  bool has_group_weights_ = false;
};

class GroupedMaeStatsXla : public XlaOpKernel {
 public:
  explicit GroupedMaeStatsXla(OpKernelConstruction* c) : XlaOpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("has_sample_weight", &has_sample_weight_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    int64_t g = 0;
    OP_REQUIRES_OK(ctx, ctx->ConstantInputAsIntScalar("num_groups", &g));
    OP_REQUIRES(ctx, g > 0, errors::InvalidArgument("num_groups must be positive, got ", g));
    const xla::PrimitiveType acc = AccType(ctx->input_type(0));
    Rows r;
    OP_REQUIRES_OK(ctx, ReadRows(ctx, has_sample_weight_, 4, g, acc, &r));
    xla::XlaOp s, w;
    Accumulate(ctx, r, g, &s, &w);
    xla::PrimitiveType out;
    OP_REQUIRES_OK(ctx, DataTypeToPrimitiveType(ctx->expected_output_dtype(0), &out));
    ctx->SetOutput(0, xla::ConvertElementType(Poison(r.bad, s, acc, {g}), out));
    ctx->SetOutput(1, xla::ConvertElementType(w, out));
  }

 private:
  bool has_sample_weight_ = false;
};

class GroupedMaeGradXla : public XlaOpKernel {
 public:
  explicit GroupedMaeGradXla(OpKernelConstruction* c) : XlaOpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("has_sample_weight", &has_sample_weight_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape scale_shape = ctx->InputShape(4);
    OP_REQUIRES(ctx, scale_shape.dims() == 1 && scale_shape.dim_size(0) >= 1,
                errors::InvalidArgument("group_scale must be a non-empty vector, got ",
                                        scale_shape.DebugString()));
    const int64_t g = scale_shape.dim_size(0);
    xla::PrimitiveType f, t;
    OP_REQUIRES_OK(ctx, DataTypeToPrimitiveType(ctx->input_type(4), &f));
    OP_REQUIRES_OK(ctx, DataTypeToPrimitiveType(ctx->input_type(0), &t));
    Rows r;
    OP_REQUIRES_OK(ctx, ReadRows(ctx, has_sample_weight_, 3, g, f, &r));
    xla::XlaBuilder* b = ctx->builder();
    const xla::XlaOp zero = xla::Zero(b, f);

    xla::XlaOp gathered = xla::TorchIndexSelect(ctx->Input(4), xla::Reshape(r.index, {r.n}), 0);
    xla::XlaOp upstream = xla::ConvertElementType(ctx->Input(5), f);
    xla::XlaOp factor = xla::Mul(xla::Mul(gathered, r.weight),
                                 xla::Div(upstream, xla::ConstantR0WithType(b, f, double(r.d))));
    factor = xla::Select(r.valid, factor, xla::Broadcast(zero, {r.n}));
    // Out-of-range ids poison their own rows (the forward pass poisons the loss).
    factor = xla::Select(xla::Or(r.valid, r.ignored), factor,
                         xla::Broadcast(xla::NanValue(b, f), {r.n}));

    // dim_sizes() returns by value: keep one copy so begin() and end() match.
    const auto sizes = ctx->InputShape(0).dim_sizes();
    std::vector<int64_t> dims(sizes.begin(), sizes.end());
    xla::XlaOp sign = xla::Sign(xla::Sub(xla::ConvertElementType(ctx->Input(1), f),
                                         xla::ConvertElementType(ctx->Input(0), f)));
    xla::XlaOp grad = xla::Mul(sign, xla::BroadcastInDim(factor, dims, {0}));
    grad = xla::Select(xla::BroadcastInDim(r.ignored, dims, {0}), xla::Broadcast(zero, dims), grad);
    ctx->SetOutput(0, xla::ConvertElementType(grad, t));
  }

 private:
  bool has_sample_weight_ = false;
};

REGISTER_XLA_OP(Name("GroupedMae").CompileTimeConstantInput("num_groups"), GroupedMaeXla);
REGISTER_XLA_OP(Name("GroupedMaeStats").CompileTimeConstantInput("num_groups"), GroupedMaeStatsXla);
REGISTER_XLA_OP(Name("GroupedMaeGrad"), GroupedMaeGradXla);

}  // namespace
}  // namespace tensorflow
