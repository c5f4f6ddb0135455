// Device-independent parts of the bilinear ops: argument checks, shapes, and the tile loops (ATen GEMMs
// on whichever device the tensors live). See bilinear.h for the scheme.
#include "bilinear/bilinear.h"

#include <algorithm>

#include "common/checks.h"
#include "common/cpu_block_cache.h"

namespace xmodal {

namespace {

// out = a @ b, or out += a @ b with `accumulate`; the GEMM accumulates in `out`'s dtype (fp32 for 16-bit
// inputs on the GPU).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  } else if (accumulate) {
    out.add_(at::mm(a, b, out.scalar_type()));
  } else {
    out.copy_(at::mm(a, b, out.scalar_type()));
  }
}

std::pair<int64_t, int64_t> tile_shape(int64_t B, int64_t dx, int64_t dy, const BilinearDevice& dev) {
  const int64_t rows = std::max<int64_t>(1, std::min(B, dev.max_rows));
  const int64_t ib = std::clamp<int64_t>(dev.tile_elems / std::max<int64_t>(1, rows * dy), 1, dx);
  return {rows, ib};
}

// Z[r, ii, j] = x[r, i0 + ii] * y[r, j] for the rows and input1 features of one tile, in `buf`'s storage.
at::Tensor outer_tile(at::Tensor& buf, const at::Tensor& x_blk, const at::Tensor& y_rows) {
  const int64_t nb = x_blk.size(0), ni = x_blk.size(1), dy = y_rows.size(1);
  at::Tensor z = buf.view({-1}).narrow(0, 0, nb * ni * dy).view({nb, ni, dy});
  at::mul_out(z, x_blk.unsqueeze(2), y_rows.unsqueeze(1));
  return z.view({nb, ni * dy});
}

}  // namespace

BilinearArgs prepare_bilinear_args(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight) {
  check_float_dtype(input1, "input1");
  check_same_dtype(input2, "input2", input1, "input1");
  check_same_dtype(weight, "weight", input1, "input1");
  check_same_device(input2, "input2", input1, "input1");
  check_same_device(weight, "weight", input1, "input1");
  TORCH_CHECK(input1.dim() >= 1, "input1 must have at least 1 dimension [..., in1_features], got a scalar");
  TORCH_CHECK(input2.dim() >= 1, "input2 must have at least 1 dimension [..., in2_features], got a scalar");
  TORCH_CHECK(weight.dim() == 3, "weight must be 3-D [out_features, in1_features, in2_features], got shape ",
              weight.sizes());
  TORCH_CHECK(input1.sizes().slice(0, input1.dim() - 1) == input2.sizes().slice(0, input2.dim() - 1),
              "input1 and input2 must have the same leading (batch) shape, got shapes ", input1.sizes(), " and ",
              input2.sizes());
  TORCH_CHECK(input1.size(-1) == weight.size(1), "input1's last dimension must equal weight.size(1) (in1_features), got ",
              input1.size(-1), " and ", weight.size(1));
  TORCH_CHECK(input2.size(-1) == weight.size(2), "input2's last dimension must equal weight.size(2) (in2_features), got ",
              input2.size(-1), " and ", weight.size(2));
  BilinearArgs a;
  a.batch_shape.assign(input1.sizes().begin(), input1.sizes().end() - 1);
  const int64_t rows = c10::multiply_integers(a.batch_shape);
  a.x = input1.reshape({rows, input1.size(-1)}).contiguous();
  a.y = input2.reshape({rows, input2.size(-1)}).contiguous();
  a.weight = weight.contiguous();
  return a;
}

void check_bilinear_bias(const at::Tensor& bias, const at::Tensor& weight) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "bias must be 1-D [out_features] = [",
              weight.size(0), "], got shape ", bias.sizes());
  check_same_dtype(bias, "bias", weight, "weight");
  check_same_device(bias, "bias", weight, "weight");
}

