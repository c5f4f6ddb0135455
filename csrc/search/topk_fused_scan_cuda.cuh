// The fused few-query scan of the CUDA top-k search (strategy "fused_scan"; included by topk_search_cuda.cu
// only): one pass over the database that scores rows against queries held in shared memory and keeps
// candidates in shared-memory buffers, so scores never reach global memory; its host-side launcher.
#pragma once
#include "search/planner.h"
#include "search/topk_common.h"
#include "search/topk_select_cuda.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace xmodal {
namespace {

// ---- Fused scan for a few queries (strategy "fused_scan"; not chosen by "auto" until a GPU run verifies it) ----
//
// One pass over the database at memory speed: each block scans a contiguous range of rows; a warp scores
// four rows at a time against every query held in shared memory (lanes split D, 4 elements each, so one
// query read serves four rows; the partial sums are combined by a transpose-sum, about one shuffle per
// (row, query) pair), and feeds the query's candidate buffer in shared memory when the key beats the
// buffer's running threshold. Rows
// are taken in rounds of kFusedRound; between rounds, a warp sorts any buffer that could overflow (bitonic,
// best first) and keeps its k best, which sets the threshold. Scores never reach global memory: each block
// writes its k best per query to a staging area that merge_stage_kernel reduces.

constexpr int kFusedWarps = 8;
constexpr int kFusedRowsPerWarp = 8;
constexpr int kFusedRowsTogether = 4;  // rows a warp scores at once (the kernel's norm lookup assumes 4)
constexpr int kFusedRound = kFusedWarps * kFusedRowsPerWarp;
constexpr int kFusedMaxQueries = int(kFusedScanMaxQueries);  // planner.h holds the limits

struct FusedEntry {
  uint32_t key;
  int32_t row;  // row within the block's range
};

__device__ __forceinline__ bool entry_better(const FusedEntry& a, const FusedEntry& b) {
  return a.key > b.key || (a.key == b.key && a.row < b.row);
}

// One warp sorts buf[0, cap) best first (cap a power of two); then keeps the best k.
template <int kCap>
__device__ void warp_sort_keep(FusedEntry* buf, int* count, uint32_t* thr, int k) {
  const int lane = threadIdx.x & 31;
  for (int i = *count + lane; i < kCap; i += 32) buf[i] = FusedEntry{0u, INT32_MAX};
  __syncwarp();
  for (int size = 2; size <= kCap; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = lane; i < kCap; i += 32) {
        const int j = i ^ stride;
        if (j > i) {
          const FusedEntry a = buf[i], b = buf[j];
          const bool best_first = (i & size) == 0;
          if (best_first ? entry_better(b, a) : entry_better(a, b)) {
            buf[i] = b;
            buf[j] = a;
          }
        }
      }
      __syncwarp();
    }
  }
  if (lane == 0) {
    if (*count > k) *count = k;
    if (*count == k) *thr = buf[k - 1].key;
  }
  __syncwarp();
}

// Four consecutive elements as floats (zeros when !live): one 16-byte load for fp32, 8 bytes for 16-bit.
template <typename scalar_t>
__device__ __forceinline__ void load4(const scalar_t* p, float (&out)[4], bool live) {
  if (!live) {
    out[0] = out[1] = out[2] = out[3] = 0.f;
  } else if constexpr (sizeof(scalar_t) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const scalar_t* h = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = static_cast<float>(h[e]);
  }
}

