// The AVX-512 kernels of the CPU scan (cpu_scan.h): fp32 / bf16 / fp16 rows converted to fp32 in registers
// and FMA'd (AVX-512F), bf16 rows multiplied natively (AVX512-BF16), bf16 rows through the AMX tile unit, and
// the squared norms of rows. Each function carries its own target attribute; cpu_scan.cpp calls them only
// when the planner's ScanIsa says the CPU has the instructions.
#include "search/cpu_scan_kernels.h"

#include <cstring>
#include <vector>

#if defined(XMODAL_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef XMODAL_X86
namespace xmodal {
namespace {

// Each step loads a chunk of kR rows once (converting 16-bit values to fp32 once) and multiplies it with up
// to kQ queries: kQ x kR accumulators. Query groups of kQ go through the same kR rows while they sit in L1.

// Writes the kQ x kR sums: four rows of a query at once where kR is 4.
template <int kQ, int kR>
XMODAL_AVX512 inline void store_sums_avx512(__m512 (&acc)[kQ][kR], float* out, int64_t ldo) {
  for (int i = 0; i < kQ; ++i) {
    if constexpr (kR == 4) {
      _mm_storeu_ps(out + i * ldo, reduce4_avx512(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    } else {
      for (int r = 0; r < kR; ++r) out[i * ldo + r] = _mm512_reduce_add_ps(acc[i][r]);
    }
  }
}

template <int kQ, int kR, typename T>
XMODAL_AVX512 void block_avx512(const float* q, int64_t D, const T* const* rows, float* out, int64_t ldo) {
  __m512 acc[kQ][kR];
  for (int i = 0; i < kQ; ++i)
    for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t full = D / 16 * 16;
  for (int64_t d = 0; d < full; d += 16) {  // unmasked loads: masked ones are slow on some CPUs
    __m512 x[kR];
    for (int r = 0; r < kR; ++r) {
      if constexpr (kR > 1) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kR * D + d), _MM_HINT_T0);
      x[r] = load_avx512(rows[r] + d);
    }
    for (int i = 0; i < kQ; ++i) {
      const __m512 qv = _mm512_loadu_ps(q + i * D + d);
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_fmadd_ps(qv, x[r], acc[i][r]);
    }
  }
  if (full < D) {
    const __mmask16 m = __mmask16((1u << (D - full)) - 1);
    __m512 x[kR];
    for (int r = 0; r < kR; ++r) x[r] = load_avx512(rows[r] + full, m);
    for (int i = 0; i < kQ; ++i) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + i * D + full);
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_fmadd_ps(qv, x[r], acc[i][r]);
    }
  }
  store_sums_avx512<kQ, kR>(acc, out, ldo);
}

// ---- AVX512-BF16: bf16 rows and queries multiplied in pairs by vdpbf16ps (fp32 accumulation), so the rows
// need no conversion: half the instructions of converting and FMA-ing. Exact products (bf16 x bf16 fits
// fp32); the queries are bf16 inputs, so nothing is rounded that the caller gave in more precision.

template <int kQ, int kR, typename T>  // T is c10::BFloat16 (a parameter so one dispatch macro serves all)
XMODAL_AVX512BF16 void block_avx512bf16(const T* q, int64_t D, const T* const* rows, float* out, int64_t ldo) {
  __m512 acc[kQ][kR];
  for (int i = 0; i < kQ; ++i)
    for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t full = D / 32 * 32;
  for (int64_t d = 0; d < full; d += 32) {
    __m512bh x[kR];
    for (int r = 0; r < kR; ++r) {
      if constexpr (kR > 1) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kR * D + d), _MM_HINT_T0);
      x[r] = (__m512bh)_mm512_loadu_si512(rows[r] + d);
    }
    for (int i = 0; i < kQ; ++i) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + i * D + d);
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], qv, x[r]);
    }
  }
  store_sums_avx512<kQ, kR>(acc, out, ldo);
  for (int64_t d = full; d < D; ++d)  // the last D % 32 elements
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) out[i * ldo + r] += float(q[i * D + d]) * float(rows[r][d]);
}

}  // namespace