at::Tensor bilinear_forward_tiled(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                                  at::ScalarType acc, const BilinearDevice& dev) {
  const int64_t B = x.size(0), dx = x.size(1), dy = y.size(1), o = weight.size(0);
  if (B == 0 || o == 0 || dx == 0 || dy == 0) return at::zeros({B, o}, x.options().dtype(acc));
  // the first block of input1 features writes each row of `out`, later blocks accumulate (no zero fill)
  at::Tensor out = at::empty({B, o}, x.options().dtype(acc));
  const at::Tensor w2 = weight.view({o, dx * dy});
  const auto [rows, ib] = tile_shape(B, dx, dy, dev);
  at::Tensor buf = at::empty({rows * ib * dy}, x.options());
  for (int64_t i0 = 0; i0 < dx; i0 += ib) {
    const int64_t ni = std::min(ib, dx - i0);
    const at::Tensor w_blk_t = w2.narrow(1, i0 * dy, ni * dy).t();  // [ni * dy, o], a view
    for (int64_t b0 = 0; b0 < B; b0 += rows) {
      const int64_t nb = std::min(rows, B - b0);
      at::Tensor z = outer_tile(buf, x.narrow(0, b0, nb).narrow(1, i0, ni), y.narrow(0, b0, nb));
      mm_into(out.narrow(0, b0, nb), z, w_blk_t, /*accumulate=*/i0 > 0);
    }
  }
  return out;
}

std::array<at::Tensor, 3> bilinear_backward_tiled(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                  const at::Tensor& weight, std::array<bool, 3> mask,
                                                  at::ScalarType acc, const BilinearDevice& dev) {
  const int64_t B = x.size(0), dx = x.size(1), dy = y.size(1), o = weight.size(0);
  const auto opts = x.options().dtype(acc);
  at::Tensor grad_x = mask[0] ? at::zeros({B, dx}, opts) : at::Tensor();
  at::Tensor grad_y = mask[1] ? at::zeros({B, dy}, opts) : at::Tensor();
  // Every block of grad_w is written by its first batch tile (no zero fill: it would be a full extra pass).
  // (On the CPU from the block cache: training frees and asks for this gradient again every step.)
  at::Tensor grad_w = mask[2] ? cached_empty({o, dx * dy}, opts) : at::Tensor();
  const bool need_xy = mask[0] || mask[1];
  if (B == 0 || o == 0 || dx == 0 || dy == 0 || !(need_xy || mask[2])) {
    if (mask[2]) grad_w.zero_();
    return {grad_x, grad_y, mask[2] ? grad_w.view({o, dx, dy}) : grad_w};
  }

  const at::Tensor w2 = weight.view({o, dx * dy});
  const at::Tensor x_acc = x.to(acc), y_acc = y.to(acc);  // the contraction runs in the accumulation dtype
  const auto [rows, ib] = tile_shape(B, dx, dy, dev);
  at::Tensor buf = mask[2] ? at::empty({rows * ib * dy}, x.options()) : at::Tensor();
  at::Tensor u_buf = need_xy ? at::empty({rows * ib * dy}, opts) : at::Tensor();
  for (int64_t i0 = 0; i0 < dx; i0 += ib) {
    const int64_t ni = std::min(ib, dx - i0);
    const at::Tensor w_blk = w2.narrow(1, i0 * dy, ni * dy);  // [o, ni * dy], a view
    for (int64_t b0 = 0; b0 < B; b0 += rows) {
      const int64_t nb = std::min(rows, B - b0);
      const at::Tensor g = grad.narrow(0, b0, nb);
      if (mask[2]) {
        at::Tensor z = outer_tile(buf, x.narrow(0, b0, nb).narrow(1, i0, ni), y.narrow(0, b0, nb));
        mm_into(grad_w.narrow(1, i0 * dy, ni * dy), g.t(), z, /*accumulate=*/b0 > 0);
      }
      if (need_xy) {
        at::Tensor u;
        if (g.scalar_type() == acc) {
          u = u_buf.view({-1}).narrow(0, 0, nb * ni * dy).view({nb, ni * dy});
          at::mm_out(u, g, w_blk);
        } else {
          u = at::mm(g, w_blk, acc);
        }
        dev.contract(u.view({nb, ni, dy}), x_acc.narrow(0, b0, nb).narrow(1, i0, ni), y_acc.narrow(0, b0, nb),
                     mask[0] ? grad_x.narrow(0, b0, nb).narrow(1, i0, ni) : at::Tensor(),
                     mask[1] ? grad_y.narrow(0, b0, nb) : at::Tensor());
      }
    }
  }
  return {grad_x, grad_y, mask[2] ? grad_w.view({o, dx, dy}) : grad_w};
}

