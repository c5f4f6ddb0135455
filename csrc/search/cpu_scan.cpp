#include "search/cpu_scan.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define XMODAL_X86 1
#endif
#if defined(XMODAL_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace xmodal {
namespace {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
void scan_portable(const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out,
                   int64_t ldo) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = x + j * ld;
    for (int64_t i = 0; i < Q; ++i) {
      const float* qi = q + i * D;
      float s = 0;
      for (int64_t d = 0; d < D; ++d) s += qi[d] * to_float(row[d]);
      out[i * ldo + j] = s;
    }
  }
}

#ifdef XMODAL_X86
// Each step loads a chunk of kR rows once (converting 16-bit values to fp32 once) and multiplies it with up
// to kQ queries: kQ x kR accumulators. Query groups of kQ go through the same kR rows while they sit in L1.
#define XMODAL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define XMODAL_AVX2 __attribute__((target("avx2,f16c,fma")))

// ---- AVX-512: 16 lanes, masked loads for the tail of D ----
XMODAL_AVX512 inline __m512 load_avx512(const float* p) { return _mm512_loadu_ps(p); }
XMODAL_AVX512 inline __m512 load_avx512(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
XMODAL_AVX512 inline __m512 load_avx512(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
XMODAL_AVX512 inline __m512 load_avx512(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
XMODAL_AVX512 inline __m512 load_avx512(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
XMODAL_AVX512 inline __m512 load_avx512(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// The sums of four vectors at once (about 15 instructions instead of 4 x 9): halves, then quarters are added
// across the vectors so that 128-bit lane i holds vector i's partial sums, then each lane is summed.
XMODAL_AVX512 inline __m128 reduce4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), u));
}

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
#define XMODAL_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

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
#define XMODAL_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

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

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

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

// ---- AVX2: 8 lanes (F16C converts fp16), a scalar tail of D ----
XMODAL_AVX2 inline __m256 load_avx2(const float* p) { return _mm256_loadu_ps(p); }
XMODAL_AVX2 inline __m256 load_avx2(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
XMODAL_AVX2 inline __m256 load_avx2(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
XMODAL_AVX2 inline float hsum_avx2(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <int kQ, int kR, typename T>
XMODAL_AVX2 void block_avx2(const float* q, int64_t D, const T* const* rows, float* out, int64_t ldo) {
  __m256 acc[kQ][kR];
  for (int i = 0; i < kQ; ++i)
    for (int r = 0; r < kR; ++r) acc[i][r] = _mm256_setzero_ps();
  const int64_t full = D / 8 * 8;
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t d = 0; d < full; d += 8) {
    __m256 x[kR];
    for (int r = 0; r < kR; ++r) {
      if (d % kLine == 0) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + d) + kPrefetchAhead, _MM_HINT_T0);
      x[r] = load_avx2(rows[r] + d);
    }
    for (int i = 0; i < kQ; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + i * D + d);
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm256_fmadd_ps(qv, x[r], acc[i][r]);
    }
  }
  for (int i = 0; i < kQ; ++i)
    for (int r = 0; r < kR; ++r) {
      float s = hsum_avx2(acc[i][r]);
      for (int64_t d = full; d < D; ++d) s += q[i * D + d] * to_float(rows[r][d]);
      out[i * ldo + r] = s;
    }
}

