// CPU kernels of the bilinear ops: the tile contraction of the full bilinear backward and the fused
// factorized pass (bias + product + sum-pool + signed sqrt + L2 normalisation in one sweep per row).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bilinear/bilinear.h"
#include "common/env.h"

namespace xmodal {
namespace {

// 16-bit inputs run in fp32 on the CPU, so the contraction only sees float and double.
void contract_cpu(const at::Tensor& U, const at::Tensor& x_blk, const at::Tensor& y, at::Tensor grad_x_blk,
                  at::Tensor grad_y) {
  const int64_t nb = U.size(0), ni = U.size(1), dy = U.size(2);
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "bilinear_contract_cpu", [&] {
    const scalar_t* u = U.data_ptr<scalar_t>();
    const scalar_t* xp = x_blk.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t xs = x_blk.stride(0), ys = y.stride(0);
    scalar_t* gx = grad_x_blk.defined() ? grad_x_blk.data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = grad_y.defined() ? grad_y.data_ptr<scalar_t>() : nullptr;
    const int64_t gxs = gx ? grad_x_blk.stride(0) : 0, gys = gy ? grad_y.stride(0) : 0;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* yr = yp + b * ys;
        for (int64_t ii = 0; ii < ni; ++ii) {
          const scalar_t* ur = u + (b * ni + ii) * dy;
          if (gx) {
            scalar_t s = 0;
            for (int64_t j = 0; j < dy; ++j) s += ur[j] * yr[j];
            gx[b * gxs + ii] = s;
          }
          if (gy) {
            const scalar_t xv = xp[b * xs + ii];
            scalar_t* gyr = gy + b * gys;
            for (int64_t j = 0; j < dy; ++j) gyr[j] += ur[j] * xv;
          }
        }
      }
    });
  });
}

const BilinearDevice& cpu_device() {
  // Z tiles of about 4 MiB (fp32): smaller tiles made MKL's per-call packing show (forward 0.9x of one
  // big GEMM at 1 MiB); XMODAL_BILINEAR_TILE_KIB and XMODAL_BILINEAR_ROWS override the tile size and the
  // most batch rows per tile.
  static const BilinearDevice dev{contract_cpu, env_int("XMODAL_BILINEAR_TILE_KIB", 4096) * 1024 / 4,
                                  env_int("XMODAL_BILINEAR_ROWS", 256)};
  return dev;
}

template <typename acc_t>
inline acc_t signed_sqrt(acc_t s) {
  const acc_t r = std::sqrt(std::abs(s) + acc_t(kSqrtEps)) - std::sqrt(acc_t(kSqrtEps));
  return s < 0 ? -r : r;
}

// Rows of px / py with the biases folded in: (px[row] + bias_x) and (py[row] + bias_y).
template <typename T>
struct FactorizedView {
  const T *px, *py, *bx, *by;
  const int64_t *xr, *yr;
  int64_t F;
  const T* x_row(int64_t r) const { return px + (xr ? xr[r] : r) * F; }
  const T* y_row(int64_t r) const { return py + (yr ? yr[r] : r) * F; }
};

template <typename T>
FactorizedView<T> view_of(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by) {
  return {a.px.data_ptr<T>(),
          a.py.data_ptr<T>(),
          bx.defined() ? bx.data_ptr<T>() : nullptr,
          by.defined() ? by.data_ptr<T>() : nullptr,
          a.x_rows.defined() ? a.x_rows.data_ptr<int64_t>() : nullptr,
          a.y_rows.defined() ? a.y_rows.data_ptr<int64_t>() : nullptr,
          a.features};
}

// s[j] = sum_q (x[j f + q] + bx) (y[j f + q] + by) for every group j of one row.
template <typename T, typename acc_t>
inline void pool_row(const FactorizedView<T>& v, int64_t r, int64_t groups, int64_t f, acc_t* s) {
  const T* x = v.x_row(r);
  const T* y = v.y_row(r);
  for (int64_t j = 0; j < groups; ++j) {
    acc_t t = 0;
    for (int64_t q = j * f; q < (j + 1) * f; ++q) {
      const acc_t xv = acc_t(x[q]) + (v.bx ? acc_t(v.bx[q]) : acc_t(0));
      const acc_t yv = acc_t(y[q]) + (v.by ? acc_t(v.by[q]) : acc_t(0));
      t += xv * yv;
    }
    s[j] = t;
  }
}

