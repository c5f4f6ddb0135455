// Internal to the CPU scan (cpu_scan.cpp, cpu_scan_avx512.cpp): the row-block loop both ISAs' kernels share,
// and the AVX-512 / AVX512-BF16 / AMX entry points that cpu_scan.cpp's dispatch calls.
#pragma once
#include "search/cpu_scan.h"
#include "search/cpu_simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace xmodal {

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

#ifdef XMODAL_X86
// out[i * ldo + j] = q_i · rows[j] for Q fp32 queries and n rows (row stride ld): AVX-512F, 16-bit rows
// converted to fp32 in registers. Instantiated for float, c10::BFloat16 and c10::Half rows.
template <typename T>
void scan_avx512(const float* q, int64_t Q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, int64_t ldo);

// One fp32 query: out[j] = q · rows[j], and norms[j] = rows[j] · rows[j] when `norms` is given, each row read
// in one sequential pass (AVX-512F; float, c10::BFloat16 and c10::Half rows).
template <typename T>
void scan_one_query_avx512(const float* q, const T* x, int64_t ld, int64_t n, int64_t D, float* out, float* norms);

// The same with bf16 queries and rows multiplied natively (AVX512-BF16).
void scan_avx512bf16(const c10::BFloat16* q, int64_t Q, const c10::BFloat16* x, int64_t ld, int64_t n, int64_t D,
                     float* out, int64_t ldo);

// out[j] = rows[j] · rows[j] (AVX-512F; float, c10::BFloat16 and c10::Half rows)
template <typename T>
XMODAL_AVX512 void squared_norms_avx512(const T* x, int64_t ld, int64_t n, int64_t D, float* out);

// out[j] = rows[j] · rows[j] for bf16 rows with vdpbf16ps (AVX512-BF16)
XMODAL_AVX512BF16 void squared_norms_avx512bf16(const c10::BFloat16* x, int64_t ld, int64_t n, int64_t D, float* out);

// Whether this process may use the AMX tile state (asked for once).
bool amx_ready();

// The bf16 queries (Q <= 16) laid out as the AMX tiles' second operand.
std::vector<uint32_t> amx_query_tiles(const c10::BFloat16* q, int64_t Q, int64_t D);

// Dot products of up to 16 bf16 queries (amx_query_tiles) with rows in groups of 64 (D % 32 == 0) on the AMX
// tile unit; returns the rows done (the last rows fewer than 64 are left to the caller).
XMODAL_AMX int64_t scan_amx_bf16(const uint32_t* qtiles, int64_t Q, const c10::BFloat16* x, int64_t ld, int64_t n,
                                 int64_t D, float* out, int64_t ldo);
#endif

}  // namespace xmodal
