// Multi-buffer reductions: the sum of k buffers into one, and a*x + b*y (push-sum mixing).
// Both accumulate in the "opmath" type (float for half/bfloat16) and round once; the
// references in mltrain/ops/reduce.py do the same, so the results agree bit for bit.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"

namespace mltrain {
namespace {

void check_same(const at::Tensor& out, const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), what, ": buffer ", i,
              " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == out.scalar_type(), what, ": buffer ", i, " has dtype ",
              t.scalar_type(), ", the output ", out.scalar_type());
  TORCH_CHECK(t.numel() == out.numel(), what, ": buffer ", i, " has ", t.numel(),
              " elements, the output ", out.numel());
}

}  // namespace

void sum_buffers(at::Tensor out, const std::vector<at::Tensor>& bufs) {
  TORCH_CHECK(!bufs.empty(), "sum_buffers: needs at least one buffer");
  check_same(out, out, "sum_buffers", 0);
  for (size_t i = 0; i < bufs.size(); ++i) check_same(out, bufs[i], "sum_buffers", i);
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    for (const auto& b : bufs) src.push_back(b.data_ptr<scalar_t>());
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t grain = n >= kParallelMin ? 1 << 14 : n + 1;
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      // Blocks keep the accumulator in cache and let each inner loop vectorize.
      constexpr int64_t kBlock = 1024;
      acc_t acc[kBlock];
      for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
        const int64_t len = std::min(kBlock, hi - b0);
        for (int64_t e = 0; e < len; ++e) acc[e] = static_cast<acc_t>(src[0][b0 + e]);
        for (size_t k = 1; k < src.size(); ++k) {
          const scalar_t* s = src[k] + b0;
          for (int64_t e = 0; e < len; ++e) acc[e] += static_cast<acc_t>(s[e]);
        }
        for (int64_t e = 0; e < len; ++e) dst[b0 + e] = static_cast<scalar_t>(acc[e]);
      }
    });
  });
}

void axpby(at::Tensor out, double a, const at::Tensor& x, double b, const at::Tensor& y) {
  check_same(out, out, "axpby", 0);
  check_same(out, x, "axpby", 1);
  check_same(out, y, "axpby", 2);
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "axpby", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t ca = static_cast<acc_t>(a), cb = static_cast<acc_t>(b);
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* py = y.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t grain = n >= kParallelMin ? 1 << 14 : n + 1;
    at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        const acc_t l = static_cast<acc_t>(px[e]) * ca;
        const acc_t r = static_cast<acc_t>(py[e]) * cb;
        dst[e] = static_cast<scalar_t>(l + r);
      }
    });
  });
}

}  // namespace mltrain
