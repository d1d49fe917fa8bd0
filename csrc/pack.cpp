// Fused pack/unpack of a list of tensors into one flat buffer, with an optional scale and
// dtype conversion (float32 <-> bfloat16 / float16, or any floating pair). Used by the
// gradient reducer (copy mode), parameter broadcasts and the synchronization schemes. The
// pure-torch reference is mltrain/ops/pack.py; tests compare the two bit for bit.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace mltrain {
namespace {

// Work is split into chunks of at most this many elements so that one large tensor is
// shared between threads as well as many small ones.
constexpr int64_t kChunk = 1 << 15;

struct Piece {
  int64_t tensor;  // index into the list
  int64_t begin;   // first element within the tensor
  int64_t len;
  int64_t offset;  // first element within the flat buffer
};

std::vector<Piece> plan(const std::vector<at::Tensor>& tensors, const at::Tensor& flat,
                        int64_t* total) {
  TORCH_CHECK(flat.device().is_cpu(), "pack/unpack: the flat buffer must be on the CPU");
  TORCH_CHECK(flat.is_contiguous(), "pack/unpack: the flat buffer must be contiguous");
  std::vector<Piece> pieces;
  int64_t offset = 0;
  const auto st = tensors.empty() ? flat.scalar_type() : tensors[0].scalar_type();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "pack/unpack: tensor ", i, " is not on the CPU");
    TORCH_CHECK(t.is_contiguous(), "pack/unpack: tensor ", i, " is not contiguous");
    TORCH_CHECK(t.scalar_type() == st, "pack/unpack: tensor ", i, " has dtype ",
                t.scalar_type(), " but tensor 0 has ", st);
    const int64_t n = t.numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      pieces.push_back({static_cast<int64_t>(i), b, std::min(kChunk, n - b), offset + b});
    }
    offset += n;
  }
  TORCH_CHECK(offset <= flat.numel(), "pack/unpack: tensors hold ", offset,
              " elements but the flat buffer only ", flat.numel());
  *total = offset;
  return pieces;
}

void check_types(at::ScalarType src, at::ScalarType dst, double scale) {
  const bool fs = at::isFloatingType(src), fd = at::isFloatingType(dst);
  TORCH_CHECK(src == dst || (fs && fd), "pack/unpack: dtype conversion only between "
              "floating-point types, not ", src, " -> ", dst);
  TORCH_CHECK(scale == 1.0 || fs, "pack/unpack: a scale other than 1 needs a floating-point "
              "dtype, not ", src);
}

// dst = cast(src * scale). The product is formed in the wider of the two types' "opmath"
// (float for half/bfloat16, double if either side is double) and rounded once, as the
// reference (src.to(acc) * scale).to(dst) does.
template <typename S, typename D>
void convert(const S* src, D* dst, int64_t n, double scale) {
  if constexpr (std::is_same_v<S, D>) {
    if (scale == 1.0) {
      std::copy(src, src + n, dst);
      return;
    }
  }
  using acc_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<D, double>,
                                   double, float>;
  if constexpr (std::is_floating_point_v<S> || std::is_same_v<S, at::Half> ||
                std::is_same_v<S, at::BFloat16>) {
    const acc_t s = static_cast<acc_t>(scale);
    if (scale == 1.0) {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(static_cast<acc_t>(src[k]));
    } else {
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(static_cast<acc_t>(src[k]) * s);
    }
  } else {  // integers and bool: plain copies (check_types allows no conversion)
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(src[k]);
  }
}

template <typename F>
void for_pieces(const std::vector<Piece>& pieces, int64_t total, F&& body) {
  const int64_t np = static_cast<int64_t>(pieces.size());
  const int64_t grain = total >= kParallelMin ? 1 : np + 1;
  at::parallel_for(0, np, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) body(pieces[k]);
  });
}

#define MLTRAIN_DISPATCH_ALL(TYPE, NAME, ...) \
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, TYPE, NAME, __VA_ARGS__)

}  // namespace

int num_threads() { return std::max(1, at::get_num_threads()); }

int64_t pack(const std::vector<at::Tensor>& tensors, at::Tensor flat, double scale) {
  int64_t total = 0;
  auto pieces = plan(tensors, flat, &total);
  if (tensors.empty()) return 0;
  const auto st = tensors[0].scalar_type(), dt = flat.scalar_type();
  check_types(st, dt, scale);
  MLTRAIN_DISPATCH_ALL(st, "pack_src", [&] {
    using S = scalar_t;
    std::vector<const S*> src;
    for (const auto& t : tensors) src.push_back(t.data_ptr<S>());
    MLTRAIN_DISPATCH_ALL(dt, "pack_dst", [&] {
      scalar_t* dst = flat.data_ptr<scalar_t>();
      for_pieces(pieces, total, [&](const Piece& p) {
        convert<S, scalar_t>(src[p.tensor] + p.begin, dst + p.offset, p.len, scale);
      });
    });
  });
  return total;
}

int64_t unpack(at::Tensor flat, const std::vector<at::Tensor>& tensors, double scale) {
  int64_t total = 0;
  auto pieces = plan(tensors, flat, &total);
  if (tensors.empty()) return 0;
  const auto st = flat.scalar_type(), dt = tensors[0].scalar_type();
  check_types(st, dt, scale);
  MLTRAIN_DISPATCH_ALL(st, "unpack_src", [&] {
    using S = scalar_t;
    const S* src = flat.data_ptr<S>();
    MLTRAIN_DISPATCH_ALL(dt, "unpack_dst", [&] {
      std::vector<scalar_t*> dst;
      for (const auto& t : tensors) dst.push_back(t.data_ptr<scalar_t>());
      for_pieces(pieces, total, [&](const Piece& p) {
        convert<S, scalar_t>(src + p.offset, dst[p.tensor] + p.begin, p.len, scale);
      });
    });
  });
  return total;
}

}  // namespace mltrain