// Squared norms of bf16 rows with the same instruction (exact products, fp32 sums): converting the rows to
// fp32 for FMAs cost as much as the whole dot-product scan of one query.
XMODAL_AVX512BF16 void squared_norms_avx512bf16(const c10::BFloat16* x, int64_t ld, int64_t n, int64_t D, float* out) {
  const int64_t full = D / 32 * 32;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four rows at a time share one horizontal reduction
    __m512 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < full; d += 32)
      for (int r = 0; r < 4; ++r) {
        // the next rows' bytes requested ahead, as the dot-product blocks do: this pass is the one that
        // brings the rows in from memory
        _mm_prefetch(reinterpret_cast<const char*>(x + (j + r + 8) * ld + d), _MM_HINT_T0);
        const __m512bh v = (__m512bh)_mm512_loadu_si512(x + (j + r) * ld + d);
        a[r] = _mm512_dpbf16_ps(a[r], v, v);
      }
    _mm_storeu_ps(out + j, reduce4_avx512(a[0], a[1], a[2], a[3]));
    for (int r = 0; r < 4; ++r)
      for (int64_t d = full; d < D; ++d) out[j + r] += float(x[(j + r) * ld + d]) * float(x[(j + r) * ld + d]);
  }
  for (; j < n; ++j) {
    const c10::BFloat16* row = x + j * ld;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < full; d += 32) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(row + d);
      a = _mm512_dpbf16_ps(a, v, v);
    }
    float s = _mm512_reduce_add_ps(a);
    for (int64_t d = full; d < D; ++d) s += float(row[d]) * float(row[d]);
    out[j] = s;
  }
}

// ---- AMX: one tdpbf16ps multiplies 16 rows x 32 bf16 values by up to 16 queries (16 x 16 fp32 sums) ----
// The AVX512-BF16 scan spends one instruction per 32 values per query, so from a few queries on it is bound
// by arithmetic, not memory (Q = 16, D = 512: 13 GB/s); the tile unit's rate does not depend on Q.

// Linux gives a process the AMX tile state only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_ready() {
#if defined(XMODAL_X86) && defined(__linux__)
  static const bool ready = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

// The queries as the tiles' second operand, one [16 pairs of dimensions][16 queries] dword tile per 32
// dimensions: tile c, row r, column i holds query i's values 32c + 2r and 32c + 2r + 1 (0 past Q).
std::vector<uint32_t> amx_query_tiles(const c10::BFloat16* q, int64_t Q, int64_t D) {
  std::vector<uint32_t> tiles(size_t(D / 32 * 256), 0);
  for (int64_t i = 0; i < Q; ++i)
    for (int64_t c = 0; c < D / 32; ++c)
      for (int r = 0; r < 16; ++r) std::memcpy(&tiles[c * 256 + r * 16 + i], q + i * D + c * 32 + 2 * r, 4);
  return tiles;
}

namespace {
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
}  // namespace

// Rows in groups of 64 (four sums tiles, so four independent chains hide the instruction's latency; the
// last rows fewer than 64 are left to the caller): D % 32 == 0, Q <= 16. Returns the rows done.
XMODAL_AMX int64_t scan_amx_bf16(const uint32_t* qtiles, int64_t Q, const c10::BFloat16* x, int64_t ld, int64_t n,
                                 int64_t D, float* out, int64_t ldo) {
  AmxTileConfig cfg;  // tiles 0-3: sums; 4, 5: rows; 6: queries; each 16 rows of 64 bytes
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t chunks = D / 32, stride = ld * int64_t(sizeof(c10::BFloat16));
  alignas(64) float sums[4][16][16];
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const c10::BFloat16* base = x + j * ld;
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(6, qtiles + c * 256, 64);
      _tile_loadd(4, base + c * 32, stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, base + 16 * ld + c * 32, stride);
      _tile_dpbf16ps(1, 5, 6);
      _tile_loadd(4, base + 32 * ld + c * 32, stride);
      _tile_dpbf16ps(2, 4, 6);
      _tile_loadd(5, base + 48 * ld + c * 32, stride);
      _tile_dpbf16ps(3, 5, 6);
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
    // sums[b][r][i] is query i's sum for row j + 16 b + r: each query's 16 sums of a block are a column,
    // gathered and written as one line (single-float writes to 16 rows of `out`, ldo apart, thrashed L1 sets)
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(16));
    for (int b = 0; b < 4; ++b)
      for (int64_t i = 0; i < Q; ++i)
        _mm512_storeu_ps(out + i * ldo + j + b * 16, _mm512_i32gather_ps(column, &sums[b][0][i], 4));
  }
  _tile_release();
  return j;
}

