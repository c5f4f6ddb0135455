// x86 SIMD helpers shared by the CPU scans of float rows (cpu_scan*.cpp) and of int8 codes
// (codes_int8*.cpp): per-function target attributes (the kernels are chosen at run time by the planner's
// ScanIsa, so the library is built for baseline x86-64 and no AVX-512 code runs on an AVX2 CPU), row loaders
// that widen 16-bit values to fp32, horizontal sums, and the AVX2 prefetch distance.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define XMODAL_X86 1
#endif

namespace xmodal {

// The AVX2 scans (float and int8) read rows one after another and prefetch each cache line this many bytes
// before they load it: on an AVX2-only AMD EPYC (Zen 2) four rows read side by side, or the hardware
// prefetcher alone, left them at 6-15 GB/s of ~20; 1 KiB did better than 512 bytes or 2 KiB.
constexpr int64_t kPrefetchAhead = 1024;

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

#ifdef XMODAL_X86
#define XMODAL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define XMODAL_AVX2 __attribute__((target("avx2,f16c,fma")))
// AVX512-BF16: bf16 pairs multiplied by vdpbf16ps with fp32 accumulation
#define XMODAL_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
// AMX: the tile unit with bf16 products
#define XMODAL_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

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

// ---- AVX2: 8 lanes (F16C converts fp16) ----
XMODAL_AVX2 inline __m256 load_avx2(const float* p) { return _mm256_loadu_ps(p); }
XMODAL_AVX2 inline __m256 load_avx2(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
XMODAL_AVX2 inline __m256 load_avx2(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// the sum of v's eight float lanes (plain "avx2", so that kernels built for any AVX2 target inline it)
__attribute__((target("avx2"))) inline float hsum_avx2(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// the sum of v's eight int32 lanes
__attribute__((target("avx2"))) inline int32_t hsum_epi32_avx2(__m256i v) {
  const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}
#endif

}  // namespace xmodal
