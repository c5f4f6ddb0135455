// CUDA kernels of the bilinear ops. The full bilinear op runs the shared tile loops (bilinear.cpp) on the
// GPU: cuBLAS GEMMs on bounded tiles, 16-bit tiles accumulating into fp32, and batched GEMVs for the
// backward contraction. The factorized pass is one kernel per direction: a block per output row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bilinear/bilinear.h"

namespace xmodal {
namespace {

void contract_cuda(const at::Tensor& U, const at::Tensor& x_blk, const at::Tensor& y, at::Tensor grad_x_blk,
                   at::Tensor grad_y) {
  if (grad_x_blk.defined()) grad_x_blk.copy_(at::bmm(U, y.unsqueeze(2)).squeeze(2));
  if (grad_y.defined()) grad_y.add_(at::bmm(x_blk.unsqueeze(1), U).squeeze(1));
}

const BilinearDevice& cuda_device() {
  // 32M-element tiles: large enough that each GEMM fills the GPU, small enough to bound the workspace.
  static const BilinearDevice dev{contract_cuda, int64_t(32) << 20, int64_t(1) << 16};
  return dev;
}

constexpr int kThreads = 256;

template <typename acc_t>
__device__ inline acc_t block_sum(acc_t v, acc_t* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) total += shared[w];
  return total;
}

template <typename acc_t>
__device__ inline acc_t signed_sqrt(acc_t s) {
  const acc_t r = sqrt(fabs(s) + acc_t(kSqrtEps)) - sqrt(acc_t(kSqrtEps));
  return s < 0 ? -r : r;
}

template <typename T>
struct Rows {
  const T *px, *py, *bx, *by;
  const int64_t *xr, *yr;
  int64_t F, G, f;
};

template <typename T, typename acc_t>
__device__ inline acc_t group_sum(const Rows<T>& v, const T* x, const T* y, int64_t j) {
  acc_t t = 0;
  for (int64_t q = j * v.f; q < (j + 1) * v.f; ++q) {
    const acc_t xv = acc_t(x[q]) + (v.bx ? acc_t(v.bx[q]) : acc_t(0));
    const acc_t yv = acc_t(y[q]) + (v.by ? acc_t(v.by[q]) : acc_t(0));
    t += xv * yv;
  }
  return t;
}

template <typename T, typename acc_t>
__global__ void factorized_forward_kernel(Rows<T> v, T* out, bool normalize) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  const T* x = v.px + (v.xr ? v.xr[r] : r) * v.F;
  const T* y = v.py + (v.yr ? v.yr[r] : r) * v.F;
  T* o = out + r * v.G;
  if (!normalize) {
    for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) o[j] = T(group_sum<T, acc_t>(v, x, y, j));
    return;
  }
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) {
    const acc_t u = signed_sqrt(group_sum<T, acc_t>(v, x, y, j));
    ss += u * u;
  }
  ss = block_sum(ss, shared);
  const acc_t inv = acc_t(1) / max(sqrt(ss), acc_t(kNormEps));
  for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) o[j] = T(signed_sqrt(group_sum<T, acc_t>(v, x, y, j)) * inv);
}

template <typename T, typename acc_t>
__global__ void factorized_backward_kernel(Rows<T> v, const T* grad, acc_t* gx, acc_t* gy, bool normalize) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  const T* x = v.px + (v.xr ? v.xr[r] : r) * v.F;
  const T* y = v.py + (v.yr ? v.yr[r] : r) * v.F;
  const T* g = grad + r * v.G;
  acc_t n = 1, proj = 0;
  if (normalize) {
    acc_t ss = 0, dot = 0;
    for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) {
      const acc_t u = signed_sqrt(group_sum<T, acc_t>(v, x, y, j));
      ss += u * u;
      dot += u * acc_t(g[j]);
    }
    ss = block_sum(ss, shared);
    dot = block_sum(dot, shared);
    const acc_t norm = sqrt(ss);
    const bool clamped = norm <= acc_t(kNormEps);
    n = clamped ? acc_t(kNormEps) : norm;
    proj = clamped ? acc_t(0) : dot / (n * n);
  }
  for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) {
    acc_t gs = acc_t(g[j]);
    if (normalize) {
      const acc_t s = group_sum<T, acc_t>(v, x, y, j);
      gs = (gs - signed_sqrt(s) * proj) / n / (acc_t(2) * sqrt(fabs(s) + acc_t(kSqrtEps)));
    }
    for (int64_t q = j * v.f; q < (j + 1) * v.f; ++q) {
      const acc_t xv = acc_t(x[q]) + (v.bx ? acc_t(v.bx[q]) : acc_t(0));
      const acc_t yv = acc_t(y[q]) + (v.by ? acc_t(v.by[q]) : acc_t(0));
      gx[r * v.F + q] = gs * yv;
      gy[r * v.F + q] = gs * xv;
    }
  }
}

template <typename T>
Rows<T> rows_of(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by) {
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

void check_grid(int64_t rows) {
  TORCH_CHECK(rows < (int64_t(1) << 31), "factorized pooling supports fewer than 2^31 output rows on the GPU, got ",
              rows);
}

void factorized_forward_cuda(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by, bool normalize,
                             at::Tensor out) {
  check_grid(a.rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    factorized_forward_kernel<scalar_t, acc_t><<<unsigned(a.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(a, bx, by), out.data_ptr<scalar_t>(), normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void factorized_backward_cuda(const at::Tensor& grad, const FactorizedArgs& a, const at::Tensor& bx,
                              const at::Tensor& by, bool normalize, at::Tensor gx, at::Tensor gy) {
  check_grid(a.rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    factorized_backward_kernel<scalar_t, acc_t><<<unsigned(a.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(a, bx, by), grad.data_ptr<scalar_t>(), gx.data_ptr<acc_t>(), gy.data_ptr<acc_t>(),
        normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const FactorizedKernels& cuda_kernels() {
  static const FactorizedKernels k{factorized_forward_cuda, factorized_backward_cuda};
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CUDA, m) {
  BilinearBackend<c10::cuda::CUDAGuard, cuda_device, cuda_kernels, /*kUpcast16=*/false>::register_impls(m);
}

}  // namespace xmodal
