// Top-k similarity search on CUDA.
//
// Few queries (<= 16, k <= 192, not kl): optionally a fused single-pass scan (below, opt-in for now).
// The database is processed in tiles: one cuBLAS GEMM (through ATen, fp32 output with fp32 accumulation
// for 16-bit inputs) scores a block of queries against a tile, then the tile's scores are merged into each
// query's running top-k with in-block radix selects: one block per query when there are many queries,
// else several blocks per query (segments) and a second merge stage. The full Q x N score matrix is never
// materialised (workspace: one score tile). A final kernel sorts and converts keys to values.
// Everything runs on the current stream with no host synchronisation, except the optional check that
// kl inputs are non-negative, which is skipped while a CUDA graph is being captured.
#include "search/topk_common.h"
#include "common/settings.h"
#include "search/planner.h"
#include "search/topk_mma_cuda.cuh"
#include "search/topk_select_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

namespace xmodal {
namespace {


// Single stage (many queries): block `row` merges the query's running top-k with the tile's nt scores.
template <typename acc_t, int kThreads>
__global__ void select_tile_kernel(TileArgs a, const acc_t* __restrict__ scores, const acc_t* __restrict__ zero_hits,
                                   const acc_t* __restrict__ col_term, const typename KeyOf<acc_t>::type* run_key_in,
                                   const int64_t* run_idx_in, typename KeyOf<acc_t>::type* run_key_out,
                                   int64_t* run_idx_out) {
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t row = blockIdx.x;
  const acc_t* srow = scores + row * a.nt;
  const acc_t* zrow = zero_hits ? zero_hits + row * a.nt : nullptr;
  const key_t* kin = run_key_in + row * a.k;
  const int64_t* iin = run_idx_in + row * a.k;
  block_select<key_t, kThreads>(
      a.k + a.nt, a.k,
      [&](int64_t c) -> key_t { return c < a.k ? kin[c] : tile_key<acc_t, key_t>(a, srow, zrow, col_term, c - a.k); },
      [&](int64_t c) -> int64_t { return c < a.k ? iin[c] : a.n0 + (c - a.k); },
      run_key_out + row * a.k, run_idx_out + row * a.k);
}

// Two stages (few queries), so that many blocks share each query's tile. Stage 1: block (row, seg) keeps
// the k best of the segment's columns [seg * seg_len, ...) in staging slots [row, seg, :].
template <typename acc_t, int kThreads>
__global__ void select_segment_kernel(TileArgs a, int64_t seg_len, const acc_t* __restrict__ scores,
                                      const acc_t* __restrict__ zero_hits, const acc_t* __restrict__ col_term,
                                      typename KeyOf<acc_t>::type* stage_key, int64_t* stage_idx) {
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t row = blockIdx.x, seg = blockIdx.y, segments = gridDim.y;
  const int64_t c0 = seg * seg_len;
  const int64_t len = c0 < a.nt ? std::min(seg_len, a.nt - c0) : 0;
  const acc_t* srow = scores + row * a.nt;
  const acc_t* zrow = zero_hits ? zero_hits + row * a.nt : nullptr;
  const int64_t out = (row * segments + seg) * a.k;
  block_select<key_t, kThreads>(
      len, a.k, [&](int64_t c) -> key_t { return tile_key<acc_t, key_t>(a, srow, zrow, col_term, c0 + c); },
      [&](int64_t c) -> int64_t { return a.n0 + c0 + c; }, stage_key + out, stage_idx + out);
}

// Stage 2: block `row` merges the query's running top-k with its `segments` x k staged candidates.
template <typename key_t, int kThreads>
__global__ void merge_stage_kernel(int64_t k, int64_t segments, const key_t* run_key_in, const int64_t* run_idx_in,
                                   const key_t* __restrict__ stage_key, const int64_t* __restrict__ stage_idx,
                                   key_t* run_key_out, int64_t* run_idx_out) {
  const int64_t row = blockIdx.x;
  const key_t* kin = run_key_in + row * k;
  const int64_t* iin = run_idx_in + row * k;
  const key_t* ks = stage_key + row * segments * k;
  const int64_t* is = stage_idx + row * segments * k;
  block_select<key_t, kThreads>(
      k + segments * k, k, [&](int64_t c) -> key_t { return c < k ? kin[c] : ks[c - k]; },
      [&](int64_t c) -> int64_t { return c < k ? iin[c] : is[c - k]; }, run_key_out + row * k, run_idx_out + row * k);
}

// Each query's slots in sorted order -> metric values; empty slots become padding.
template <typename acc_t, typename scalar_t>
__global__ void finalize_kernel(int metric, int64_t total, int64_t k,
                                const typename KeyOf<acc_t>::type* __restrict__ run_key,
                                const int64_t* __restrict__ order, const int64_t* __restrict__ run_idx,
                                const acc_t* __restrict__ qterm, scalar_t* __restrict__ values,
                                int64_t* __restrict__ indices) {
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= total) return;
  const int64_t row = t / k;
  const int64_t slot = row * k + order[t];
  const key_t key = run_key[slot];
  const Metric m = static_cast<Metric>(metric);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  if (key == 0) {
    values[t] = static_cast<scalar_t>(larger_is_better(m) ? -inf : inf);
    indices[t] = -1;
    return;
  }
  acc_t v = decode_key<acc_t>(key);
  switch (m) {
    case Metric::IP: break;
    case Metric::Cosine: v = v * qterm[row]; break;
    case Metric::CosineDistance: {
      const acc_t c = v * qterm[row];
      v = c != c ? c : sqrt(max(acc_t(2) * (acc_t(1) - c), acc_t(0)));
      break;
    }
    case Metric::SqEuclidean:
    case Metric::L2: {
      const acc_t sq = qterm[row] - v;
      v = sq != sq ? sq : (m == Metric::L2 ? sqrt(max(sq, acc_t(0))) : max(sq, acc_t(0)));
      break;
    }
    case Metric::KL: v = qterm[row] - v; break;
  }
  values[t] = static_cast<scalar_t>(v);
  indices[t] = run_idx[slot];
}

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

// ---- How tiles are selected -------------------------------------------------------------------------------
//
// Radix (strategy "tiled"): every tile's scores go through a radix select (verified correct on an H200).
// Filter ("filtered"): threshold-filtered selection of cuBLAS score tiles.
// FusedMma ("tensor_core"): 16-bit inputs, tiles after the first scored and filtered by mma_filter_kernel
// with no score tile. The planner checks each strategy's limits before a call gets here.
enum class TileSelection { Radix, Filter, FusedMma };

TileSelection tile_selection(Strategy strategy) {
  switch (strategy) {
    case Strategy::Filtered: return TileSelection::Filter;
    case Strategy::TensorCore: return TileSelection::FusedMma;
    default: return TileSelection::Radix;
  }
}

// Rows of the tile starting at row `seen`. Radix tiles are as large as the score workspace allows.
// Filtered: the first tile is small (a full select over it sets each query's threshold), and later tiles
// grow with the rows seen so that the candidates expected per query (~ k * rows / seen) fill at most half
// the buffer. Fused tiles have no score workspace to bound them.
int64_t next_tile_rows(TileSelection sel, int64_t seen, int64_t k, int64_t cap, int64_t score_tile_rows) {
  if (sel == TileSelection::Radix) return score_tile_rows;
  if (seen == 0) return std::min(score_tile_rows, std::max<int64_t>(8192, 4 * k));
  const int64_t grow = std::max<int64_t>(4096, seen * cap / (2 * k));
  if (sel == TileSelection::Filter) return std::min(score_tile_rows, grow);
  return std::min<int64_t>({grow, kMmaMaxTileRows, max_tile_rows()});
}

// scores [qn, nt] (fp32, row-major) = a [qn, D] . b [nt, D]^T through cuBLAS with TF32 tensor-core compute.
// A direct call, so the choice applies to this GEMM only (not to the process-wide matmul precision).
at::Tensor mm_tf32(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t qn = ac.size(0), nt = bc.size(0), D = ac.size(1);
  at::Tensor c = at::empty({qn, nt}, ac.options());
  if (qn == 0 || nt == 0) return c;
  if (D == 0) return c.zero_();
  TORCH_CHECK(qn < INT32_MAX && nt < INT32_MAX && D < INT32_MAX, "tf32 GEMM sizes must fit in int32");
  const float alpha = 1.f, beta = 0.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasSetStream(handle, at::cuda::getCurrentCUDAStream()));
  // column-major view: C^T [nt, qn] = B [nt, D] . A^T, i.e. op(B') = T on the stored [D, nt] matrix
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(nt), int(qn), int(D), &alpha,
                                    bc.data_ptr<float>(), CUDA_R_32F, int(D), ac.data_ptr<float>(), CUDA_R_32F, int(D),
                                    &beta, c.data_ptr<float>(), CUDA_R_32F, int(nt), CUBLAS_COMPUTE_32F_FAST_TF32,
                                    CUBLAS_GEMM_DEFAULT));
  return c;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> search_cuda(const SearchArgs& args, const Plan& plan, bool tf32) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using key_t = typename KeyOf<acc_t>::type;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Metric metric = args.metric;
  const at::Tensor& queries = args.queries;
  const at::Tensor& database = args.database;
  const int64_t Q = queries.size(0), N = database.size(0), k = args.k;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto fopts = queries.options().dtype(acc_dtype);

  // Per-query terms (see topk_common.h) and the operand that multiplies the tiles.
  at::Tensor qterm = row_norm_term(queries, metric, acc_dtype), qgemm = queries, qpos;
  if (metric == Metric::KL) {
    qgemm = queries.to(acc_dtype);
    qterm = at::xlogy(qgemm, qgemm).sum(1);
    qpos = (qgemm > 0).to(acc_dtype);
  }
  if (!qterm.defined()) qterm = at::zeros({Q}, fopts);
  qterm = qterm.contiguous();
  const bool validate_kl = metric == Metric::KL && at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None;
  at::Tensor negatives = validate_kl ? (qgemm < 0).sum() : at::Tensor();

  // Running top-k (ping-pong buffers). Score tiles stay under ~256 MiB. The fused few-query scan needs none
  // of the tile state below (it computes row norms as it reads the rows).
  const bool fused = plan.strategy == Strategy::FusedScan;
  const TileSelection selection = tile_selection(plan.strategy);
  const bool filtered = !fused && selection != TileSelection::Radix;
  const int64_t query_block = std::min<int64_t>(Q, filtered ? 16384 : 65536);
  const int64_t score_tile_rows = std::min<int64_t>(
      max_tile_rows(), std::max<int64_t>(1024, (int64_t(64) << 20) / query_block));
  auto keys_a = at::zeros({Q, k}, queries.options().dtype(sizeof(key_t) == 4 ? at::kInt : at::kLong));
  auto keys_b = at::empty_like(keys_a);
  auto idx_a = at::full({Q, k}, -1, queries.options().dtype(at::kLong));
  auto idx_b = at::empty_like(idx_a);
  const bool* mask = args.mask ? args.mask->data_ptr<bool>() : nullptr;
  // The metric's per-row term of the whole database, once (tiles take slices).
  at::Tensor col_all = fused ? at::Tensor() : row_norm_term(database, metric, acc_dtype);
  if (col_all.defined()) col_all = col_all.contiguous();

  // Threshold filter state (see topk_select_cuda.cuh): per query a threshold and a counter, per query of a
  // block a candidate buffer of 4k slots (1024 to 8192; fewer where 12 bytes x cap x queries would pass
  // 512 MiB). Larger buffers let tiles grow faster (next_tile_rows).
  at::Tensor thr, count, cand_key, cand_idx;
  int64_t cap = 0;
  if (filtered) {
    cap = std::clamp<int64_t>(4 * k, 1024, 8192);
    cap = std::max<int64_t>(256, std::min<int64_t>(cap, (int64_t(512) << 20) / (query_block * int64_t(sizeof(key_t) + 8))));
    thr = at::zeros({Q}, keys_a.options());
    count = at::zeros({Q}, queries.options().dtype(at::kInt));
    cand_key = at::empty({query_block, cap}, keys_a.options());
    cand_idx = at::empty({query_block, cap}, idx_a.options());
  }
  auto filter_buffers = [&](int64_t q0) {
    return FilterBuffers{reinterpret_cast<key_t*>(thr.data_ptr()) + q0, count.data_ptr<int>() + q0, int(cap),
                         cand_key.data_ptr(), cand_idx.data_ptr<int64_t>()};
  };

  constexpr int kThreads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if constexpr (!std::is_same_v<scalar_t, double>) {  // the planner never sends float64 to the fused scan
    if (fused) {
      fused_scan<scalar_t>(args, keys_a, idx_a, keys_b, idx_b);  // from the empty top-k, as each tile below
      std::swap(keys_a, keys_b);
      std::swap(idx_a, idx_b);
    }
  }
  for (int64_t n0 = 0, nt = 0; n0 < N && !fused; n0 += nt) {
    // The first filtered tile sets the thresholds (with a full select over it), so it goes through a score tile.
    const bool mma_tile = selection == TileSelection::FusedMma && n0 > 0;
    nt = std::min(N - n0, next_tile_rows(selection, n0, k, cap, score_tile_rows));
    at::Tensor tile = database.narrow(0, n0, nt);
    at::Tensor tgemm = tile, col = col_all.defined() ? col_all.narrow(0, n0, nt) : at::Tensor(), zeros;
    if (metric == Metric::KL) {
      at::Tensor d = tile.to(acc_dtype);
      if (validate_kl) negatives = negatives + (d < 0).sum();
      at::Tensor zero = d == 0;
      tgemm = at::log(d).masked_fill_(zero, 0);
      zeros = zero.to(acc_dtype);
    }
    const acc_t* col_ptr = col.defined() ? col.data_ptr<acc_t>() : nullptr;
    for (int64_t q0 = 0; q0 < Q; q0 += query_block) {
      const int64_t qn = std::min(Q, q0 + query_block) - q0;
      TileArgs ta{static_cast<int>(metric), n0, nt, k, mask};
      const key_t* kin = reinterpret_cast<const key_t*>(keys_a.data_ptr()) + q0 * k;
      key_t* kout = reinterpret_cast<key_t*>(keys_b.data_ptr()) + q0 * k;
      const int64_t* iin = idx_a.data_ptr<int64_t>() + q0 * k;
      int64_t* iout = idx_b.data_ptr<int64_t>() + q0 * k;
      if (mma_tile) {
        if constexpr (sizeof(scalar_t) == 2) {
          const at::Tensor qa = queries.narrow(0, q0, qn);
          MmaTileArgs ma{qa.data_ptr(), tile.data_ptr(), qn, nt, database.size(1), n0, static_cast<int>(metric),
                         reinterpret_cast<const float*>(col_ptr), mask ? mask + n0 : nullptr, filter_buffers(q0)};
          const dim3 grid(unsigned((qn + kMmaRows - 1) / kMmaRows), unsigned((nt + kMmaRows - 1) / kMmaRows));
          mma_filter_kernel<scalar_t><<<grid, kMmaThreads, 0, stream>>>(ma);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          RecomputedKeys<scalar_t> keys{ta, qa.data_ptr<scalar_t>(), tile.data_ptr<scalar_t>(), database.size(1),
                                        reinterpret_cast<const float*>(col_ptr)};
          merge_filtered_kernel<key_t, kThreads><<<unsigned(qn), kThreads, 0, stream>>>(keys, filter_buffers(q0), kin, iin,
                                                                                        kout, iout);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        continue;
      }
      at::Tensor qa = qgemm.narrow(0, q0, qn);
      const bool use_tf32 = tf32 && qa.scalar_type() == at::kFloat && tgemm.scalar_type() == at::kFloat;
      at::Tensor scores = use_tf32 ? mm_tf32(qa, tgemm)
                                   : (qa.scalar_type() == acc_dtype ? at::mm(qa, tgemm.t()) : at::mm(qa, tgemm.t(), acc_dtype))
                                         .contiguous();
      at::Tensor zero_hits;
      if (metric == Metric::KL) zero_hits = at::mm(qpos.narrow(0, q0, qn), zeros.t()).contiguous();
      const acc_t* zero_ptr = zero_hits.defined() ? zero_hits.data_ptr<acc_t>() : nullptr;
      if (filtered) {
        ScoreTileKeys<acc_t> keys{ta, scores.data_ptr<acc_t>(), zero_ptr, col_ptr};
        constexpr int kItems = 8;
        const int64_t chunks = (nt + kThreads * kItems - 1) / (kThreads * kItems);
        filter_tile_kernel<acc_t, kThreads, kItems><<<dim3(unsigned(qn), unsigned(chunks)), kThreads, 0, stream>>>(
            keys, filter_buffers(q0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_filtered_kernel<key_t, kThreads><<<unsigned(qn), kThreads, 0, stream>>>(keys, filter_buffers(q0), kin, iin,
                                                                                      kout, iout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        continue;
      }
      // Few queries: split each query's tile over several blocks so the whole GPU works on it.
      int64_t segments = std::min({(4 * sms + qn - 1) / qn, std::max<int64_t>(1, (int64_t(64) << 10) / k),
                                   std::max<int64_t>(1, nt / std::max<int64_t>(k, 1024))});
      segments = std::max<int64_t>(segments, 1);
      if (segments == 1) {
        select_tile_kernel<acc_t, kThreads><<<qn, kThreads, 0, stream>>>(ta, scores.data_ptr<acc_t>(), zero_ptr, col_ptr,
                                                                         kin, iin, kout, iout);
      } else {
        const int64_t seg_len = (nt + segments - 1) / segments;
        segments = (nt + seg_len - 1) / seg_len;
        auto stage_key = at::empty({qn, segments, k}, keys_a.options());
        auto stage_idx = at::empty({qn, segments, k}, idx_a.options());
        select_segment_kernel<acc_t, kThreads><<<dim3(unsigned(qn), unsigned(segments)), kThreads, 0, stream>>>(
            ta, seg_len, scores.data_ptr<acc_t>(), zero_ptr, col_ptr, reinterpret_cast<key_t*>(stage_key.data_ptr()),
            stage_idx.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_stage_kernel<key_t, kThreads><<<qn, kThreads, 0, stream>>>(
            k, segments, kin, iin, reinterpret_cast<const key_t*>(stage_key.data_ptr()), stage_idx.data_ptr<int64_t>(),
            kout, iout);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    std::swap(keys_a, keys_b);
    std::swap(idx_a, idx_b);
  }
  if (validate_kl) {
    TORCH_CHECK(negatives.item<int64_t>() == 0,
                "queries and database must be non-negative with metric 'kl', found a negative entry");
  }

  // Sort each query's k slots best first: as int64, unsigned 32-bit keys are already ordered, and 64-bit
  // keys are ordered once their top bit is flipped.
  at::Tensor sort_keys = sizeof(key_t) == 4 ? keys_a.to(at::kLong).bitwise_and(0xffffffffLL)
                                            : keys_a.bitwise_xor(std::numeric_limits<int64_t>::min());
  at::Tensor order = std::get<1>(at::sort(sort_keys, /*stable=*/true, /*dim=*/1, /*descending=*/true)).contiguous();
  auto values = at::empty({Q, k}, queries.options());
  auto indices = at::empty({Q, k}, queries.options().dtype(at::kLong));
  const int64_t total = Q * k;
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = (total + threads - 1) / threads;
    finalize_kernel<acc_t, scalar_t><<<blocks, threads, 0, stream>>>(
        static_cast<int>(metric), total, k, reinterpret_cast<const key_t*>(keys_a.data_ptr()),
        order.data_ptr<int64_t>(), idx_a.data_ptr<int64_t>(), qterm.data_ptr<acc_t>(), values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return finish_results(args, values, indices);
}

std::tuple<at::Tensor, at::Tensor> topk_search_cuda(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                                    c10::string_view metric, const std::optional<at::Tensor>& mask,
                                                    bool tf32, c10::string_view strategy) {
  // Kernels run below autograd (the op's autograd formula is registered in Python); the guard makes sure
  // the ATen calls below never record history, however the kernel is reached.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  SearchArgs args = validate_search_args(queries, database, k, std::string(metric), mask);
  c10::cuda::CUDAGuard guard(database.device());
  const Plan plan = plan_search(device_facts(database.device()), search_shape(args), parse_strategy(std::string(strategy)));
  if (args.queries.size(0) == 0 || database.size(0) == 0) return padded_results(args);
  if (plan.strategy == Strategy::Aten) return aten_search(args);
  TORCH_CHECK(plan.strategy != Strategy::FusedScan || fused_scan_fits(args),
              "strategy 'fused_scan' cannot run this search: its queries and candidate buffers need more than 96 KiB "
              "of shared memory at D = ", database.size(1), " and k = ", k);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, database.scalar_type(), "topk_search_cuda",
                                         [&] { return search_cuda<scalar_t>(args, plan, tf32); });
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CUDA, m) {
  m.impl("topk_search", &topk_search_cuda);
}

}  // namespace xmodal
