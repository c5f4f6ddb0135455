// The CPU scan (cpu_scan.h): the portable and AVX2 kernels, and the dispatch that picks a kernel per ISA
// (the AVX-512, AVX512-BF16 and AMX kernels are in cpu_scan_avx512.cpp) and walks the rows in chunks.
#include "search/cpu_scan_kernels.h"

#include <type_traits>
#include <vector>

namespace xmodal {
namespace {

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
// ---- AVX2: 8 lanes (F16C converts fp16), a scalar tail of D ----
// Each step loads a chunk of kR rows once (converting 16-bit values to fp32 once) and multiplies it with up
// to kQ queries: kQ x kR accumulators. Query groups of kQ go through the same kR rows while they sit in L1.
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

template <typename T>
void scan_avx2(const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, int64_t ldo) {
  if (Q == 1) return scan_one_query_avx2(q, x, ld, n, D, out, nullptr);
  // 16 registers: more queries take two rows at a time
  scan_blocks<4, 2, T, float>(q, Q, x, ld, n, D, out, ldo, XMODAL_GROUP_DISPATCH(block_avx2, 2, float),
                              XMODAL_GROUP_DISPATCH(block_avx2, 1, float));
}

template <typename T>
XMODAL_AVX2 void squared_norms_avx2(const T* x, int64_t ld, int64_t n, int64_t D, float* out) {
  for (int64_t j = 0; j < n; ++j) row_sums_avx2<false, true>(nullptr, x + j * ld, D, nullptr, out + j);
}
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
  // one query on AVX-512 (bf16 rows too: the native bf16 products pay only from a few queries on; not AMX)
  if ((isa == ScanIsa::Avx512 || isa == ScanIsa::Avx512Bf16) && Q == 1)
    return scan_one_query_avx512(q, x, ld, n, D, out, norms);
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