// One row in a single sequential pass with four FMA chains: with kDot, *dot = q · row; with kNorm,
// *norm = row · row. One query over rows read this way reached 19-20 GB/s on an AVX2-only AMD EPYC (Zen 2)
// where four rows read side by side reached 14-15; and l2 / cosine on one query take the norm in the same
// pass (a separate norms pass, even from L1, cost ~1.7x the time of the dot products alone).
template <bool kDot, bool kNorm, typename T>
XMODAL_AVX2 void row_sums_avx2(const float* q, const T* row, int64_t D, float* dot, float* norm) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  __m256 a[4], b[4];
  for (int u = 0; u < 4; ++u) a[u] = b[u] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    for (int64_t e = 0; e < 32; e += kLine)
      _mm_prefetch(reinterpret_cast<const char*>(row + d + e) + kPrefetchAhead, _MM_HINT_T0);
    for (int u = 0; u < 4; ++u) {
      const __m256 v = load_avx2(row + d + 8 * u);
      if constexpr (kDot) a[u] = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8 * u), v, a[u]);
      if constexpr (kNorm) b[u] = _mm256_fmadd_ps(v, v, b[u]);
    }
  }
  for (; d + 8 <= D; d += 8) {
    const __m256 v = load_avx2(row + d);
    if constexpr (kDot) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), v, a[0]);
    if constexpr (kNorm) b[0] = _mm256_fmadd_ps(v, v, b[0]);
  }
  float s = hsum_avx2(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  float t = hsum_avx2(_mm256_add_ps(_mm256_add_ps(b[0], b[1]), _mm256_add_ps(b[2], b[3])));
  for (; d < D; ++d) {
    const float v = to_float(row[d]);
    if constexpr (kDot) s += q[d] * v;
    if constexpr (kNorm) t += v * v;
  }
  if constexpr (kDot) *dot = s;
  if constexpr (kNorm) *norm = t;
}

// One query: out[j] = q · rows[j], and norms[j] = rows[j] · rows[j] when `norms` is given.
template <typename T>
void scan_one_query_avx2(const float* q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, float* norms) {
  if (norms) {
    for (int64_t j = 0; j < n; ++j) row_sums_avx2<true, true>(q, x + j * ld, D, out + j, norms + j);
  } else {
    for (int64_t j = 0; j < n; ++j) row_sums_avx2<true, false>(q, x + j * ld, D, out + j, nullptr);
  }
}

// Rows in blocks of kR (then one at a time), queries in groups of up to kQ.
template <int kQ, int kR, typename T, typename QT, typename Block, typename Block1>
void scan_blocks(const QT* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, int64_t ldo,
                 Block block, Block1 block1) {
  int64_t j = 0;
  const T* rows[kR];
  for (; j + kR <= n; j += kR) {
    for (int r = 0; r < kR; ++r) rows[r] = x + (j + r) * ld;
    for (int64_t i = 0; i < Q; i += kQ) block(q + i * D, std::min<int64_t>(kQ, Q - i), D, rows, out + i * ldo + j, ldo);
  }
  for (; j < n; ++j) {
    rows[0] = x + j * ld;
    for (int64_t i = 0; i < Q; i += kQ) block1(q + i * D, std::min<int64_t>(kQ, Q - i), D, rows, out + i * ldo + j, ldo);
  }
}

// block functions for a query group of 1..4 (the group size is a template parameter of the kernels); QT is
// the queries' element type
#define XMODAL_GROUP_DISPATCH(fn, R, QT)                                                                    \
  [](const QT* q, int64_t g, int64_t D, const T* const* rows, float* out, int64_t ldo) {                  \
    switch (g) {                                                                                          \
      case 1: return fn<1, R, T>(q, D, rows, out, ldo);                                                   \
      case 2: return fn<2, R, T>(q, D, rows, out, ldo);                                                   \
      case 3: return fn<3, R, T>(q, D, rows, out, ldo);                                                   \
      default: return fn<4, R, T>(q, D, rows, out, ldo);                                                  \
    }                                                                                                     \
  }

