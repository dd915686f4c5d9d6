// Per-row cost of each CPU forward path (csrc/cpu/grouped_mae_cpu.h), with 4096 rows in L1/L2
// so that memory does not hide it: `accumulate` over one block pattern at a time, best of 200
// repetitions, in CPU cycles at the nominal clock given as the first argument (GHz, default
// 2.45). Not part of the build; compile by hand:
//   g++ -O3 -std=c++17 -Icsrc benchmarks/path_bench.cc -o /tmp/path_bench && /tmp/path_bench
// (the README's figures are of this SSE2 build; add -mavx -mpopcnt for the library's flags)
// Patterns: sorted ids in runs of 1M (one id per block), 168, 40, 10 and 4 rows; uniform ids
// over 1000 groups (the scatter).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/grouped_mae_cpu.h"

namespace gm = grouped_mae;

// One call of `accumulate`, kept out of line as it is in the library (inlined into main's
// timing loop, its scatter loop spilled pointers to the stack and ran twice as slowly).
__attribute__((noinline)) static void accumulate_block(const gm::cpu::Inputs<float, int32_t>& in,
                                                       double* p0) {
  gm::cpu::accumulate(in, 0, in.n, &p0, 1);
}

int main(int argc, char** argv) {
  const double ghz = argc > 1 ? atof(argv[1]) : 2.45;
  const int64_t m = 4096, g = 100000;
  std::vector<float> t(m), p(m);
  for (int64_t i = 0; i < m; ++i) t[i] = i * 0.37f, p[i] = (i % 7) * 0.11f;
  std::vector<double> part(2 * g, 0.0);
  std::mt19937 rng(3);
  std::uniform_int_distribution<int32_t> ud(0, 999);
  for (int64_t run : {1000000, 168, 40, 10, 4, 0}) {
    std::vector<int32_t> ids(m);
    for (int64_t i = 0; i < m; ++i) ids[i] = run == 0 ? ud(rng) : int32_t(500 + i / run);
    gm::cpu::Inputs<float, int32_t> in{t.data(), p.data(), ids.data(), nullptr, m, 1, g};
    double best = 1e30;
    for (int r = 0; r < 200; ++r) {
      const auto a = std::chrono::steady_clock::now();
      for (int it = 0; it < 200; ++it) {
        accumulate_block(in, part.data());
      }
      const std::chrono::duration<double, std::nano> d = std::chrono::steady_clock::now() - a;
      best = std::min(best, d.count() / (200.0 * m));
    }
    if (run == 0) {
      printf("uniform ids (G = 1000): %.2f cycles/row\n", best * ghz);
    } else {
      printf("sorted ids, runs of %7lld: %.2f cycles/row\n", static_cast<long long>(run),
             best * ghz);
    }
  }
  return part[1001] < 0;  // keeps the updates
}
