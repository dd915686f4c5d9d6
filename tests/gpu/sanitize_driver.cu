// Driver for compute-sanitizer (memcheck, racecheck): runs every forward strategy, the
// backward pass, bad ids and empty groups through the framework-free launchers on small
// inputs, and checks each loss against a float64 host computation. Exit code 0 = all good.
// Built by `cmake --build build --target gmae_sanitize_driver` (scripts/gpu_check.sh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/grouped_mae_cuda.h"

namespace gc = grouped_mae::cuda;

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// float64 reference loss (unweighted rows, unit group weights) and whether any id is >= g.
double reference_loss(const std::vector<float>& t, const std::vector<float>& p,
                      const std::vector<int>& ids, int g, bool* bad) {
  std::vector<double> s(g, 0.0), w(g, 0.0);
  *bad = false;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) continue;
    if (ids[i] >= g) {
      *bad = true;
      continue;
    }
    s[ids[i]] += std::fabs(static_cast<double>(p[i]) - t[i]);
    w[ids[i]] += 1.0;
  }
  double num = 0, cnt = 0;
  for (int k = 0; k < g; ++k) {
    if (w[k] != 0) num += s[k] / w[k], cnt += 1;
  }
  return cnt == 0 ? 0.0 : num / cnt;
}

int run_case(int64_t n, int g, bool sorted, bool with_bad_id, gc::Strategy strategy, bool det,
             cudaStream_t stream) {
  std::mt19937 rng(static_cast<unsigned>(n * 31 + g));
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> t(n), p(n);
  std::vector<int> ids(n);
  for (int64_t i = 0; i < n; ++i) {
    t[i] = u(rng), p[i] = u(rng);
    ids[i] =
        sorted ? static_cast<int>(i * g / std::max<int64_t>(n, 1)) : static_cast<int>(rng() % g);
    if (i % 97 == 0) ids[i] = -1;  // ignored rows
  }
  if (with_bad_id && n > 3) ids[n / 3] = g + 5;
  bool bad = false;
  const double expect = reference_loss(t, p, ids, g, &bad);

  float* dt = upload(t);
  float* dp = upload(p);
  int* di = upload(ids);
  float *dloss = nullptr, *dscale = nullptr, *dgrad = nullptr, *dup = nullptr;
  CHECK(cudaMalloc(&dloss, sizeof(float)));
  CHECK(cudaMalloc(&dscale, g * sizeof(float)));
  CHECK(cudaMalloc(&dgrad, std::max<int64_t>(n, 1) * sizeof(float)));
  float one = 1.f;
  CHECK(cudaMalloc(&dup, sizeof(float)));
  CHECK(cudaMemcpy(dup, &one, sizeof(float), cudaMemcpyHostToDevice));

  gc::ForwardArgs<float, int> a{dt, dp, di, nullptr, nullptr, n, 1, g};
  gc::ForwardPlan plan;
  CHECK(gc::plan_forward(a, strategy, det, &plan));
  void* ws = nullptr;
  CHECK(cudaMalloc(&ws, plan.workspace_bytes));
  CHECK(gc::loss(a, plan, ws, dloss, dscale, stream));
  CHECK(gc::backward(a, dscale, dup, dgrad, stream));
  // Stats through the same plan, into the scale buffer and a second one.
  float* dweights = nullptr;
  CHECK(cudaMalloc(&dweights, g * sizeof(float)));
  CHECK(gc::stats(a, plan, ws, dscale, dweights, stream));
  CHECK(cudaStreamSynchronize(stream));
  float got = 0;
  CHECK(cudaMemcpy(&got, dloss, sizeof(float), cudaMemcpyDeviceToHost));
  const bool ok = bad ? std::isnan(got) : std::fabs(got - expect) <= 1e-5 * std::max(1.0, expect);
  std::printf("%-14s n=%-7lld g=%-6d %-7s bad_id=%d blocks=%-4d loss=%.7g expect=%.7g %s\n",
              gc::strategy_name(plan.strategy), static_cast<long long>(n), g,
              sorted ? "sorted" : "random", with_bad_id ? 1 : 0, plan.blocks, got,
              bad ? NAN : expect, ok ? "ok" : "MISMATCH");
  for (void* ptr :
       {static_cast<void*>(dt), static_cast<void*>(dp), static_cast<void*>(di),
        static_cast<void*>(dloss), static_cast<void*>(dscale), static_cast<void*>(dgrad),
        static_cast<void*>(dup), ws, static_cast<void*>(dweights)}) {
    CHECK(cudaFree(ptr));
  }
  return ok ? 0 : 1;
}

// 16-bit inputs with int64 ids, D = 3 (the non-vectorised path).
int run_half_case(cudaStream_t stream) {
  const int64_t n = 777, d = 3;
  const int g = 11;
  std::vector<__half> t(n * d), p(n * d);
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n * d; ++i)
    t[i] = __float2half(0.01f * (i % 13)), p[i] = __float2half(0.02f * (i % 7));
  for (int64_t i = 0; i < n; ++i) ids[i] = (i % 5 == 0) ? -3 : (i * 7) % g;
  auto* dt = upload(t);
  auto* dp = upload(p);
  auto* di = upload(ids);
  __half* dloss = nullptr;
  float* dscale = nullptr;
  CHECK(cudaMalloc(&dloss, sizeof(__half)));
  CHECK(cudaMalloc(&dscale, g * sizeof(float)));
  gc::ForwardArgs<__half, int64_t> a{dt, dp, di, nullptr, nullptr, n, d, g};
  int failures = 0;
  for (bool det : {false, true}) {
    gc::ForwardPlan plan;
    CHECK(gc::plan_forward(a, gc::Strategy::kAuto, det, &plan));
    void* ws = nullptr;
    CHECK(cudaMalloc(&ws, plan.workspace_bytes));
    CHECK(gc::loss(a, plan, ws, dloss, dscale, stream));
    CHECK(cudaStreamSynchronize(stream));
    __half h;
    CHECK(cudaMemcpy(&h, dloss, sizeof(h), cudaMemcpyDeviceToHost));
    const float got = __half2float(h);
    std::printf("half d=3 %-14s loss=%g %s\n", gc::strategy_name(plan.strategy), got,
                std::isfinite(got) && got > 0 ? "ok" : "MISMATCH");
    failures += std::isfinite(got) && got > 0 ? 0 : 1;
    CHECK(cudaFree(ws));
  }
  CHECK(cudaFree(dt));
  CHECK(cudaFree(dp));
  CHECK(cudaFree(di));
  CHECK(cudaFree(dloss));
  CHECK(cudaFree(dscale));
  return failures;
}

int main() {
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  int failures = 0;
  const gc::Strategy strategies[] = {gc::Strategy::kSharedRuns, gc::Strategy::kGlobalRuns,
                                     gc::Strategy::kGlobalDirect, gc::Strategy::kDeterministic};
  for (gc::Strategy s : strategies) {
    const bool det = s == gc::Strategy::kDeterministic;
    for (int g : {1, 7, 300}) {
      failures += run_case(20011, g, true, false, s, det, stream);
      failures += run_case(20011, g, false, false, s, det, stream);
    }
    failures += run_case(4099, 50, false, true, s, det, stream);
    failures += run_case(0, 3, false, false, s, det, stream);
  }
  // Large G: global strategies and the deterministic one with warp rows in global memory.
  failures += run_case(30000, 5000, false, false, gc::Strategy::kGlobalRuns, false, stream);
  failures += run_case(30000, 5000, true, false, gc::Strategy::kDeterministic, true, stream);
  failures += run_half_case(stream);
  CHECK(cudaStreamDestroy(stream));
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