void factorized_forward_cpu(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by, bool normalize,
                            at::Tensor out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = view_of<scalar_t>(a, bx, by);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t G = a.groups, f = a.factor;
    at::parallel_for(0, a.rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.features)), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> s(G);
      for (int64_t r = r0; r < r1; ++r) {
        pool_row(v, r, G, f, s.data());
        scalar_t* orow = o + r * G;
        if (!normalize) {
          for (int64_t j = 0; j < G; ++j) orow[j] = scalar_t(s[j]);
          continue;
        }
        acc_t ss = 0;
        for (int64_t j = 0; j < G; ++j) {
          s[j] = signed_sqrt(s[j]);
          ss += s[j] * s[j];
        }
        const acc_t inv = acc_t(1) / std::max(std::sqrt(ss), acc_t(kNormEps));
        for (int64_t j = 0; j < G; ++j) orow[j] = scalar_t(s[j] * inv);
      }
    });
  });
}

void factorized_backward_cpu(const at::Tensor& grad, const FactorizedArgs& a, const at::Tensor& bx,
                             const at::Tensor& by, bool normalize, at::Tensor gx, at::Tensor gy) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = view_of<scalar_t>(a, bx, by);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    acc_t* gxp = gx.data_ptr<acc_t>();
    acc_t* gyp = gy.data_ptr<acc_t>();
    const int64_t G = a.groups, f = a.factor, F = a.features;
    at::parallel_for(0, a.rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, F)), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> s(G), gs(G);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* grow = g + r * G;
        if (normalize) {
          // Recompute u = signed_sqrt(s) and its norm; then d/du of u / max(||u||, eps), then d/ds.
          pool_row(v, r, G, f, s.data());
          acc_t ss = 0, dot = 0;
          for (int64_t j = 0; j < G; ++j) {
            const acc_t u = signed_sqrt(s[j]);
            ss += u * u;
            dot += u * acc_t(grow[j]);
          }
          const acc_t norm = std::sqrt(ss);
          const bool clamped = norm <= acc_t(kNormEps);
          const acc_t n = clamped ? acc_t(kNormEps) : norm;
          const acc_t proj = clamped ? acc_t(0) : dot / (n * n);  // (z . gz) / ||u|| with z = u / ||u||
          for (int64_t j = 0; j < G; ++j) {
            const acc_t u = signed_sqrt(s[j]);
            const acc_t gu = (acc_t(grow[j]) - u * proj) / n;
            gs[j] = gu / (acc_t(2) * std::sqrt(std::abs(s[j]) + acc_t(kSqrtEps)));
          }
        } else {
          for (int64_t j = 0; j < G; ++j) gs[j] = acc_t(grow[j]);
        }
        const scalar_t* x = v.x_row(r);
        const scalar_t* y = v.y_row(r);
        acc_t* gxr = gxp + r * F;
        acc_t* gyr = gyp + r * F;
        for (int64_t j = 0; j < G; ++j) {
          for (int64_t q = j * f; q < (j + 1) * f; ++q) {
            const acc_t xv = acc_t(x[q]) + (v.bx ? acc_t(v.bx[q]) : acc_t(0));
            const acc_t yv = acc_t(y[q]) + (v.by ? acc_t(v.by[q]) : acc_t(0));
            gxr[q] = gs[j] * yv;
            gyr[q] = gs[j] * xv;
          }
        }
      }
    });
  });
}

const FactorizedKernels& cpu_kernels() {
  static const FactorizedKernels k{factorized_forward_cpu, factorized_backward_cpu};
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CPU, m) {
  BilinearBackend<NoGuard, cpu_device, cpu_kernels, /*kUpcast16=*/true>::register_impls(m);
}

}  // namespace xmodal