// Sums each of v[0, V) over the warp's 32 lanes with at most V - 1 + 5 shuffles (instead of 5 V): at each
// step (partner lane^O, O = 16, 8, ..., 1) lanes exchange half of what they hold and keep the other half.
// Afterwards lane l holds the totals of entries first + j in v[j], j < max(1, V / 32); with V < 32 several
// lanes hold the same totals, and all but one of them get a bit of `spare` set. Compile-time recursion, so
// that every index is a constant and v stays in registers. Modelled in tests/device_models/.
template <int N, int V, int O>
__device__ __forceinline__ void transpose_sum_step(float (&v)[N], int lane, int& first, unsigned& spare) {
  if constexpr (V >= 2) {
    constexpr int h = V / 2;
    const bool upper = lane & O;
#pragma unroll
    for (int i = 0; i < h; ++i) {
      const float send = upper ? v[i] : v[i + h];
      const float keep = upper ? v[i + h] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    if (upper) first += h;
    if constexpr (O > 1) transpose_sum_step<N, h, O / 2>(v, lane, first, spare);
  } else {
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
    spare |= unsigned(lane & O);
    if constexpr (O > 1) transpose_sum_step<N, 1, O / 2>(v, lane, first, spare);
  }
}

template <int V>
__device__ __forceinline__ int warp_transpose_sum(float (&v)[V], int lane, bool& spare) {
  static_assert((V & (V - 1)) == 0, "V must be a power of two");
  int first = 0;
  unsigned spare_bits = 0;
  transpose_sum_step<V, V, 16>(v, lane, first, spare_bits);
  spare = spare_bits != 0;
  return first;
}

template <typename scalar_t, int kQ, int kCap>
__global__ void __launch_bounds__(kFusedWarps * 32)
    fused_scan_kernel(int metric, const scalar_t* __restrict__ db, const float* __restrict__ queries, int64_t N,
                      int D, int Q, int k, int64_t rows_per_block, const bool* __restrict__ mask, uint32_t* stage_key,
                      int64_t* stage_idx) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* qs = reinterpret_cast<float*>(smem);                                   // [Q][D]
  FusedEntry* cand = reinterpret_cast<FusedEntry*>(qs + size_t(kQ) * D);        // [Q][kCap]
  uint32_t* thr = reinterpret_cast<uint32_t*>(cand + size_t(kQ) * kCap);        // [Q]
  int* count = reinterpret_cast<int*>(thr + kQ);                                // [Q]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < Q * D; i += blockDim.x) qs[i] = queries[i];
  if (threadIdx.x < kQ) {
    thr[threadIdx.x] = 0u;
    count[threadIdx.x] = 0;
  }
  __syncthreads();

  const Metric m = static_cast<Metric>(metric);
  const int64_t r_begin = int64_t(blockIdx.x) * rows_per_block;
  const int64_t r_end = min(N, r_begin + rows_per_block);
  static_assert(kFusedRowsTogether == 4, "the squared norm of row r is read from lane r << 3 (transpose-sum of 4)");
  constexpr int kVals = kFusedRowsTogether * kQ;  // a lane's partial sums: (row, query) pairs
  constexpr int kHeld = kVals >= 32 ? kVals / 32 : 1;  // totals each lane holds after the transpose-sum
  for (int64_t base = r_begin; base < r_end; base += kFusedRound) {
    for (int i = 0; i < kFusedRowsPerWarp; i += kFusedRowsTogether) {
      const int64_t row0 = base + warp * kFusedRowsPerWarp + i;
      if (row0 >= r_end) break;  // warp-uniform
      // Score kFusedRowsTogether rows at once: each lane takes 4 elements of every row per step of 128, so
      // each query value read from shared memory serves all of them.
      const scalar_t* x[kFusedRowsTogether];
      bool live[kFusedRowsTogether];
#pragma unroll
      for (int r = 0; r < kFusedRowsTogether; ++r) {
        live[r] = row0 + r < r_end;
        x[r] = db + (live[r] ? row0 + r : row0) * D;
      }
      float dot[kVals], sq[kFusedRowsTogether];
#pragma unroll
      for (int v = 0; v < kVals; ++v) dot[v] = 0.f;
#pragma unroll
      for (int r = 0; r < kFusedRowsTogether; ++r) sq[r] = 0.f;
      for (int d = lane * 4; d < D; d += 128) {
        float xv[kFusedRowsTogether][4];
#pragma unroll
        for (int r = 0; r < kFusedRowsTogether; ++r) {
          load4(x[r] + d, xv[r], live[r]);
#pragma unroll
          for (int e = 0; e < 4; ++e) sq[r] += xv[r][e] * xv[r][e];
        }
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          if (q < Q) {
            const float4 qv = *reinterpret_cast<const float4*>(qs + q * D + d);
#pragma unroll
            for (int r = 0; r < kFusedRowsTogether; ++r) {
              dot[r * kQ + q] += xv[r][0] * qv.x + xv[r][1] * qv.y + xv[r][2] * qv.z + xv[r][3] * qv.w;
            }
          }
        }
      }
      bool spare;  // this lane's totals duplicate another lane's
      const int first = warp_transpose_sum(dot, lane, spare);
      bool sq_spare;
      warp_transpose_sum(sq, lane, sq_spare);  // lane l now holds row (l >> 3) & 3's squared norm
#pragma unroll
      for (int j = 0; j < kHeld; ++j) {
        const int pair = first + j, r = pair / kQ, q = pair % kQ;
        const float row_sq = __shfl_sync(0xffffffffu, sq[0], r << 3);  // every lane takes part
        const int64_t row = row0 + r;
        if (spare || q >= Q || row >= r_end || (mask && !mask[row])) continue;
        // the key forms of tile_key (topk_common.h)
        float s = dot[j];
        if (m == Metric::Cosine || m == Metric::CosineDistance) s *= 1.f / fmaxf(sqrtf(row_sq), float(kNormEps));
        else if (m == Metric::L2 || m == Metric::SqEuclidean) s = 2.f * s - row_sq;
        const uint32_t key = encode_key<float>(s);
        if (key > thr[q]) {
          const int pos = atomicAdd(&count[q], 1);
          cand[q * kCap + pos] = FusedEntry{key, int32_t(row - r_begin)};
        }
      }
    }
    __syncthreads();
    // a buffer with less room than one more round holds gets sorted and cut to its k best
    for (int q = warp; q < Q; q += kFusedWarps) {
      if (count[q] > kCap - kFusedRound) warp_sort_keep<kCap>(cand + q * kCap, &count[q], &thr[q], k);
    }
    __syncthreads();
  }
  for (int q = warp; q < Q; q += kFusedWarps) {
    warp_sort_keep<kCap>(cand + q * kCap, &count[q], &thr[q], k);
    const int64_t out = (int64_t(q) * gridDim.x + blockIdx.x) * k;
    for (int j = lane; j < k; j += 32) {
      const bool real = j < count[q];
      stage_key[out + j] = real ? cand[q * kCap + j].key : 0u;
      stage_idx[out + j] = real ? r_begin + cand[q * kCap + j].row : -1;
    }
  }
}

