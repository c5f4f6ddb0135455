// CPU kernels of the bilinear ops: the tile contraction of the full bilinear backward and the fused
// factorized pass (bias + product + sum-pool + signed sqrt + L2 normalisation in one sweep per row).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bilinear/bilinear.h"
#include "bilinear/factorized_rows.h"
#include "common/settings.h"

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
  // tile sizes from xmodal.settings (bilinear_tile_kib, bilinear_max_rows: common/settings.cpp says why
  // 2 MiB), read on every call so that a change applies to the next one
  thread_local BilinearDevice dev{contract_cpu, 0, 0};
  dev.tile_elems = bilinear_tile_kib() * 1024 / 4;
  dev.max_rows = bilinear_max_rows();
  return dev;
}

// s[j] for every group j of output row r
template <typename T, typename acc_t>
inline void pool_row(const FactorizedRows<T>& v, int64_t r, acc_t* s) {
  const T* x = v.x_row(r);
  const T* y = v.y_row(r);
  for (int64_t j = 0; j < v.G; ++j) s[j] = group_sum<acc_t>(v, x, y, j);
}

void factorized_forward_cpu(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by, bool normalize,
                            at::Tensor out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_bilinear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = factorized_rows<scalar_t>(a, bx, by);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t G = a.groups;
    at::parallel_for(0, a.rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, a.features)), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> s(G);
      for (int64_t r = r0; r < r1; ++r) {
        pool_row(v, r, s.data());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_bilinear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = factorized_rows<scalar_t>(a, bx, by);
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
          pool_row(v, r, s.data());
          acc_t ss = 0, dot = 0;
          for (int64_t j = 0; j < G; ++j) {
            const acc_t u = signed_sqrt(s[j]);
            ss += u * u;
            dot += u * acc_t(grow[j]);
          }
          const NormalizeGrad<acc_t> back(ss, dot);
          for (int64_t j = 0; j < G; ++j) gs[j] = back.grad_s(acc_t(grow[j]), s[j]);
        } else {
          for (int64_t j = 0; j < G; ++j) gs[j] = acc_t(grow[j]);
        }
        const scalar_t* x = v.x_row(r);
        const scalar_t* y = v.y_row(r);
        acc_t* gxr = gxp + r * F;
        acc_t* gyr = gyp + r * F;
        for (int64_t j = 0; j < G; ++j) {
          for (int64_t q = j * f; q < (j + 1) * f; ++q) {
            gxr[q] = gs[j] * biased<acc_t>(y, v.by, q);
            gyr[q] = gs[j] * biased<acc_t>(x, v.bx, q);
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
