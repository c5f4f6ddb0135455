// The projections of factorized pooling as ops of their own, so that their weight gradient (a large
// tensor that training frees and asks for again every step) can come from the CPU block cache, and the
// pooling with one projection recomputed in backward. Device independent: the GEMMs are ATen's.
#include "common/checks.h"
#include "common/cpu_block_cache.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace xmodal {
namespace {

at::Tensor cached_linear(const at::Tensor& input, const at::Tensor& weight) {
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == weight.size(1), "input's last dimension must be weight's in_features ",
              weight.size(1), ", got input of shape ", input.sizes());
  check_same_dtype(input, "input", weight, "weight");
  check_same_device(input, "input", weight, "weight");
  return at::matmul(input, weight.t());
}

at::Tensor cached_linear_weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  TORCH_CHECK(grad.dim() >= 1 && input.dim() == grad.dim() && grad.sizes().slice(0, grad.dim() - 1) ==
                                                                    input.sizes().slice(0, input.dim() - 1),
              "grad and input must share their leading dimensions, got shapes ", grad.sizes(), " and ", input.sizes());
  check_same_dtype(grad, "grad", input, "input");
  check_same_device(grad, "grad", input, "input");
  const int64_t out = grad.size(-1), in = input.size(-1);
  const at::Tensor g2 = grad.reshape({-1, out}), x2 = input.reshape({-1, in});
  at::Tensor result = cached_empty({out, in}, input.options());
  if (g2.size(0) == 0) return result.zero_();
  return at::mm_out(result, g2.t(), x2);
}

at::Tensor factorized_bilinear_recompute(const at::Tensor& proj_a, const at::Tensor& b, const at::Tensor& weight_b,
                                         const std::optional<at::Tensor>& bias_a, const std::optional<at::Tensor>& bias_b,
                                         int64_t factor, bool normalize) {
  static auto pool = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("xmodal::factorized_bilinear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const std::optional<at::Tensor>&, int64_t, bool)>();
  return pool.call(proj_a, cached_linear(b, weight_b), bias_a, bias_b, factor, normalize);
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CompositeExplicitAutograd, m) {
  m.impl("cached_linear", &cached_linear);
  m.impl("cached_linear_weight_grad", &cached_linear_weight_grad);
  m.impl("factorized_bilinear_recompute", &factorized_bilinear_recompute);
}

}  // namespace xmodal