size_t fused_smem_bytes(int64_t Q, int64_t D, int cap) {
  return size_t(Q) * D * sizeof(float) + size_t(Q) * cap * sizeof(FusedEntry) + size_t(Q) * 8;
}

// The kernel is instantiated for 1, 4 and 16 queries; a call uses the smallest that holds its queries,
// and candidate buffers of 128 (k <= 64) or 256 entries.
int64_t fused_query_bucket(int64_t Q) { return Q == 1 ? 1 : (Q <= 4 ? 4 : kFusedMaxQueries); }
int fused_capacity(int64_t k) { return k <= 64 ? 128 : 256; }

// What the planner cannot see: the shared memory a call needs (queries, candidate buffers) on this device.
bool fused_scan_fits(const SearchArgs& a) {
  return fused_smem_bytes(fused_query_bucket(a.queries.size(0)), a.database.size(1), fused_capacity(a.k)) <= 96 * 1024;
}

template <typename scalar_t, int kQ, int kCap>
void launch_fused(const SearchArgs& a, const at::Tensor& q32, int64_t blocks, int64_t rows_per_block,
                  uint32_t* stage_key, int64_t* stage_idx, cudaStream_t stream) {
  const int64_t Q = a.queries.size(0), D = a.database.size(1);
  const size_t smem = fused_smem_bytes(kQ, D, kCap);
  auto kernel = fused_scan_kernel<scalar_t, kQ, kCap>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  kernel<<<unsigned(blocks), kFusedWarps * 32, smem, stream>>>(
      static_cast<int>(a.metric), a.database.data_ptr<scalar_t>(), q32.data_ptr<float>(), a.database.size(0), int(D),
      int(Q), int(a.k), rows_per_block, a.mask ? a.mask->data_ptr<bool>() : nullptr, stage_key, stage_idx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merges the fused scan's result into the running top-k: reads keys_in / idx_in ([Q, k]), writes keys_out /
// idx_out.
template <typename scalar_t>
void fused_scan(const SearchArgs& a, const at::Tensor& keys_in, const at::Tensor& idx_in, at::Tensor& keys,
                at::Tensor& idx) {
  const int64_t Q = a.queries.size(0), N = a.database.size(0), k = a.k;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // enough blocks to fill the GPU, but at most ~64K staged candidates per query for the merge
  const int64_t blocks = std::max<int64_t>(
      1, std::min({4 * sms, (N + kFusedRound - 1) / kFusedRound, std::max(sms, (int64_t(64) << 10) / k)}));
  const int64_t rows_per_block = (N + blocks - 1) / blocks;
  const at::Tensor q32 = a.queries.to(at::kFloat).contiguous();
  auto stage_key = at::empty({Q, blocks, k}, keys.options());
  auto stage_idx = at::empty({Q, blocks, k}, idx.options());
  uint32_t* sk = reinterpret_cast<uint32_t*>(stage_key.data_ptr());
  int64_t* si = stage_idx.data_ptr<int64_t>();
  const bool small_k = fused_capacity(k) == 128;
  switch (fused_query_bucket(Q)) {
    case 1:
      small_k ? launch_fused<scalar_t, 1, 128>(a, q32, blocks, rows_per_block, sk, si, stream)
              : launch_fused<scalar_t, 1, 256>(a, q32, blocks, rows_per_block, sk, si, stream);
      break;
    case 4:
      small_k ? launch_fused<scalar_t, 4, 128>(a, q32, blocks, rows_per_block, sk, si, stream)
              : launch_fused<scalar_t, 4, 256>(a, q32, blocks, rows_per_block, sk, si, stream);
      break;
    default:
      small_k ? launch_fused<scalar_t, kFusedMaxQueries, 128>(a, q32, blocks, rows_per_block, sk, si, stream)
              : launch_fused<scalar_t, kFusedMaxQueries, 256>(a, q32, blocks, rows_per_block, sk, si, stream);
  }
  merge_stage_kernel<uint32_t, 256><<<unsigned(Q), 256, 0, stream>>>(
      k, blocks, reinterpret_cast<const uint32_t*>(keys_in.data_ptr()), idx_in.data_ptr<int64_t>(), sk, si,
      reinterpret_cast<uint32_t*>(keys.data_ptr()), idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace xmodal