FactorizedArgs prepare_factorized_args(const at::Tensor& proj_x, const at::Tensor& proj_y, const at::Tensor& bias_x,
                                       const at::Tensor& bias_y, int64_t factor) {
  check_float_dtype(proj_x, "proj_x");
  check_same_dtype(proj_y, "proj_y", proj_x, "proj_x");
  check_same_device(proj_y, "proj_y", proj_x, "proj_x");
  TORCH_CHECK(proj_x.dim() >= 1 && proj_y.dim() >= 1, "proj_x and proj_y must have at least 1 dimension, got shapes ",
              proj_x.sizes(), " and ", proj_y.sizes());
  const int64_t F = proj_x.size(-1);
  TORCH_CHECK(proj_y.size(-1) == F, "proj_x and proj_y must have the same last dimension (out_features * factor), got ",
              proj_x.size(-1), " and ", proj_y.size(-1));
  TORCH_CHECK(factor > 0, "factor must be positive, got ", factor);
  TORCH_CHECK(F % factor == 0, "factor must divide the projection width ", F, " (out_features * factor), got factor ",
              factor);
  for (const auto& [b, name] : {std::pair{&bias_x, "bias_x"}, std::pair{&bias_y, "bias_y"}}) {
    if (!b->defined()) continue;
    TORCH_CHECK(b->dim() == 1 && b->size(0) == F, name, " must be 1-D [out_features * factor] = [", F,
                "], got shape ", b->sizes());
    check_same_dtype(*b, name, proj_x, "proj_x");
    check_same_device(*b, name, proj_x, "proj_x");
  }
  const auto lead_x = proj_x.sizes().slice(0, proj_x.dim() - 1);
  const auto lead_y = proj_y.sizes().slice(0, proj_y.dim() - 1);
  std::vector<int64_t> lead;
  try {
    lead = at::infer_size(lead_x, lead_y);
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "the leading (batch) shapes of x and y must broadcast against each other, got ", lead_x,
                " and ", lead_y);
  }
  FactorizedArgs a;
  a.features = F;
  a.factor = factor;
  a.groups = F / factor;
  a.px = proj_x.reshape({c10::multiply_integers(lead_x), F}).contiguous();
  a.py = proj_y.reshape({c10::multiply_integers(lead_y), F}).contiguous();
  a.rows = c10::multiply_integers(lead);
  // Broadcast sides are read through a row map, so nothing is expanded in memory.
  auto row_map = [&](c10::IntArrayRef side, const at::Tensor& p) {
    if (side == c10::IntArrayRef(lead)) return at::Tensor();
    return at::arange(p.size(0), p.options().dtype(at::kLong)).view(side).expand(lead).contiguous().view({-1});
  };
  a.x_rows = row_map(lead_x, a.px);
  a.y_rows = row_map(lead_y, a.py);
  a.out_shape = lead;
  a.out_shape.push_back(a.groups);
  return a;
}

}  // namespace xmodal

namespace xmodal {

namespace {

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }
}  // namespace