template <typename T>
void scan_avx512(const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, int64_t ldo) {
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
void scan_avx2(const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, int64_t ldo) {
  if (Q == 1) return scan_one_query_avx2(q, x, ld, n, D, out, nullptr);
  // 16 registers: more queries take two rows at a time
  scan_blocks<4, 2, T, float>(q, Q, x, ld, n, D, out, ldo, XMODAL_GROUP_DISPATCH(block_avx2, 2, float),
                              XMODAL_GROUP_DISPATCH(block_avx2, 1, float));
}
template <typename T>
XMODAL_AVX512 void squared_norms_avx512(const T* x, int64_t ld, int64_t n, int64_t D, float* out) {
  const int64_t full = D / 16 * 16;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four rows at a time share one horizontal reduction
    __m512 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < full; d += 16)
      for (int r = 0; r < 4; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(x + (j + r + 8) * ld + d), _MM_HINT_T0);  // (as above)
        const __m512 v = load_avx512(x + (j + r) * ld + d);
        a[r] = _mm512_fmadd_ps(v, v, a[r]);
      }
    _mm_storeu_ps(out + j, reduce4_avx512(a[0], a[1], a[2], a[3]));
    for (int r = 0; r < 4; ++r)
      for (int64_t d = full; d < D; ++d) out[j + r] += to_float(x[(j + r) * ld + d]) * to_float(x[(j + r) * ld + d]);
  }
  for (; j < n; ++j) {
    const T* row = x + j * ld;
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= full; d += 32) {
      const __m512 u = load_avx512(row + d), v = load_avx512(row + d + 16);
      a = _mm512_fmadd_ps(u, u, a);
      b = _mm512_fmadd_ps(v, v, b);
    }
    for (; d < full; d += 16) {
      const __m512 u = load_avx512(row + d);
      a = _mm512_fmadd_ps(u, u, a);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    for (; d < D; ++d) s += to_float(row[d]) * to_float(row[d]);
    out[j] = s;
  }
}

template <typename T>
XMODAL_AVX2 void squared_norms_avx2(const T* x, int64_t ld, int64_t n, int64_t D, float* out) {
  for (int64_t j = 0; j < n; ++j) row_sums_avx2<false, true>(nullptr, x + j * ld, D, nullptr, out + j);
}
#undef XMODAL_GROUP_DISPATCH
#endif

template <typename T>
void scan_rows(ScanIsa isa, const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out,
               int64_t ldo) {
#ifdef XMODAL_X86
  if (isa == ScanIsa::Avx512) return scan_avx512(q, Q, x, ld, n, D, out, ldo);
  if (isa == ScanIsa::Avx2) return scan_avx2(q, Q, x, ld, n, D, out, ldo);
#endif
  scan_portable(q, Q, x, ld, n, D, out, ldo);
}

template <typename T>
void squared_norms_rows(ScanIsa isa, const T* x, int64_t ld, int64_t n, int64_t D, float* out) {
#ifdef XMODAL_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (isa == ScanIsa::Avx512Bf16 || isa == ScanIsa::Amx) return squared_norms_avx512bf16(x, ld, n, D, out);  // native bf16 products
  }
  if (isa == ScanIsa::Avx512 || isa == ScanIsa::Avx512Bf16 || isa == ScanIsa::Amx) return squared_norms_avx512(x, ld, n, D, out);
  if (isa == ScanIsa::Avx2) return squared_norms_avx2(x, ld, n, D, out);
#endif
  for (int64_t j = 0; j < n; ++j) {
    float s = 0;
    for (int64_t d = 0; d < D; ++d) s += to_float(x[j * ld + d]) * to_float(x[j * ld + d]);
    out[j] = s;
  }
}

// When `norms` is given, the squared norms of rows [j0, j0 + c) at norms[j0 + j]; then the dot products of the
// same rows with the queries, written at out[i * ldo + j0 + j].
template <typename T>
void scan_chunk(ScanIsa isa, const float* q, const c10::BFloat16* q16, const uint32_t* qtiles, int64_t Q, const T* x,
                int64_t ld, int64_t j0, int64_t c, int64_t D, float* out, int64_t ldo, float* norms) {
  if (norms) squared_norms_rows(isa, x + j0 * ld, ld, c, D, norms + j0);
#ifdef XMODAL_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t done = qtiles ? scan_amx_bf16(qtiles, Q, x + j0 * ld, ld, c, D, out + j0, ldo) : 0;
    if (q16)  // the CPU multiplies bf16 natively
      return scan_avx512bf16(q16, Q, x + (j0 + done) * ld, ld, c - done, D, out + j0 + done, ldo);
  }
