// Fused pack/unpack of a list of tensors into one flat buffer, with an optional scale.
// Used by the gradient reducer (copy mode) and the parameter broadcast. The pure-torch
// reference is mltrain/ops/pack.py; tests compare the two bit for bit.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Work is split into chunks of at most this many elements so that one large tensor is
// shared between threads as well as many small ones.
constexpr int64_t kChunk = 1 << 15;
// Below this many elements in total the threads cost more than they save.
constexpr int64_t kParallelMin = 1 << 17;

struct Piece {
  int64_t tensor;  // index into the list
  int64_t begin;   // first element within the tensor
  int64_t len;
  int64_t offset;  // first element within the flat buffer
};

std::vector<Piece> plan(const std::vector<at::Tensor>& tensors, int64_t flat_numel,
                        const at::Tensor& flat) {
  TORCH_CHECK(flat.device().is_cpu(), "pack/unpack: the flat buffer must be on the CPU");
  TORCH_CHECK(flat.is_contiguous(), "pack/unpack: the flat buffer must be contiguous");
  std::vector<Piece> pieces;
  int64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "pack/unpack: tensor ", i, " is not on the CPU");
    TORCH_CHECK(t.is_contiguous(), "pack/unpack: tensor ", i, " is not contiguous");
    TORCH_CHECK(t.scalar_type() == flat.scalar_type(), "pack/unpack: tensor ", i, " has dtype ",
                t.scalar_type(), " but the flat buffer has ", flat.scalar_type());
    const int64_t n = t.numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      pieces.push_back({static_cast<int64_t>(i), b, std::min(kChunk, n - b), offset + b});
    }
    offset += n;
  }
  TORCH_CHECK(offset <= flat_numel, "pack/unpack: tensors hold ", offset,
              " elements but the flat buffer only ", flat_numel);
  return pieces;
}

void check_scale(const at::Tensor& flat, double scale) {
  TORCH_CHECK(scale == 1.0 || at::isFloatingType(flat.scalar_type()),
              "pack/unpack: a scale other than 1 needs a floating-point dtype, not ",
              flat.scalar_type());
}

// Scaling happens in torch's "opmath" type (float for half/bfloat16), as torch.mul does,
// so kernel and reference agree bit for bit.
template <typename T>
void copy_scaled(const T* src, T* dst, int64_t n, double scale) {
  if (scale == 1.0) {
    std::copy(src, src + n, dst);
  } else {
    using acc_t = at::opmath_type<T>;
    const acc_t s = static_cast<acc_t>(scale);
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<T>(static_cast<acc_t>(src[k]) * s);
  }
}

template <typename F>
void for_pieces(const std::vector<Piece>& pieces, int64_t total, F&& body) {
  const int64_t np = static_cast<int64_t>(pieces.size());
#ifdef _OPENMP
  // Follow torch.set_num_threads so ranks that share a node do not oversubscribe it.
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel for schedule(static) num_threads(threads) if (total >= kParallelMin)
#endif
  for (int64_t k = 0; k < np; ++k) body(pieces[k]);
}

// flat[offsets] = scale * tensors, returns the number of elements written.
int64_t pack(const std::vector<at::Tensor>& tensors, at::Tensor flat, double scale) {
  auto pieces = plan(tensors, flat.numel(), flat);
  check_scale(flat, scale);
  int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, flat.scalar_type(), "pack", [&] {
    std::vector<const scalar_t*> src;
    for (const auto& t : tensors) src.push_back(t.data_ptr<scalar_t>());
    scalar_t* dst = flat.data_ptr<scalar_t>();
    for_pieces(pieces, total, [&](const Piece& p) {
      copy_scaled(src[p.tensor] + p.begin, dst + p.offset, p.len, scale);
    });
  });
  return total;
}

// tensors = scale * flat[offsets], returns the number of elements read.
int64_t unpack(at::Tensor flat, const std::vector<at::Tensor>& tensors, double scale) {
  auto pieces = plan(tensors, flat.numel(), flat);
  check_scale(flat, scale);
  int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, flat.scalar_type(), "unpack", [&] {
    std::vector<scalar_t*> dst;
    for (const auto& t : tensors) dst.push_back(t.data_ptr<scalar_t>());
    const scalar_t* src = flat.data_ptr<scalar_t>();
    for_pieces(pieces, total, [&](const Piece& p) {
      copy_scaled(src + p.offset, dst[p.tensor] + p.begin, p.len, scale);
    });
  });
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mltrain C++ kernels";
  m.def("pack", &pack, "flat[...] = scale * concat(tensors)", py::arg("tensors"),
        py::arg("flat"), py::arg("scale") = 1.0);
  m.def("unpack", &unpack, "tensors = scale * split(flat)", py::arg("flat"),
        py::arg("tensors"), py::arg("scale") = 1.0);
}