at::Tensor bilinear_op(const at::Tensor& input1, const at::Tensor& input2, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const BilinearDevice& dev, bool upcast_16bit) {
  BilinearArgs a = prepare_bilinear_args(input1, input2, weight);
  if (bias.has_value()) check_bilinear_bias(*bias, weight);
  const auto dtype = input1.scalar_type();
  const auto acc = accumulate_type(dtype);
  const auto compute = upcast_16bit ? acc : dtype;
  at::Tensor out = bilinear_forward_tiled(a.x.to(compute), a.y.to(compute), a.weight.to(compute), acc, dev);
  if (bias.has_value()) out.add_(*bias);
  std::vector<int64_t> shape = a.batch_shape;
  shape.push_back(weight.size(0));
  return out.to(dtype).view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bilinear_backward_op(const at::Tensor& grad, const at::Tensor& input1,
                                                                    const at::Tensor& input2, const at::Tensor& weight,
                                                                    std::array<bool, 3> output_mask,
                                                                    const BilinearDevice& dev, bool upcast_16bit) {
  BilinearArgs a = prepare_bilinear_args(input1, input2, weight);
  check_same_dtype(grad, "grad", input1, "input1");
  check_same_device(grad, "grad", input1, "input1");
  std::vector<int64_t> out_shape = a.batch_shape;
  out_shape.push_back(weight.size(0));
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(out_shape), "grad must have the output's shape ", out_shape,
              ", got ", grad.sizes());
  const auto dtype = input1.scalar_type();
  const auto acc = accumulate_type(dtype);
  const auto compute = upcast_16bit ? acc : dtype;
  at::Tensor g = grad.reshape({a.x.size(0), weight.size(0)}).contiguous().to(compute);
  auto [gx, gy, gw] = bilinear_backward_tiled(g, a.x.to(compute), a.y.to(compute), a.weight.to(compute), output_mask,
                                              acc, dev);
  return {output_mask[0] ? gx.to(dtype).view(input1.sizes()) : empty_grad(input1),
          output_mask[1] ? gy.to(dtype).view(input2.sizes()) : empty_grad(input2),
          output_mask[2] ? gw.to(dtype) : empty_grad(weight)};
}

at::Tensor factorized_bilinear_op(const at::Tensor& proj_x, const at::Tensor& proj_y,
                              const std::optional<at::Tensor>& bias_x, const std::optional<at::Tensor>& bias_y,
                              int64_t factor, bool normalize, const FactorizedKernels& kernels) {
  const at::Tensor bx = bias_x.value_or(at::Tensor()), by = bias_y.value_or(at::Tensor());
  FactorizedArgs a = prepare_factorized_args(proj_x, proj_y, bx, by, factor);
  at::Tensor out = at::empty({a.rows, a.groups}, proj_x.options());
  if (a.rows > 0 && a.groups > 0) kernels.forward(a, bx.defined() ? bx.contiguous() : bx,
                                                  by.defined() ? by.contiguous() : by, normalize, out);
  return out.view(a.out_shape);
}

std::tuple<at::Tensor, at::Tensor> factorized_bilinear_backward_op(const at::Tensor& grad, const at::Tensor& proj_x,
                                                               const at::Tensor& proj_y,
                                                               const std::optional<at::Tensor>& bias_x,
                                                               const std::optional<at::Tensor>& bias_y, int64_t factor,
                                                               bool normalize, const FactorizedKernels& kernels) {
  const at::Tensor bx = bias_x.value_or(at::Tensor()), by = bias_y.value_or(at::Tensor());
  FactorizedArgs a = prepare_factorized_args(proj_x, proj_y, bx, by, factor);
  check_same_dtype(grad, "grad", proj_x, "proj_x");
  check_same_device(grad, "grad", proj_x, "proj_x");
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(a.out_shape), "grad must have the output's shape ", a.out_shape,
              ", got ", grad.sizes());
  const auto acc = accumulate_type(proj_x.scalar_type());
  const auto opts = proj_x.options().dtype(acc);
  at::Tensor gx = at::empty({a.rows, a.features}, opts), gy = at::empty({a.rows, a.features}, opts);
  if (a.rows > 0 && a.features > 0) {
    kernels.backward(grad.reshape({a.rows, a.groups}).contiguous(), a, bx.defined() ? bx.contiguous() : bx,
                     by.defined() ? by.contiguous() : by, normalize, gx, gy);
  }
  // A broadcast side gets the sum of its output rows' contributions.
  auto fold = [&](at::Tensor g, const at::Tensor& rows, const at::Tensor& p, const at::Tensor& proj) {
    if (rows.defined()) g = at::zeros({p.size(0), a.features}, opts).index_add_(0, rows, g);
    return g.to(proj.scalar_type()).view(proj.sizes());
  };
  return {fold(gx, a.x_rows, a.px, proj_x), fold(gy, a.y_rows, a.py, proj_y)};
}

}  // namespace xmodal
