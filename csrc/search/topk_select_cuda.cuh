// Device-side k-selection for the CUDA top-k search (included by topk_search_cuda.cu only): ordered keys,
// a block-wide radix select, the threshold filter that lets a tile's consumer keep only the scores that can
// still enter a query's top-k, and the kernels that merge a score tile into each query's running top-k.
#pragma once
#include "search/topk_common.h"

#include <cstdint>
#include <limits>

namespace xmodal {
namespace {

// Order-preserving unsigned keys (larger is better). 0 marks "no candidate" (empty slot or masked row);
// NaN maps to 1, below every number.
template <typename acc_t> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

template <typename acc_t, typename key_t = typename KeyOf<acc_t>::type>
__device__ __forceinline__ key_t encode_key(acc_t v) {
  constexpr key_t sign = key_t(1) << (8 * sizeof(key_t) - 1);
  key_t b;
  memcpy(&b, &v, sizeof b);
  const key_t o = (b & sign) ? ~b : (b | sign);
  return v != v ? key_t(1) : o;
}

template <typename acc_t, typename key_t = typename KeyOf<acc_t>::type>
__device__ __forceinline__ acc_t decode_key(key_t o) {
  constexpr key_t sign = key_t(1) << (8 * sizeof(key_t) - 1);
  if (o == key_t(1)) return acc_t(NAN);
  const key_t b = (o & sign) ? (o & ~sign) : ~o;
  acc_t v;
  memcpy(&v, &b, sizeof v);
  return v;
}

struct TileArgs {
  int metric;        // Metric
  int64_t n0;        // first database row of the tile
  int64_t nt;        // rows in the tile
  int64_t k;
  const bool* mask;  // [N] or nullptr
};

// A score's key (see topk_common.h for the forms); col is the column's norm term, zero_hit > 0 marks a kl
// column with d_i = 0 where q_i > 0.
template <typename acc_t>
__device__ __forceinline__ acc_t score_to_rank(Metric m, acc_t s, acc_t col, acc_t zero_hit) {
  switch (m) {
    case Metric::IP: return s;
    case Metric::Cosine:
    case Metric::CosineDistance: return s * col;
    case Metric::L2:
    case Metric::SqEuclidean: return 2 * s - col;
    case Metric::KL: return zero_hit > 0 ? -std::numeric_limits<acc_t>::infinity() : s;
  }
  return s;
}

// Key of tile column j for the query whose score row is `score`.
template <typename acc_t, typename key_t>
__device__ __forceinline__ key_t tile_key(const TileArgs& a, const acc_t* score, const acc_t* zero_hits,
                                          const acc_t* col_term, int64_t j) {
  if (a.mask && !a.mask[a.n0 + j]) return key_t(0);
  const Metric m = static_cast<Metric>(a.metric);
  const acc_t col = col_term ? col_term[j] : acc_t(0);
  const acc_t zero_hit = m == Metric::KL ? zero_hits[j] : acc_t(0);
  return encode_key<acc_t>(score_to_rank<acc_t>(m, score[j], col, zero_hit));
}

// k-selection by one thread block: from `total` candidates (key_at(c), index_at(c)) keep the k with the
// largest keys, written unordered to kout/iout (their order is settled by the final sort). An MSB-first
// radix select (8 bits a pass) finds the k-th largest key T; keys > T and enough keys == T are kept.
// With fewer than k candidates all are kept and the rest is padded (key 0, index -1).
template <typename key_t, int kThreads, typename KeyAt, typename IndexAt>
__device__ void block_select(int64_t total, int64_t k, KeyAt key_at, IndexAt index_at, key_t* kout, int64_t* iout) {
  if (total <= k) {
    for (int64_t c = threadIdx.x; c < k; c += kThreads) {
      const key_t key = c < total ? key_at(c) : key_t(0);
      kout[c] = key;
      iout[c] = key == 0 ? -1 : index_at(c);
    }
    return;
  }
  __shared__ unsigned int hist[256];
  __shared__ key_t s_prefix;
  __shared__ int64_t s_need;
  __shared__ unsigned long long s_gt, s_eq;

  key_t prefix = 0, prefix_mask = 0;
  int64_t need = k;  // rank of the wanted key among those matching the prefix
  for (int shift = 8 * int(sizeof(key_t)) - 8; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t c = threadIdx.x; c < total; c += kThreads) {
      const key_t key = key_at(c);
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (above + hist[b] >= need) break;
        above += hist[b];
      }
      s_prefix = prefix | (key_t(b) << shift);
      s_need = need - above;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    prefix_mask |= key_t(0xff) << shift;
    __syncthreads();
  }
  // prefix is now the k-th largest key; `need` of the keys equal to it are kept.
  if (threadIdx.x == 0) {
    s_gt = 0;
    s_eq = 0;
  }
  __syncthreads();
  const int64_t first_eq = k - need;
  for (int64_t c = threadIdx.x; c < total; c += kThreads) {
    const key_t key = key_at(c);
    int64_t slot = -1;
    if (key > prefix) {
      slot = int64_t(atomicAdd(&s_gt, 1ull));
    } else if (key == prefix) {
      const int64_t e = int64_t(atomicAdd(&s_eq, 1ull));
      if (e < need) slot = first_eq + e;
    }
    if (slot >= 0) {
      kout[slot] = key;
      iout[slot] = key == 0 ? -1 : index_at(c);
    }
  }
}

// ---- Threshold-filtered selection -------------------------------------------------------------------------
//
// Each query keeps a threshold: the smallest key in its running top-k (0 until k real candidates exist).
// A tile's consumer appends only keys above it to the query's candidate buffer (cap slots, counted with an
// atomic counter), and one block per query then selects the new top-k from the running k plus those few
// candidates, and raises the threshold. A key equal to the threshold cannot improve the top-k's values, so
// ties never flood the buffer. When the threshold is still 0 or the buffer overflowed, the merge selects
// over the whole tile instead, so the result is exact whatever the data's order; the host sizes tiles so
// that overflows are rare (about k * tile rows / rows seen candidates are expected for rows in random order).

__device__ __forceinline__ void atomic_min_key(uint32_t* p, uint32_t v) { atomicMin(p, v); }
__device__ __forceinline__ void atomic_min_key(uint64_t* p, uint64_t v) {
  atomicMin(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

// Keys of a tile held as a score matrix [rows, nt] (a cuBLAS GEMM's output).
template <typename acc_t>
struct ScoreTileKeys {
  using key_t = typename KeyOf<acc_t>::type;
  TileArgs a;
  const acc_t* scores;
  const acc_t* zero_hits;  // kl only
  const acc_t* col_term;   // [nt] or nullptr
  __device__ key_t operator()(int64_t row, int64_t j) const {
    return tile_key<acc_t, key_t>(a, scores + row * a.nt, zero_hits ? zero_hits + row * a.nt : nullptr, col_term, j);
  }
};

// Keys of a tile whose scores were never stored (the fused tensor-core path): recomputed from the rows,
// in fp32. Only a merge whose candidate buffer overflowed needs them.
template <typename scalar_t>
struct RecomputedKeys {
  using key_t = uint32_t;
  TileArgs a;
  const scalar_t* queries;  // [rows, D]
  const scalar_t* database; // the tile: [nt, D]
  int64_t D;
  const float* col_term;    // [nt] or nullptr
  __device__ key_t operator()(int64_t row, int64_t j) const {
    if (a.mask && !a.mask[a.n0 + j]) return 0u;
    const scalar_t* q = queries + row * D;
    const scalar_t* x = database + j * D;
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += static_cast<float>(q[d]) * static_cast<float>(x[d]);
    return encode_key<float>(score_to_rank<float>(static_cast<Metric>(a.metric), s, col_term ? col_term[j] : 0.f, 0.f));
  }
};

struct FilterBuffers {
  void* thr;        // [rows] key_t
  int* count;       // [rows]
  int cap;
  void* cand_key;   // [rows, cap] key_t
  int64_t* cand_idx;
};

// Block (row, chunk): appends the chunk's keys above the row's threshold (warp-aggregated atomics).
template <typename acc_t, int kThreads, int kItems>
__global__ void filter_tile_kernel(ScoreTileKeys<acc_t> keys, FilterBuffers f) {
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t row = blockIdx.x;
  const key_t t = static_cast<const key_t*>(f.thr)[row];
  if (t == 0) return;  // no full top-k yet: the merge selects over the whole tile
  const int lane = threadIdx.x & 31;
  key_t* ck = static_cast<key_t*>(f.cand_key) + row * f.cap;
  int64_t* ci = f.cand_idx + row * f.cap;
  for (int it = 0; it < kItems; ++it) {
    const int64_t j = (int64_t(blockIdx.y) * kItems + it) * kThreads + threadIdx.x;
    const key_t key = j < keys.a.nt ? keys(row, j) : key_t(0);
    const bool pass = key > t;
    const unsigned ballot = __ballot_sync(0xffffffffu, pass);
    if (ballot == 0) continue;
    int base = 0;
    if (lane == 0) base = atomicAdd(&f.count[row], __popc(ballot));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (pass) {
      const int pos = base + __popc(ballot & ((1u << lane) - 1u));
      if (pos < f.cap) {
        ck[pos] = key;
        ci[pos] = keys.a.n0 + j;
      }
    }
  }
}

// Block `row`: the new running top-k from the old one plus the row's candidates (or the whole tile when
// the buffer overflowed or the threshold is unset); then the threshold rises and the counter resets.
template <typename key_t, int kThreads, typename Keys>
__global__ void merge_filtered_kernel(Keys keys, FilterBuffers f, const key_t* run_key_in, const int64_t* run_idx_in,
                                      key_t* run_key_out, int64_t* run_idx_out) {
  const int64_t row = blockIdx.x, k = keys.a.k, nt = keys.a.nt, n0 = keys.a.n0;
  key_t* thr = static_cast<key_t*>(f.thr);
  __shared__ int s_count;
  __shared__ bool s_whole;
  __shared__ key_t s_min;
  if (threadIdx.x == 0) {
    s_count = f.count[row];
    s_whole = thr[row] == 0 || s_count > f.cap;
    s_min = std::numeric_limits<key_t>::max();
  }
  __syncthreads();
  const key_t* kin = run_key_in + row * k;
  const int64_t* iin = run_idx_in + row * k;
  key_t* kout = run_key_out + row * k;
  int64_t* iout = run_idx_out + row * k;
  if (s_whole) {
    block_select<key_t, kThreads>(
        k + nt, k, [&](int64_t c) -> key_t { return c < k ? kin[c] : keys(row, c - k); },
        [&](int64_t c) -> int64_t { return c < k ? iin[c] : n0 + (c - k); }, kout, iout);
  } else {
    const key_t* ck = static_cast<const key_t*>(f.cand_key) + row * f.cap;
    const int64_t* ci = f.cand_idx + row * f.cap;
    block_select<key_t, kThreads>(
        k + s_count, k, [&](int64_t c) -> key_t { return c < k ? kin[c] : ck[c - k]; },
        [&](int64_t c) -> int64_t { return c < k ? iin[c] : ci[c - k]; }, kout, iout);
  }
  __syncthreads();
  key_t lo = std::numeric_limits<key_t>::max();
  for (int64_t c = threadIdx.x; c < k; c += kThreads) lo = kout[c] < lo ? kout[c] : lo;
  atomic_min_key(&s_min, lo);
  __syncthreads();
  if (threadIdx.x == 0) {
    thr[row] = s_min;  // 0 while a slot is still empty
    f.count[row] = 0;
  }
}

// ---- Merging a score tile into the running top-k (the "tiled" strategy and the fused scan's last stage) ----

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

}  // namespace
}  // namespace xmodal
