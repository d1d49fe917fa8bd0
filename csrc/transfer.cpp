// Depth transfer of stacked per-layer parameters [N, ...] between a network of N residual
// layers and one of N / cf (multilevel training, issue 5). The semantics, pinned down so
// that the reference in mltrain/ops/transfer.py gives the same bits:
//
//   injection        coarse[i] = fine[i*cf]
//   full_weighting   coarse[i] = sum_k w_k fine[i*cf + k] / sum_k w_k, k = -(cf-1)..cf-1,
//                    w_k = cf - |k|, over the k that fall inside [0, N) (cf = 2: 1/4 1/2 1/4)
//   constant         fine[j] = coarse[j / cf]
//   linear           fine[j] = (1 - t) coarse[i] + t coarse[i+1], i = min(j / cf, Nc - 2),
//                    t = (j - i*cf) / cf  (linear extrapolation past the last coarse layer)
//
// Sums run in ascending k in the "opmath" type (float for half/bfloat16), weights are
// formed in double and rounded to it, and each result is rounded once.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>

#include "kernels.h"

namespace mltrain {
namespace {

constexpr int64_t kCols = 1 << 14;  // columns per task

// Runs body(row, col_begin, col_end) over rows x column chunks, in parallel when large.
template <typename F>
void rows_by_chunks(int64_t rows, int64_t cols, F&& body) {
  const int64_t chunks = std::max<int64_t>(1, (cols + kCols - 1) / kCols);
  const int64_t tasks = rows * chunks;
  const int64_t grain = rows * cols >= kParallelMin ? 1 : tasks + 1;
  at::parallel_for(0, tasks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t r = t / chunks, c0 = (t % chunks) * kCols;
      body(r, c0, std::min(cols, c0 + kCols));
    }
  });
}

void check_input(const at::Tensor& x, int64_t cf, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), what, ": needs a contiguous CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, what, ": needs stacked layers [N, ...]");
  TORCH_CHECK(cf >= 1, what, ": the coarsening factor must be at least 1, got ", cf);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), what, ": needs a floating-point tensor");
}

}  // namespace

at::Tensor restrict_depth(const at::Tensor& fine, int64_t cf, const std::string& mode) {
  check_input(fine, cf, "restrict");
  const int64_t n = fine.size(0);
  TORCH_CHECK(n % cf == 0, "restrict: ", n, " layers are not divisible by cf = ", cf);
  TORCH_CHECK(mode == "injection" || mode == "full_weighting",
              "restrict: mode must be 'injection' or 'full_weighting', not '", mode, "'");
  const int64_t nc = n / cf, m = fine.numel() / n;
  auto sizes = fine.sizes().vec();
  sizes[0] = nc;
  at::Tensor coarse = at::empty(sizes, fine.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fine.scalar_type(), "restrict", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = fine.data_ptr<scalar_t>();
    scalar_t* dst = coarse.data_ptr<scalar_t>();
    const bool inject = mode == "injection";
    rows_by_chunks(nc, m, [&](int64_t i, int64_t c0, int64_t c1) {
      scalar_t* out = dst + i * m;
      if (inject) {
        std::copy(src + i * cf * m + c0, src + i * cf * m + c1, out + c0);
        return;
      }
      const int64_t k0 = std::max<int64_t>(-(cf - 1), -i * cf);
      const int64_t k1 = std::min<int64_t>(cf - 1, n - 1 - i * cf);
      int64_t wsum = 0;
      for (int64_t k = k0; k <= k1; ++k) wsum += cf - std::abs(k);
      const acc_t inv = static_cast<acc_t>(static_cast<double>(wsum));
      for (int64_t c = c0; c < c1; ++c) {
        acc_t acc = 0;
        for (int64_t k = k0; k <= k1; ++k) {
          const acc_t w = static_cast<acc_t>(static_cast<double>(cf - std::abs(k)));
          acc += w * static_cast<acc_t>(src[(i * cf + k) * m + c]);
        }
        out[c] = static_cast<scalar_t>(acc / inv);
      }
    });
  });
  return coarse;
}

at::Tensor prolong_depth(const at::Tensor& coarse, int64_t cf, const std::string& mode,
                         int64_t n_fine) {
  check_input(coarse, cf, "prolong");
  const int64_t nc = coarse.size(0), m = coarse.numel() / nc;
  const int64_t n = n_fine > 0 ? n_fine : nc * cf;
  TORCH_CHECK(n == nc * cf, "prolong: ", nc, " coarse layers x cf = ", cf, " is not ", n);
  TORCH_CHECK(mode == "constant" || mode == "linear",
              "prolong: mode must be 'constant' or 'linear', not '", mode, "'");
  auto sizes = coarse.sizes().vec();
  sizes[0] = n;
  at::Tensor fine = at::empty(sizes, coarse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, coarse.scalar_type(), "prolong", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = coarse.data_ptr<scalar_t>();
    scalar_t* dst = fine.data_ptr<scalar_t>();
    const bool constant = mode == "constant" || nc == 1;
    rows_by_chunks(n, m, [&](int64_t j, int64_t c0, int64_t c1) {
      scalar_t* out = dst + j * m;
      if (constant) {
        const scalar_t* in = src + (j / cf) * m;
        std::copy(in + c0, in + c1, out + c0);
        return;
      }
      const int64_t i = std::min<int64_t>(j / cf, nc - 2);
      const double t = static_cast<double>(j - i * cf) / static_cast<double>(cf);
      const acc_t a = static_cast<acc_t>(1.0 - t), b = static_cast<acc_t>(t);
      const scalar_t* left = src + i * m;
      const scalar_t* right = src + (i + 1) * m;
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t l = a * static_cast<acc_t>(left[c]);
        const acc_t r = b * static_cast<acc_t>(right[c]);
        out[c] = static_cast<scalar_t>(l + r);
      }
    });
  });
  return fine;
}

}  // namespace mltrain
