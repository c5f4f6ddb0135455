// Full bilinear pooling (torch.nn.functional.bilinear semantics), tiled so that no B x dx x dy or
// B x o x dy tensor is ever allocated, and factorized (MFB/MLB) pooling's fused elementwise pass.
//
// out[b, o] = sum_ij x[b, i] W[o, i, j] y[b, j] is computed one block of input1 features at a time:
// Z = x[:, i-block] (outer) y is a [rows, ib * dy] tile, and out += Z @ W[:, i-block, :]^T. The backward
// pass reuses the same tiles: grad_W[:, i-block, :] = grad^T @ Z, and U = grad @ W[:, i-block, :] gives
// grad_x (U contracted with y) and grad_y (U contracted with x). The device-specific part is only that
// contraction (hand-written loops on the CPU, batched GEMV on the GPU) and the tile size.
#pragma once
#include "common/constants.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

namespace xmodal {

struct BilinearArgs {
  at::Tensor x, y;  // [B, dx], [B, dy], contiguous
  at::Tensor weight;  // [o, dx, dy], contiguous
  std::vector<int64_t> batch_shape;  // leading dims of input1/input2
};

// Validates (names the argument and what was given) and flattens the leading batch dimensions.
BilinearArgs prepare_bilinear_args(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight);
void check_bilinear_bias(const at::Tensor& bias, const at::Tensor& weight);

struct BilinearDevice {
  // grad_x_blk[b, ii] = sum_j U[b, ii, j] y[b, j] (when defined); grad_y[b, j] += sum_ii U[b, ii, j] x_blk[b, ii]
  // (when defined). U: [rows, ib, dy] in the accumulation dtype; the rest in the accumulation dtype too.
  std::function<void(const at::Tensor& U, const at::Tensor& x_blk, const at::Tensor& y, at::Tensor grad_x_blk,
                     at::Tensor grad_y)>
      contract;
  int64_t tile_elems;  // target size of one Z tile in elements
  int64_t max_rows;  // most batch rows per tile
};

// Core loops; inputs already validated. x, y, weight in the compute dtype (16-bit allowed on the GPU:
// GEMMs then produce `acc` outputs). Results are in the accumulation dtype `acc`.
at::Tensor bilinear_forward_tiled(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                                  at::ScalarType acc, const BilinearDevice& dev);
std::array<at::Tensor, 3> bilinear_backward_tiled(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                  const at::Tensor& weight, std::array<bool, 3> mask,
                                                  at::ScalarType acc, const BilinearDevice& dev);

// Factorized pooling: shapes and broadcasting of proj_x / proj_y ([..., o * factor]) against each other.
struct FactorizedArgs {
  at::Tensor px, py;  // [Rx, F], [Ry, F] contiguous
  at::Tensor x_rows, y_rows;  // int64 [R]: row of px / py for output row r (undefined = identity)
  std::vector<int64_t> out_shape;  // broadcast leading shape + [o]
  int64_t rows, features, factor, groups;
};
FactorizedArgs prepare_factorized_args(const at::Tensor& proj_x, const at::Tensor& proj_y, const at::Tensor& bias_x,
                                       const at::Tensor& bias_y, int64_t factor);

// Device kernels of the fused factorized pass. Both read row r of px / py through the row maps and add the
// biases on the fly. forward: out [R, groups] in the input dtype. backward: grad [R, groups] contiguous;
// writes d out / d px and d out / d py per output row into gx / gy ([R, F], accumulation dtype; either may be
// undefined when not needed).
struct FactorizedKernels {
  std::function<void(const FactorizedArgs&, const at::Tensor& bias_x, const at::Tensor& bias_y, bool normalize,
                     at::Tensor out)>
      forward;
  std::function<void(const at::Tensor& grad, const FactorizedArgs&, const at::Tensor& bias_x,
                     const at::Tensor& bias_y, bool normalize, at::Tensor gx, at::Tensor gy)>
      backward;
};

// The ops themselves, shared by the backends (which pass their device hooks). `upcast_16bit`: run 16-bit
// inputs in fp32 throughout (CPU); otherwise 16-bit tiles feed GEMMs that accumulate into fp32 (GPU).
at::Tensor bilinear_op(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const BilinearDevice& dev, bool upcast_16bit);
std::tuple<at::Tensor, at::Tensor, at::Tensor> bilinear_backward_op(const at::Tensor& grad, const at::Tensor& input1,
                                                                    const at::Tensor& input2, const at::Tensor& weight,
                                                                    std::array<bool, 3> output_mask,
                                                                    const BilinearDevice& dev, bool upcast_16bit);
at::Tensor factorized_bilinear_op(const at::Tensor& proj_x, const at::Tensor& proj_y,
                              const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
                              int64_t factor, bool normalize, const FactorizedKernels& kernels);
std::tuple<at::Tensor, at::Tensor> factorized_bilinear_backward_op(const at::Tensor& grad, const at::Tensor& proj_x,
                                                               const at::Tensor& proj_y,
                                                               const std::optional<at::Tensor>& bias_x,
                                                               const std::optional<at::Tensor>& bias_y, int64_t factor,
                                                               bool normalize, const FactorizedKernels& kernels);

inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The four ops bound to one backend's hooks, for its TORCH_LIBRARY_IMPL block. `Guard` makes the inputs'
// device current for the call (CUDAGuard; NoGuard on the CPU).
struct NoGuard {
  explicit NoGuard(c10::Device) {}
};

template <typename Guard, const BilinearDevice& (*device)(), const FactorizedKernels& (*kernels)(), bool kUpcast16>
struct BilinearBackend {
  static at::Tensor bilinear(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
    const Guard guard(input1.device());
    return bilinear_op(input1, input2, weight, bias, device(), kUpcast16);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> bilinear_backward(const at::Tensor& grad,
                                                                          const at::Tensor& input1,
                                                                          const at::Tensor& input2,
                                                                          const at::Tensor& weight,
                                                                          std::array<bool, 3> output_mask) {
    const Guard guard(input1.device());
    return bilinear_backward_op(grad, input1, input2, weight, output_mask, device(), kUpcast16);
  }
  static at::Tensor factorized_bilinear(const at::Tensor& proj_x, const at::Tensor& proj_y,
                                    const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
                                    int64_t factor, bool normalize) {
    const Guard guard(proj_x.device());
    return factorized_bilinear_op(proj_x, proj_y, bias_x, bias_y, factor, normalize, kernels());
  }
  static std::tuple<at::Tensor, at::Tensor> factorized_bilinear_backward(const at::Tensor& grad, const at::Tensor& proj_x,
                                                                     const at::Tensor& proj_y,
                                                                     const std::optional<at::Tensor>& bias_x,
                                                                     const std::optional<at::Tensor>& bias_y,
                                                                     int64_t factor, bool normalize) {
    const Guard guard(proj_x.device());
    return factorized_bilinear_backward_op(grad, proj_x, proj_y, bias_x, bias_y, factor, normalize, kernels());
  }
  static void register_impls(torch::Library& m) {
    m.impl("bilinear", &bilinear);
    m.impl("bilinear_backward", &bilinear_backward);
    m.impl("factorized_bilinear", &factorized_bilinear);
    m.impl("factorized_bilinear_backward", &factorized_bilinear_backward);
  }
};

// eps inside the signed square root (u = sign(s) (sqrt(|s| + eps) - sqrt(eps)), gradient <= 1 / (2 sqrt(eps)));
// the floor of the L2 norm (z = u / max(||u||, eps), as F.normalize) is kNormEps (common/constants.h).
constexpr double kSqrtEps = 1e-12;

}  // namespace xmodal
