// Framework-free timing of the CPU kernels (csrc/cpu/grouped_mae_cpu.h), for tuning them
// without TensorFlow's per-op overhead. Not part of the build; compile by hand:
//   g++ -O3 -std=c++17 -pthread -mavx -mpopcnt -Icsrc benchmarks/kernel_bench.cc -o kb
//   ./kb [N] [threads] [G]
// (-mavx -mpopcnt as the op library is built on x86-64; without them, the SSE2 baseline.)
// Prints median milliseconds for: one streaming read of (y_true, y_pred, ids), the forward
// statistics + finalize, the backward, for G in {1, 10, 1000, 100000} x {sorted, uniform} ids.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "cpu/grouped_mae_cpu.h"

// A variant header with another accumulator type can be timed with -DACC_T=float.
#ifndef ACC_T
#define ACC_T double
#endif

namespace gm = grouped_mae;

static void run_threads(int64_t n, const std::function<void(int64_t)>& fn) {
  std::vector<std::thread> ts;
  for (int64_t s = 1; s < n; ++s) ts.emplace_back(fn, s);
  fn(0);
  for (auto& t : ts) t.join();
}

template <typename F>
static double median_ms(F&& f, int reps) {
  // KB_CPU=1: process CPU time instead of wall time (less sensitive to a busy machine when
  // threads = 1). KB_MIN=1: the minimum instead of the median. KB_REPS=k: k repetitions.
  const bool cpu = getenv("KB_CPU") != nullptr;
  auto now = [cpu] {
    timespec ts;
    clock_gettime(cpu ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  };
  std::vector<double> v;
  for (int r = 0; r < reps; ++r) {
    const double a = now();
    f();
    v.push_back(now() - a);
  }
  std::sort(v.begin(), v.end());
  return getenv("KB_MIN") ? v[0] : v[v.size() / 2];
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? atoll(argv[1]) : (1 << 24);
  const int64_t threads = argc > 2 ? atoll(argv[2]) : 2;
  const int reps = getenv("KB_REPS") ? atoi(getenv("KB_REPS")) : (n >= (1 << 22) ? 9 : 51);
  std::vector<float> t(n), p(n), out(n);
  std::vector<int32_t> ids(n);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < n; ++i) t[i] = nd(rng), p[i] = nd(rng);
  volatile double sink = 0;
  double floor_ms = median_ms(
      [&] {
        std::vector<double> part(threads);
        run_threads(threads, [&](int64_t s) {
          int64_t b = n * s / threads, e = n * (s + 1) / threads;
          // Integer adds of the bit patterns: vectorisable, so this is memory-bound.
          const uint32_t* tb = reinterpret_cast<const uint32_t*>(t.data());
          const uint32_t* pb = reinterpret_cast<const uint32_t*>(p.data());
          uint32_t c = 0;
          for (int64_t i = b; i < e; ++i) c += tb[i] + pb[i] + uint32_t(ids[i]);
          part[s] = c;
        });
        sink = part[0];
      },
      reps);
  printf("N=%lld threads=%lld floor(read 12 B/row)=%.3f ms\n", (long long)n, (long long)threads,
         floor_ms);
  // Exact mean |p - t| for the one-group accuracy check.
  long double exact = 0;
  for (int64_t i = 0; i < n; ++i) exact += std::fabs(double(p[i]) - double(t[i]));
  exact /= n;
  std::vector<int64_t> groups = {1, 10, 1000, 100000};
  if (argc > 3) groups = {atoll(argv[3])};  // one G only
  for (int64_t g : groups) {
    for (int sorted = 1; sorted >= 0; --sorted) {
      std::uniform_int_distribution<int32_t> ud(0, g - 1);
      for (int64_t i = 0; i < n; ++i) ids[i] = sorted ? int32_t(i * g / n) : ud(rng);
      gm::cpu::Inputs<float, int32_t> in{t.data(), p.data(), ids.data(), nullptr, n, 1, g};
      const int64_t shards = gm::cpu::forward_shards(n, g, threads);
      std::vector<ACC_T> acc(2 * g + gm::cpu::forward_scratch_doubles(g, shards));
      std::vector<float> scale(g);
      double loss = 0;
      double fwd = median_ms(
          [&] {
            gm::cpu::Touched touched;
            auto err =
                gm::cpu::stats(in, shards, acc.data(), acc.data() + 2 * g, run_threads, &touched);
            if (err.kind != gm::BadInput::kNone) abort();
            loss = gm::cpu::finalize<float>(acc.data(), touched, nullptr, g, scale.data(), threads,
                                            run_threads);
          },
          reps);
      const int64_t bshards = gm::cpu::backward_shards(n, threads);
      double bwd = median_ms(
          [&] {
            run_threads(bshards, [&](int64_t s) {
              gm::cpu::backward(in, scale.data(), 1.0f, n * s / bshards, n * (s + 1) / bshards,
                                out.data());
            });
          },
          reps);
      printf("G=%-7lld %-8s fwd %8.3f ms  bwd %8.3f ms  sum/floor %.2f  loss %.9f", (long long)g,
             sorted ? "sorted" : "uniform", fwd, bwd, (fwd + bwd) / floor_ms, loss);
      if (g == 1) printf("  rel err vs exact %.2e", double(std::fabs(loss - exact) / exact));
      printf("\n");
    }
  }
  return sink == 12345.0;
}
