// Op interfaces: names, inputs, attributes and shape functions. Kernels live in kernels.cc,
// the XLA lowering in xla.cc.
//
// Optional inputs (sample_weight, group_weights) are always wired; `has_*` attributes say
// whether they carry data (the Python wrapper passes an empty tensor otherwise).
// Tout is the statistics type: float for half, bfloat16 and float inputs, double for double.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Shared checks: y_true and y_pred agree and have rank >= 1; group_ids is [N];
// sample_weight is [N] when present. Returns N in *n and the group count dim in *g.
absl::Status CheckRows(InferenceContext* c, bool with_num_groups, DimensionHandle* n,
                       DimensionHandle* g) {
  ShapeHandle y_true, y_pred, ids, merged;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &y_true));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(1), 1, &y_pred));
  TF_RETURN_IF_ERROR(c->Merge(y_true, y_pred, &merged));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &ids));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(merged, 0), c->Dim(ids, 0), n));
  if (with_num_groups) {
    ShapeHandle scalar;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scalar));
    TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(3, g));
  }
  return absl::OkStatus();
}

absl::Status CheckSampleWeight(InferenceContext* c, int index, DimensionHandle n) {
  bool has = false;
  TF_RETURN_IF_ERROR(c->GetAttr("has_sample_weight", &has));
  if (!has) return absl::OkStatus();
  ShapeHandle sw;
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(index), 1, &sw));
  return c->Merge(c->Dim(sw, 0), n, &unused);
}

}  // namespace

REGISTER_OP("GroupedMae")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("group_ids: Tidx")
    .Input("num_groups: Tnum")
    .Input("sample_weight: T")
    .Input("group_weights: T")
    .Output("loss: T")
    .Output("group_scale: Tout")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {float, double}")
    .Attr("Tidx: {int32, int64}")
    .Attr("Tnum: {int32, int64} = DT_INT32")
    .Attr("has_sample_weight: bool = false")
    .Attr("has_group_weights: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle n, g;
      TF_RETURN_IF_ERROR(CheckRows(c, true, &n, &g));
      TF_RETURN_IF_ERROR(CheckSampleWeight(c, 4, n));
      bool has_gw = false;
      TF_RETURN_IF_ERROR(c->GetAttr("has_group_weights", &has_gw));
      if (has_gw) {
        ShapeHandle gw;
        DimensionHandle unused;
        TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 1, &gw));
        TF_RETURN_IF_ERROR(c->Merge(c->Dim(gw, 0), g, &unused));
      }
      c->set_output(0, c->Scalar());
      c->set_output(1, c->Vector(g));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Grouped mean absolute error: the mean over present groups (weighted by group_weights) of
each group's weighted mean absolute error. group_scale is the per-group gradient scale
v_g / (W_g * sum v) that GroupedMaeGrad consumes.
)doc");

REGISTER_OP("GroupedMaeStats")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("group_ids: Tidx")
    .Input("num_groups: Tnum")
    .Input("sample_weight: T")
    .Output("sums: Tout")
    .Output("weights: Tout")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {float, double}")
    .Attr("Tidx: {int32, int64}")
    .Attr("Tnum: {int32, int64} = DT_INT32")
    .Attr("has_sample_weight: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle n, g;
      TF_RETURN_IF_ERROR(CheckRows(c, true, &n, &g));
      TF_RETURN_IF_ERROR(CheckSampleWeight(c, 4, n));
      c->set_output(0, c->Vector(g));
      c->set_output(1, c->Vector(g));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Per-group sums S_g = sum w_i * e_i and weights W_g = sum w_i, where e_i is the mean absolute
error of row i over its non-batch elements.
)doc");

REGISTER_OP("GroupedMaeGrad")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("group_ids: Tidx")
    .Input("sample_weight: T")
    .Input("group_scale: Tout")
    .Input("upstream: T")
    .Output("grad_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tout: {float, double}")
    .Attr("Tidx: {int32, int64}")
    .Attr("has_sample_weight: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle n, g;
      TF_RETURN_IF_ERROR(CheckRows(c, false, &n, &g));
      TF_RETURN_IF_ERROR(CheckSampleWeight(c, 3, n));
      ShapeHandle scale, upstream;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &scale));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 0, &upstream));
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
d/dy_pred of sum_g group_scale[g] * S_g, times upstream: for row i of group g,
upstream * group_scale[g] * w_i / D * sign(y_pred - y_true); 0 for rows with a negative id.
)doc");

}  // namespace tensorflow

#include "build_info.h"
// "GMAE_BUILD_INFO{...}" is found by grouped_mae_op/_loader.py without loading the library.
extern "C" __attribute__((used, visibility("default"))) const char grouped_mae_build_info[] =
    "GMAE_BUILD_INFO" GMAE_BUILD_INFO;
