// Chains of residual steps x + s (x + h relu(W x + b) - x) and their vector-Jacobian
// products, for MGRIT's relaxation sweeps: one call per sweep instead of a Python call per
// step (at these sizes the interpreter costs as much as the arithmetic). Each step is the
// same sequence of ATen operations as ResidualBlock.mgrit_step / mgrit_vjp, so the results
// are bitwise those of the references in mltrain/ops/residual.py.
#include "kernels.h"

namespace mltrain {
namespace {

void check_lists(size_t n, size_t b, size_t h, size_t adds, const char* what) {
  TORCH_CHECK(b == n && h == n, what, ": ", n, " weights, ", b, " biases, ", h,
              " step sizes");
  TORCH_CHECK(adds == 0 || adds == n, what, ": ", adds, " additive terms for ", n, " steps");
}

}  // namespace

std::vector<at::Tensor> residual_sweep(at::Tensor x, const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases,
                                       const std::vector<double>& h, int64_t scale,
                                       const std::vector<at::Tensor>& adds) {
  check_lists(weights.size(), biases.size(), h.size(), adds.size(), "residual_sweep");
  std::vector<at::Tensor> out;
  out.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor y = at::addmm(biases[i], x, weights[i].t()).relu_().mul_(h[i]);
    y.add_(x);
    if (scale != 1) y.sub_(x).mul_(scale).add_(x);
    if (!adds.empty()) y.add_(adds[i]);
    out.push_back(y);
    x = y;
  }
  return out;
}

std::vector<at::Tensor> residual_steps(const std::vector<at::Tensor>& xs,
                                       const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases,
                                       const std::vector<double>& h, int64_t scale) {
  TORCH_CHECK(xs.size() == weights.size(), "residual_steps: ", xs.size(), " states, ",
              weights.size(), " weights");
  check_lists(weights.size(), biases.size(), h.size(), 0, "residual_steps");
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    at::Tensor y = at::addmm(biases[i], x, weights[i].t()).relu_().mul_(h[i]);
    y.add_(x);
    if (scale != 1) y.sub_(x).mul_(scale).add_(x);
    out.push_back(y);
  }
  return out;
}

std::vector<at::Tensor> residual_masks(const std::vector<at::Tensor>& xs,
                                       const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases) {
  TORCH_CHECK(xs.size() == weights.size() && biases.size() == weights.size(),
              "residual_masks: ", xs.size(), " states, ", weights.size(), " weights, ",
              biases.size(), " biases");
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i)
    out.push_back(at::addmm(biases[i], xs[i], weights[i].t()).gt(0));
  return out;
}

std::vector<at::Tensor> residual_vjp_sweep(at::Tensor lam, const std::vector<at::Tensor>& masks,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<double>& h, int64_t scale,
                                           const std::vector<at::Tensor>& adds) {
  check_lists(weights.size(), masks.size(), h.size(), adds.size(), "residual_vjp_sweep");
  std::vector<at::Tensor> out;
  out.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor y = at::addmm(lam, lam * masks[i], weights[i], 1, h[i] * scale);
    if (!adds.empty()) y.add_(adds[i]);
    out.push_back(y);
    lam = y;
  }
  return out;
}

}  // namespace mltrain
