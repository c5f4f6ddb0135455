#include "graph/gather_dots.h"

#include "search/cpu_simd.h"

namespace xmodal {
namespace {

template <typename T>
void gather_dots_portable(const float* q, const T* x, int64_t ld, const int32_t* rows, int64_t n, int64_t D,
                          float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const T* r = x + rows[j] * ld;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += q[d] * to_float(r[d]);
    out[j] = s;
  }
}

#ifdef XMODAL_X86
template <typename T>
XMODAL_AVX512 void gather_dots_avx512(const float* q, const T* x, int64_t ld, const int32_t* rows, int64_t n,
                                      int64_t D, float* out) {
  const int64_t body = D - D % 16;
  const __mmask16 tail = __mmask16((1u << (D % 16)) - 1);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* r0 = x + rows[j] * ld;
    const T* r1 = x + rows[j + 1] * ld;
    const T* r2 = x + rows[j + 2] * ld;
    const T* r3 = x + rows[j + 3] * ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < body; d += 16) {
      const __m512 v = _mm512_loadu_ps(q + d);
      a0 = _mm512_fmadd_ps(v, load_avx512(r0 + d), a0);
      a1 = _mm512_fmadd_ps(v, load_avx512(r1 + d), a1);
      a2 = _mm512_fmadd_ps(v, load_avx512(r2 + d), a2);
      a3 = _mm512_fmadd_ps(v, load_avx512(r3 + d), a3);
    }
    if (tail) {
      const __m512 v = _mm512_maskz_loadu_ps(tail, q + body);
      a0 = _mm512_fmadd_ps(v, load_avx512(r0 + body, tail), a0);
      a1 = _mm512_fmadd_ps(v, load_avx512(r1 + body, tail), a1);
      a2 = _mm512_fmadd_ps(v, load_avx512(r2 + body, tail), a2);
      a3 = _mm512_fmadd_ps(v, load_avx512(r3 + body, tail), a3);
    }
    _mm_storeu_ps(out + j, reduce4_avx512(a0, a1, a2, a3));
  }
  for (; j < n; ++j) {
    const T* r = x + rows[j] * ld;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < body; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load_avx512(r + d), a);
    if (tail) a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + body), load_avx512(r + body, tail), a);
    out[j] = _mm512_reduce_add_ps(a);
  }
}

template <typename T>
XMODAL_AVX2 float dot_avx2(const float* q, const T* r, int64_t body, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t d = 0; d < body; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_avx2(r + d), a);
  float s = hsum_avx2(a);
  for (int64_t d = body; d < D; ++d) s += q[d] * to_float(r[d]);
  return s;
}

template <typename T>
XMODAL_AVX2 void gather_dots_avx2(const float* q, const T* x, int64_t ld, const int32_t* rows, int64_t n,
                                  int64_t D, float* out) {
  const int64_t body = D - D % 8;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* r[4] = {x + rows[j] * ld, x + rows[j + 1] * ld, x + rows[j + 2] * ld, x + rows[j + 3] * ld};
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < body; d += 8) {
      const __m256 v = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(v, load_avx2(r[0] + d), a0);
      a1 = _mm256_fmadd_ps(v, load_avx2(r[1] + d), a1);
      a2 = _mm256_fmadd_ps(v, load_avx2(r[2] + d), a2);
      a3 = _mm256_fmadd_ps(v, load_avx2(r[3] + d), a3);
    }
    float s[4] = {hsum_avx2(a0), hsum_avx2(a1), hsum_avx2(a2), hsum_avx2(a3)};
    for (int64_t d = body; d < D; ++d)
      for (int i = 0; i < 4; ++i) s[i] += q[d] * to_float(r[i][d]);
    for (int i = 0; i < 4; ++i) out[j + i] = s[i];
  }
  for (; j < n; ++j) out[j] = dot_avx2(q, x + rows[j] * ld, body, D);
}
#endif

}  // namespace

template <typename T>
void gather_dots(ScanIsa isa, const float* q, const T* x, int64_t ld, const int32_t* rows, int64_t n, int64_t D,
                 float* out) {
#ifdef XMODAL_X86
  if (isa == ScanIsa::Avx512 || isa == ScanIsa::Avx512Bf16 || isa == ScanIsa::Amx)
    return gather_dots_avx512(q, x, ld, rows, n, D, out);
  if (isa == ScanIsa::Avx2) return gather_dots_avx2(q, x, ld, rows, n, D, out);
#endif
  gather_dots_portable(q, x, ld, rows, n, D, out);
}

template void gather_dots<float>(ScanIsa, const float*, const float*, int64_t, const int32_t*, int64_t, int64_t,
                                 float*);
template void gather_dots<c10::BFloat16>(ScanIsa, const float*, const c10::BFloat16*, int64_t, const int32_t*,
                                         int64_t, int64_t, float*);

}  // namespace xmodal
