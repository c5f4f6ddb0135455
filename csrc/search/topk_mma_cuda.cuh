// Fused score-and-filter tile kernel for float16 / bfloat16 inputs (included by topk_search_cuda.cu only).
//
// A block scores 128 queries against 128 database rows on the tensor cores (mma.sync m16n8k16, fp32
// accumulation; operands staged in shared memory by cp.async, two stages over D in steps of 32) and its
// epilogue turns each score into its key in registers and appends only the keys above the query's running
// threshold to the query's candidate buffer (see "Threshold-filtered selection" in topk_select_cuda.cuh).
// Scores never reach memory. Needs sm_80 or newer; the host checks the device before choosing it.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs; g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major):  reg0 (g, 2t..2t+1)  reg1 (g+8, 2t..)  reg2 (g, 2t+8..)  reg3 (g+8, 2t+8..)
//   B (16 x 8, "col": k contiguous per n, as database rows are):  reg0 (k 2t..2t+1, n g)  reg1 (k 2t+8.., n g)
//   C (16 x 8, fp32):  c0, c1 at (g, 2t), (g, 2t+1);  c2, c3 at (g+8, 2t), (g+8, 2t+1)
// ldmatrix.x4 loads four 8 x 8 matrices whose row addresses come from lanes 0-7, 8-15, 16-23 and 24-31,
// and gives each lane the pair at (lane / 4, 2 (lane % 4)) of each: the layouts above.
// tests/device_models/mma_filter_layout.py models this kernel lane by lane (no GPU needed).
#pragma once
#include "search/topk_select_cuda.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace xmodal {
namespace {

constexpr int kMmaRows = 128;        // queries per block and database rows per block
constexpr int kMmaStep = 32;         // D per pipeline stage
constexpr int kMmaLd = kMmaStep + 8;  // shared row stride in elements: 80 bytes, so ldmatrix rows hit distinct banks
constexpr int kMmaThreads = 256;     // 8 warps: 2 (queries) x 4 (rows), each 64 x 32 scores
constexpr int64_t kMmaMaxTileRows = int64_t(65535) * kMmaRows;  // gridDim.y is at most 65535

struct MmaTileArgs {
  const void* queries;   // [qn, D] of the query block
  const void* database;  // the tile: [nt, D]
  int64_t qn, nt, D, n0;  // n0: global index of the tile's first row
  int metric;
  const float* col_term;  // [nt] or nullptr
  const bool* mask;       // [nt] (the tile's part) or nullptr
  FilterBuffers f;        // rows of the query block
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Grid: (queries / 128, tile rows / 128), kMmaThreads threads: the blocks of one database tile run next to
// each other, so its rows come from HBM once and from L2 for the other query blocks.
template <typename scalar_t>
__global__ void __launch_bounds__(kMmaThreads, 2) mma_filter_kernel(MmaTileArgs p) {
  static_assert(sizeof(scalar_t) == 2, "16-bit inputs only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) uint16_t qs[2][kMmaRows * kMmaLd];  // queries, two stages
  __shared__ __align__(16) uint16_t xs[2][kMmaRows * kMmaLd];  // database rows, two stages
  __shared__ uint32_t s_thr[kMmaRows];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_q = warp >> 2, warp_n = warp & 3;  // this warp's 64 queries x 32 rows
  const int64_t qb = int64_t(blockIdx.x) * kMmaRows, nb = int64_t(blockIdx.y) * kMmaRows;
  const uint16_t* queries = static_cast<const uint16_t*>(p.queries);
  const uint16_t* database = static_cast<const uint16_t*>(p.database);
  const uint32_t* thr = static_cast<const uint32_t*>(p.f.thr);
  for (int i = tid; i < kMmaRows; i += kMmaThreads) s_thr[i] = qb + i < p.qn ? thr[qb + i] : 0u;

  // 128 rows x 4 chunks of 8 elements per operand and stage: two chunks of each per thread. Rows past
  // the end and D past its end load zeros (D is a multiple of 8, so a chunk is wholly in or out).
  auto load_stage = [&](int stage, int64_t d0) {
#pragma unroll
    for (int c = tid; c < kMmaRows * (kMmaStep / 8); c += kMmaThreads) {
      const int r = c >> 2, col = (c & 3) * 8;
      const bool d_ok = d0 + col < p.D;
      const bool q_ok = d_ok && qb + r < p.qn;
      const bool x_ok = d_ok && nb + r < p.nt;
      cp_async_16(&qs[stage][r * kMmaLd + col], q_ok ? queries + (qb + r) * p.D + d0 + col : queries, q_ok);
      cp_async_16(&xs[stage][r * kMmaLd + col], x_ok ? database + (nb + r) * p.D + d0 + col : database, x_ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int steps = int((p.D + kMmaStep - 1) / kMmaStep);
  load_stage(0, 0);
  cp_async_commit();
  for (int s = 0; s < steps; ++s) {
    if (s + 1 < steps) {
      load_stage((s + 1) & 1, int64_t(s + 1) * kMmaStep);  // its buffer was last read in step s - 1
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* qst = qs[s & 1];
    const uint16_t* xst = xs[s & 1];
#pragma unroll
    for (int kk = 0; kk < kMmaStep; kk += 16) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        ldmatrix_x4(a[mi], qst + (warp_q * 64 + mi * 16 + (lane & 15)) * kMmaLd + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, xst + (warp_n * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * kMmaLd + kk +
                           ((lane >> 3) & 1) * 8);
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<scalar_t>(acc[mi][ni], a[mi], b[ni]);
    }
    __syncthreads();
  }

  // Epilogue: this thread's 8 columns (rows of the tile) and 8 query rows.
  const int g = lane >> 2, t4 = lane & 3;
  const Metric m = static_cast<Metric>(p.metric);
  float col[4][2];
  bool live[4][2];
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t n = nb + warp_n * 32 + ni * 8 + t4 * 2 + e;
      live[ni][e] = n < p.nt && (p.mask == nullptr || p.mask[n]);
      col[ni][e] = (p.col_term != nullptr && n < p.nt) ? p.col_term[n] : 0.f;
    }
  uint32_t* cand_key = static_cast<uint32_t*>(p.f.cand_key);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_q * 64 + mi * 16 + g + h * 8;
      const int64_t q = qb + r;
      const uint32_t t = s_thr[r];
      if (q >= p.qn || t == 0u) continue;  // an unset threshold: the merge selects over the whole tile
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (!live[ni][e]) continue;
          const uint32_t key = encode_key<float>(score_to_rank<float>(m, acc[mi][ni][h * 2 + e], col[ni][e], 0.f));
          if (key > t) {
            const int pos = atomicAdd(&p.f.count[q], 1);
            if (pos < p.f.cap) {
              cand_key[q * p.f.cap + pos] = key;
              p.f.cand_idx[q * p.f.cap + pos] = p.n0 + nb + warp_n * 32 + ni * 8 + t4 * 2 + e;
            }
          }
        }
    }
#else
  __trap();  // the host never launches this below sm_80
#endif
}

}  // namespace
}  // namespace xmodal