#endif
  (void)q16;
  (void)qtiles;
  scan_rows(isa == ScanIsa::Avx512Bf16 || isa == ScanIsa::Amx ? ScanIsa::Avx512 : isa, q, Q, x + j0 * ld, ld, c, D,
            out + j0, ldo);
}

template <typename T>
void scan_all(ScanIsa isa, const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out,
              float* norms) {
  // with norms: chunks of rows that stay in L1 (32 KiB) from the norms to the dot products, so the rows come
  // from memory once (a whole tile's norms first would read it twice, or keep tiles small)
  const bool bf16 = std::is_same_v<T, c10::BFloat16> && (isa == ScanIsa::Avx512Bf16 || isa == ScanIsa::Amx);
  // AMX: whole groups of 64 rows (the planner asks for it with D % 32 == 0 and at most 16 queries)
#ifdef XMODAL_X86
  const bool amx = bf16 && isa == ScanIsa::Amx && D % 32 == 0 && Q <= 16 && amx_ready();
#else
  const bool amx = false;
#endif
#ifdef XMODAL_X86
  if (isa == ScanIsa::Avx2 && Q == 1 && norms) return scan_one_query_avx2(q, x, ld, n, D, out, norms);
#endif
  int64_t chunk = norms ? std::max<int64_t>(16, (int64_t(32) << 10) / std::max<int64_t>(D * int64_t(sizeof(T)), 1) / 4 * 4) : n;
  if (norms && amx) chunk = (chunk + 63) / 64 * 64;
  std::vector<c10::BFloat16> q16;  // with native bf16 products and bf16 rows: the queries back in bf16 (exact:
                                   // they came from bf16 inputs)
  if (bf16) q16.assign(q, q + Q * D);
  std::vector<uint32_t> qtiles;
#ifdef XMODAL_X86
  if (amx) qtiles = amx_query_tiles(q16.data(), Q, D);
#endif
  for (int64_t j0 = 0; j0 < n; j0 += chunk)
    scan_chunk(isa, q, q16.empty() ? nullptr : q16.data(), qtiles.empty() ? nullptr : qtiles.data(), Q, x, ld, j0,
               std::min(chunk, n - j0), D, out, n, norms);
}

}  // namespace

void scan_dots(ScanIsa isa, const float* queries, int64_t Q, const at::Tensor& rows, float* out, float* norms) {
  const int64_t n = rows.size(0), D = rows.size(1), ld = rows.stride(0);
  TORCH_INTERNAL_ASSERT(D == 0 || rows.stride(1) == 1, "scan_dots needs unit stride within a row");
  switch (rows.scalar_type()) {
    case at::kFloat: return scan_all(isa, queries, Q, rows.data_ptr<float>(), ld, n, D, out, norms);
    case at::kBFloat16: return scan_all(isa, queries, Q, rows.data_ptr<c10::BFloat16>(), ld, n, D, out, norms);
    case at::kHalf: return scan_all(isa, queries, Q, rows.data_ptr<c10::Half>(), ld, n, D, out, norms);
    default: TORCH_INTERNAL_ASSERT(false, "scan_dots: unsupported dtype ", rows.scalar_type());
  }
}

}  // namespace xmodal

namespace xmodal {

void squared_norms(ScanIsa isa, const at::Tensor& rows, float* out) {
  const int64_t n = rows.size(0), D = rows.size(1), ld = rows.stride(0);
  TORCH_INTERNAL_ASSERT(D == 0 || rows.stride(1) == 1, "squared_norms needs unit stride within a row");
  switch (rows.scalar_type()) {
    case at::kFloat: return squared_norms_rows(isa, rows.data_ptr<float>(), ld, n, D, out);
    case at::kBFloat16: return squared_norms_rows(isa, rows.data_ptr<c10::BFloat16>(), ld, n, D, out);
    case at::kHalf: return squared_norms_rows(isa, rows.data_ptr<c10::Half>(), ld, n, D, out);
    default: TORCH_INTERNAL_ASSERT(false, "squared_norms: unsupported dtype ", rows.scalar_type());
  }
}

}  // namespace xmodal