namespace {

// One row in a single sequential pass with four FMA chains (as row_sums_avx2): with kDot, *dot = q · row; with
// kNorm, *norm = row · row. On an AMD EPYC Zen 5, one query over 200,000 x 256 fp32 rows read this way took
// 11.5 ms where four rows read side by side took 22 (the memory's rate: ~10 ms).
template <bool kDot, bool kNorm, typename T>
XMODAL_AVX512 void row_sums_avx512(const float* q, const T* row, int64_t D, float* dot, float* norm) {
  __m512 a[4], b[4];
  for (int u = 0; u < 4; ++u) a[u] = b[u] = _mm512_setzero_ps();
  int64_t d = 0;
  // no software prefetch: the hardware's follows one sequential stream, and prefetching 1 KiB ahead as the
  // AVX2 kernel does made fp16 rows at D = 512 1.6x slower on that Zen 5 (1.0x-1.2x for the other cases)
  for (; d + 64 <= D; d += 64) {
    for (int u = 0; u < 4; ++u) {
      const __m512 v = load_avx512(row + d + 16 * u);
      if constexpr (kDot) a[u] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 16 * u), v, a[u]);
      if constexpr (kNorm) b[u] = _mm512_fmadd_ps(v, v, b[u]);
    }
  }
  for (; d + 16 <= D; d += 16) {
    const __m512 v = load_avx512(row + d);
    if constexpr (kDot) a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), v, a[0]);
    if constexpr (kNorm) b[0] = _mm512_fmadd_ps(v, v, b[0]);
  }
  if (d < D) {
    const __mmask16 m = __mmask16((1u << (D - d)) - 1);
    const __m512 v = load_avx512(row + d, m);
    if constexpr (kDot) a[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), v, a[1]);
    if constexpr (kNorm) b[1] = _mm512_fmadd_ps(v, v, b[1]);
  }
  if constexpr (kDot) *dot = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  if constexpr (kNorm) *norm = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(b[0], b[1]), _mm512_add_ps(b[2], b[3])));
}

}  // namespace

template <typename T>
void scan_one_query_avx512(const float* q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, float* norms) {
  if (norms) {
    for (int64_t j = 0; j < n; ++j) row_sums_avx512<true, true>(q, x + j * ld, D, out + j, norms + j);
  } else {
    for (int64_t j = 0; j < n; ++j) row_sums_avx512<true, false>(q, x + j * ld, D, out + j, nullptr);
  }
}

template <typename T>
void scan_avx512(const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, int64_t ldo) {
  if (Q == 1) return scan_one_query_avx512(q, x, ld, n, D, out, nullptr);
  scan_blocks<4, 4, T, float>(q, Q, x, ld, n, D, out, ldo, XMODAL_GROUP_DISPATCH(block_avx512, 4, float),
                              XMODAL_GROUP_DISPATCH(block_avx512, 1, float));
}

void scan_avx512bf16(const c10::BFloat16* q, int64_t Q, const c10::BFloat16* x, int64_t ld, int64_t n, int64_t D,
                     float* out, int64_t ldo) {
  using T = c10::BFloat16;
  scan_blocks<4, 4, T, T>(q, Q, x, ld, n, D, out, ldo, XMODAL_GROUP_DISPATCH(block_avx512bf16, 4, T),
                          XMODAL_GROUP_DISPATCH(block_avx512bf16, 1, T));
}

template <typename T>
XMODAL_AVX512 void squared_norms_avx512(const T* x, int64_t ld, int64_t n, int64_t D, float* out) {
  // one row at a time in one sequential pass: four rows side by side read at half the memory's rate on an
  // AMD EPYC Zen 5 (as the dot products of one query)
  for (int64_t j = 0; j < n; ++j) row_sums_avx512<false, true>(nullptr, x + j * ld, D, nullptr, out + j);
}

template void scan_avx512<float>(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t);
template void scan_avx512<c10::BFloat16>(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                         float*, int64_t);
template void scan_avx512<c10::Half>(const float*, int64_t, const c10::Half*, int64_t, int64_t, int64_t, float*,
                                     int64_t);
template void scan_one_query_avx512<float>(const float*, const float*, int64_t, int64_t, int64_t, float*, float*);
template void scan_one_query_avx512<c10::BFloat16>(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                                   float*, float*);
template void scan_one_query_avx512<c10::Half>(const float*, const c10::Half*, int64_t, int64_t, int64_t, float*,
                                               float*);
template void squared_norms_avx512<float>(const float*, int64_t, int64_t, int64_t, float*);
template void squared_norms_avx512<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, float*);
template void squared_norms_avx512<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, float*);

}  // namespace xmodal
#endif
