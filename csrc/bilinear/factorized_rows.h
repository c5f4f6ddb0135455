// What the CPU and CUDA factorized-pooling kernels share (host and device code): reading a row of each
// projection through the broadcast row maps with the bias added, the per-group sums, the signed square root
// and the terms of its backward pass. The kernels differ only in how they spread rows and groups over threads.
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>

#include "bilinear/bilinear.h"

namespace xmodal {

template <typename T>
struct FactorizedRows {
  const T *px, *py, *bx, *by;  // projections [Rx, F], [Ry, F]; biases [F] or nullptr
  const int64_t *xr, *yr;      // output row -> projection row (nullptr: the identity)
  int64_t F, G, f;             // width, groups, factor
  C10_HOST_DEVICE const T* x_row(int64_t r) const { return px + (xr ? xr[r] : r) * F; }
  C10_HOST_DEVICE const T* y_row(int64_t r) const { return py + (yr ? yr[r] : r) * F; }
};

template <typename T>
FactorizedRows<T> factorized_rows(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by) {
  return {a.px.data_ptr<T>(),
          a.py.data_ptr<T>(),
          bx.defined() ? bx.data_ptr<T>() : nullptr,
          by.defined() ? by.data_ptr<T>() : nullptr,
          a.x_rows.defined() ? a.x_rows.data_ptr<int64_t>() : nullptr,
          a.y_rows.defined() ? a.y_rows.data_ptr<int64_t>() : nullptr,
          a.features,
          a.groups,
          a.factor};
}

// row[q] + bias[q] in the accumulation type
template <typename acc_t, typename T>
C10_HOST_DEVICE inline acc_t biased(const T* row, const T* bias, int64_t q) {
  return acc_t(row[q]) + (bias ? acc_t(bias[q]) : acc_t(0));
}

// s_j = sum_{q in group j} (x[q] + bx[q]) (y[q] + by[q])
template <typename acc_t, typename T>
C10_HOST_DEVICE inline acc_t group_sum(const FactorizedRows<T>& v, const T* x, const T* y, int64_t j) {
  acc_t t = 0;
  for (int64_t q = j * v.f; q < (j + 1) * v.f; ++q) t += biased<acc_t>(x, v.bx, q) * biased<acc_t>(y, v.by, q);
  return t;
}

// u = sign(s) (sqrt(|s| + eps) - sqrt(eps))
template <typename acc_t>
C10_HOST_DEVICE inline acc_t signed_sqrt(acc_t s) {
  using std::abs;
  using std::sqrt;
  const acc_t r = sqrt(abs(s) + acc_t(kSqrtEps)) - sqrt(acc_t(kSqrtEps));
  return s < 0 ? -r : r;
}

// Backward of z = u / max(||u||, eps) given ss = ||u||^2 and dot = u . dz: dz/du = (dz - u * proj) / n.
template <typename acc_t>
struct NormalizeGrad {
  acc_t n, proj;
  C10_HOST_DEVICE NormalizeGrad(acc_t ss, acc_t dot) {
    using std::sqrt;
    const acc_t norm = sqrt(ss);
    const bool clamped = norm <= acc_t(kNormEps);
    n = clamped ? acc_t(kNormEps) : norm;
    proj = clamped ? acc_t(0) : dot / (n * n);  // (z . dz) / ||u|| with z = u / ||u||
  }
  // d loss / d s for one group, from its upstream gradient g and its sum s
  C10_HOST_DEVICE acc_t grad_s(acc_t g, acc_t s) const {
    using std::abs;
    using std::sqrt;
    return (g - signed_sqrt(s) * proj) / n / (acc_t(2) * sqrt(abs(s) + acc_t(kSqrtEps)));
  }
};

}  // namespace xmodal
