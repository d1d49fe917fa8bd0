// mltrain C++ kernels. Every kernel has a pure-torch reference in mltrain/ops with the
// same semantics; tests compare them bit for bit.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace mltrain {

// pack.cpp: flat[...] = cast(scale * concat(tensors)); tensors = cast(scale * split(flat)).
int64_t pack(const std::vector<at::Tensor>& tensors, at::Tensor flat, double scale);
int64_t unpack(at::Tensor flat, const std::vector<at::Tensor>& tensors, double scale);

// transfer.cpp: depth transfer of stacked per-layer parameters [N, ...].
at::Tensor restrict_depth(const at::Tensor& fine, int64_t cf, const std::string& mode);
at::Tensor prolong_depth(const at::Tensor& coarse, int64_t cf, const std::string& mode,
                         int64_t n_fine);

// reduce.cpp: multi-buffer reductions.
void sum_buffers(at::Tensor out, const std::vector<at::Tensor>& bufs);
void axpby(at::Tensor out, double a, const at::Tensor& x, double b, const at::Tensor& y);

// residual.cpp: chains of residual steps and their vector-Jacobian products (MGRIT sweeps).
std::vector<at::Tensor> residual_sweep(at::Tensor x, const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases,
                                       const std::vector<double>& h, int64_t scale,
                                       const std::vector<at::Tensor>& adds);
std::vector<at::Tensor> residual_steps(const std::vector<at::Tensor>& xs,
                                       const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases,
                                       const std::vector<double>& h, int64_t scale);
std::vector<at::Tensor> residual_masks(const std::vector<at::Tensor>& xs,
                                       const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases);
std::vector<at::Tensor> residual_vjp_sweep(at::Tensor lam, const std::vector<at::Tensor>& masks,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<double>& h, int64_t scale,
                                           const std::vector<at::Tensor>& adds);

// Threads follow torch.set_num_threads (ranks sharing a node must not oversubscribe it);
// below this many elements a loop runs on one thread.
constexpr int64_t kParallelMin = 1 << 16;
int num_threads();

}  // namespace mltrain
