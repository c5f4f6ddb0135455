// CUDA kernels of the bilinear ops. The full bilinear op runs the shared tile loops (bilinear.cpp) on the
// GPU: cuBLAS GEMMs on bounded tiles, 16-bit tiles accumulating into fp32, and batched GEMVs for the
// backward contraction. The factorized pass is one kernel per direction: a block per output row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bilinear/bilinear.h"
#include "bilinear/factorized_rows.h"

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

template <typename T, typename acc_t>
__global__ void factorized_forward_kernel(FactorizedRows<T> v, T* out, bool normalize) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  const T* x = v.x_row(r);
  const T* y = v.y_row(r);
  T* o = out + r * v.G;
  if (!normalize) {
    for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) o[j] = T(group_sum<acc_t>(v, x, y, j));
    return;
  }
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) {
    const acc_t u = signed_sqrt(group_sum<acc_t>(v, x, y, j));
    ss += u * u;
  }
  ss = block_sum(ss, shared);
  const acc_t inv = acc_t(1) / max(sqrt(ss), acc_t(kNormEps));
  for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) o[j] = T(signed_sqrt(group_sum<acc_t>(v, x, y, j)) * inv);
}

template <typename T, typename acc_t>
__global__ void factorized_backward_kernel(FactorizedRows<T> v, const T* grad, acc_t* gx, acc_t* gy, bool normalize) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  const T* x = v.x_row(r);
  const T* y = v.y_row(r);
  const T* g = grad + r * v.G;
  acc_t ss = 0, dot = 0;
  if (normalize) {
    for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) {
      const acc_t u = signed_sqrt(group_sum<acc_t>(v, x, y, j));
      ss += u * u;
      dot += u * acc_t(g[j]);
    }
    ss = block_sum(ss, shared);
    dot = block_sum(dot, shared);
  }
  const NormalizeGrad<acc_t> back(ss, dot);
  for (int64_t j = threadIdx.x; j < v.G; j += blockDim.x) {
    const acc_t gs = normalize ? back.grad_s(acc_t(g[j]), group_sum<acc_t>(v, x, y, j)) : acc_t(g[j]);
    for (int64_t q = j * v.f; q < (j + 1) * v.f; ++q) {
      gx[r * v.F + q] = gs * biased<acc_t>(y, v.by, q);
      gy[r * v.F + q] = gs * biased<acc_t>(x, v.bx, q);
    }
  }
}

void check_grid(int64_t rows) {
  TORCH_CHECK(rows < (int64_t(1) << 31), "factorized pooling supports fewer than 2^31 output rows on the GPU, got ",
              rows);
}

void factorized_forward_cuda(const FactorizedArgs& a, const at::Tensor& bx, const at::Tensor& by, bool normalize,
                             at::Tensor out) {
  check_grid(a.rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_bilinear_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    factorized_forward_kernel<scalar_t, acc_t><<<unsigned(a.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        factorized_rows<scalar_t>(a, bx, by), out.data_ptr<scalar_t>(), normalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void factorized_backward_cuda(const at::Tensor& grad, const FactorizedArgs& a, const at::Tensor& bx,
                              const at::Tensor& by, bool normalize, at::Tensor gx, at::Tensor gy) {
  check_grid(a.rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.px.scalar_type(), "factorized_bilinear_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    factorized_backward_kernel<scalar_t, acc_t><<<unsigned(a.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        factorized_rows<scalar_t>(a, bx, by), grad.data_ptr<scalar_t>(), gx.data_ptr<acc_t>(), gy.data_ptr<acc_t>(),
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
