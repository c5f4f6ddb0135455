// The int8 row kernels of compressed search (codes_cpu.h), shared by the flat op (codes_int8_cpu.cpp) and the
// IVF list scan: dot products of float queries with int8 rows, the codes read from memory once (a quarter of
// the fp32 bytes) and widened in registers (to fp32 with AVX-512, to int16 against int16-rounded queries with
// AVX2), and the optional per-query / per-row terms of the keys.
#include "common/checks.h"
#include "search/codes_cpu.h"
#include "search/cpu_simd.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace xmodal {
namespace {

// Dot products of up to kQ float queries with int8 rows, the rows converted in registers: memory traffic is
// the codes' bytes only. kR rows at a time share each query load; each row chunk is converted once for
// all kQ queries. out[i * ldo + r] = q_i · rows[r].
template <int kQ, int kR>
void dots_portable(const float* q, int64_t D, const int8_t* x, int64_t n, float* out, int64_t ldo) {
  for (int64_t r = 0; r < n; ++r)
    for (int i = 0; i < kQ; ++i) {
      float s = 0;
      for (int64_t d = 0; d < D; ++d) s += q[i * D + d] * float(x[r * D + d]);
      out[i * ldo + r] = s;
    }
}

#ifdef XMODAL_X86
template <int kQ, int kR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void dots_avx512(const float* q, int64_t D,
                                                                          const int8_t* x, int64_t n, float* out,
                                                                          int64_t ldo) {
  int64_t r0 = 0;
  for (; r0 + kR <= n; r0 += kR) {
    __m512 acc[kQ][kR];
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_setzero_ps();
    const int64_t full = D / 16 * 16;
    for (int64_t d = 0; d < full; d += 16) {
      __m512 row[kR];
      for (int r = 0; r < kR; ++r) {
        // each line of the next block's rows, ahead: the hardware prefetcher alone left the scan waiting
        // (1M x 512 codes, one query: 40 -> 16 ms, ~31 GB/s)
        if constexpr (kR > 1)
          if (d % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(x + (r0 + r + kR) * D + d), _MM_HINT_T0);
        row[r] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + (r0 + r) * D + d))));
      }
      for (int i = 0; i < kQ; ++i) {
        const __m512 qv = _mm512_loadu_ps(q + i * D + d);
        for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_fmadd_ps(qv, row[r], acc[i][r]);
      }
    }
    if (full < D) {  // the last D % 16 elements, masked
      const __mmask16 m = __mmask16((1u << (D - full)) - 1);
      __m512 row[kR];
      for (int r = 0; r < kR; ++r)
        row[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, x + (r0 + r) * D + full)));
      for (int i = 0; i < kQ; ++i) {
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + i * D + full);
        for (int r = 0; r < kR; ++r) acc[i][r] = _mm512_fmadd_ps(qv, row[r], acc[i][r]);
      }
    }
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) out[i * ldo + r0 + r] = _mm512_reduce_add_ps(acc[i][r]);
  }
  // the last rows one at a time with the same arithmetic, so equal rows score exactly equal
  if constexpr (kR > 1) {
    if (r0 < n) dots_avx512<kQ, 1>(q, D, x + r0 * D, n - r0, out + r0, ldo);
  }
}

template <int kQ, int kR>
__attribute__((target("avx2,fma"))) void dots_avx2(const float* q, int64_t D, const int8_t* x, int64_t n,
                                                   float* out, int64_t ldo) {
  int64_t r0 = 0;
  const int64_t full = D / 8 * 8;
  for (; r0 + kR <= n; r0 += kR) {
    __m256 acc[kQ][kR];
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < full; d += 8) {
      __m256 row[kR];
      for (int r = 0; r < kR; ++r) {
        if constexpr (kR > 1)
          if (d % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(x + (r0 + r + kR) * D + d), _MM_HINT_T0);
        row[r] = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + (r0 + r) * D + d))));
      }
      for (int i = 0; i < kQ; ++i) {
        const __m256 qv = _mm256_loadu_ps(q + i * D + d);
        for (int r = 0; r < kR; ++r) acc[i][r] = _mm256_fmadd_ps(qv, row[r], acc[i][r]);
      }
    }
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) {
        float s = hsum_avx2(acc[i][r]);
        for (int64_t d = full; d < D; ++d) s += q[i * D + d] * float(x[(r0 + r) * D + d]);
        out[i * ldo + r0 + r] = s;
      }
  }
  if constexpr (kR > 1) {
    if (r0 < n) dots_avx2<kQ, 1>(q, D, x + r0 * D, n - r0, out + r0, ldo);
  }
}

// AVX2 without integer dot products of bytes: queries rounded to int16 and the codes widened to int16 in
// registers, so one vpmaddwd does 16 multiply-adds (the fp32 route needs a convert and an FMA per 8). The
// sums are exact integers, so equal rows score exactly equal. out[i * ldo + r] = q16_i · rows[r].
template <int kQ, int kR>
__attribute__((target("avx2,fma"))) void dots_avx2_i16(const int16_t* q, int64_t D, const int8_t* x, int64_t n,
                                                       int32_t* out, int64_t ldo) {
  int64_t r0 = 0;
  const int64_t full = D / 16 * 16;
  for (; r0 + kR <= n; r0 += kR) {
    __m256i acc[kQ][kR];
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) acc[i][r] = _mm256_setzero_si256();
    for (int64_t d = 0; d < full; d += 16) {
      __m256i row[kR];
      for (int r = 0; r < kR; ++r) {
        if (d % 64 == 0) {
          if constexpr (kR > 1) _mm_prefetch(reinterpret_cast<const char*>(x + (r0 + r + 4 * kR) * D + d), _MM_HINT_T0);
          else _mm_prefetch(reinterpret_cast<const char*>(x + r0 * D + d) + kPrefetchAhead, _MM_HINT_T0);
        }
        row[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + (r0 + r) * D + d)));
      }
      for (int i = 0; i < kQ; ++i) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * D + d));
        for (int r = 0; r < kR; ++r) acc[i][r] = _mm256_add_epi32(acc[i][r], _mm256_madd_epi16(qv, row[r]));
      }
    }
    for (int i = 0; i < kQ; ++i)
      for (int r = 0; r < kR; ++r) {
        int32_t sum = hsum_epi32_avx2(acc[i][r]);
        for (int64_t d = full; d < D; ++d) sum += int32_t(q[i * D + d]) * x[(r0 + r) * D + d];
        out[i * ldo + r0 + r] = sum;
      }
  }
  if constexpr (kR > 1) {
    if (r0 < n) dots_avx2_i16<kQ, 1>(q, D, x + r0 * D, n - r0, out + r0, ldo);
  }
}

// row[j] += bias[group[j]] for the first multiple of 8 of n keys; returns how many were done
__attribute__((target("avx2"))) int64_t add_group_bias_avx2(float* row, const float* bias, const uint8_t* group,
                                                            int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i at = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(group + j)));
    _mm256_storeu_ps(row + j, _mm256_add_ps(_mm256_loadu_ps(row + j), _mm256_i32gather_ps(bias, at, 4)));
  }
  return j;
}

// row[j] += bias[group[j]] for the first multiple of 16 of n keys; returns how many were done
__attribute__((target("avx512f"))) int64_t add_group_bias_avx512(float* row, const float* bias,
                                                                  const uint8_t* group, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i at = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + j)));
    _mm512_storeu_ps(row + j, _mm512_add_ps(_mm512_loadu_ps(row + j), _mm512_i32gather_ps(at, bias, 4)));
  }
  return j;
}
#endif

template <int kQ>
void dots_block(ScanIsa isa, const float* q, int64_t D, const int8_t* x, int64_t n, float* out, int64_t ldo) {
#ifdef XMODAL_X86
  if (isa == ScanIsa::Avx512 || isa == ScanIsa::Avx512Bf16) return dots_avx512<kQ, 4>(q, D, x, n, out, ldo);
  if (isa == ScanIsa::Avx2) return dots_avx2<kQ, 4>(q, D, x, n, out, ldo);
#endif
  dots_portable<kQ, 1>(q, D, x, n, out, ldo);
}

}  // namespace

Int8Terms::Int8Terms(const std::optional<at::Tensor>& query_bias, const std::optional<at::Tensor>& row_scale,
                     const std::optional<at::Tensor>& row_bias, const std::optional<at::Tensor>& row_group, int64_t Q,
                     int64_t N, bool check_groups) {
  for (const auto& [t, name, n, held, ptr] :
       {std::tuple{&row_scale, "row_scale", N, &rs, &this->row_scale},
        std::tuple{&row_bias, "row_bias", N, &rb, &this->row_bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == n, name,
                " must be a 1-D float32 tensor of ", n, " values, got ", v.scalar_type(), " of shape ", v.sizes());
    TORCH_CHECK(v.device().is_cpu(), name, " must be on the CPU, got ", v.device());
    *held = v.contiguous();
    *ptr = held->data_ptr<float>();
  }
  if (row_group.has_value()) {
    const at::Tensor& g = *row_group;
    TORCH_CHECK(g.scalar_type() == at::kByte && g.dim() == 1 && g.size(0) == N,
                "row_group must be a 1-D uint8 tensor of ", N, " values, got ", g.scalar_type(), " of shape ",
                g.sizes());
    TORCH_CHECK(g.device().is_cpu(), "row_group must be on the CPU, got ", g.device());
    TORCH_CHECK(query_bias.has_value() && query_bias->dim() == 2,
                "row_group needs query_bias of shape [Q, G] (a bias per query and group)");
    groups = query_bias->size(1);
    rg = g.contiguous();
    this->row_group = rg.data_ptr<uint8_t>();
    if (check_groups) check_group_range(0, N);
  }
  if (query_bias.has_value()) {
    const at::Tensor& v = *query_bias;
    const bool grouped = this->row_group != nullptr;
    const bool shape_ok = v.dim() == (grouped ? 2 : 1) && v.size(0) == Q;
    TORCH_CHECK(v.scalar_type() == at::kFloat && shape_ok, "query_bias must be a float32 tensor of shape ",
                grouped ? "[Q, G] with Q = " : "[Q] = ", Q, grouped ? " (with row_group)" : "", ", got ",
                v.scalar_type(), " of shape ", v.sizes());
    TORCH_CHECK(v.device().is_cpu(), "query_bias must be on the CPU, got ", v.device());
    qb = v.contiguous();
    this->query_bias = qb.data_ptr<float>();
  }
}

namespace {

// row[j] += bias[group[j]]: a gather per 16 keys with AVX-512 (the scalar loop cost 17% of a 256-query
// search of 1M rows)
void add_group_bias(ScanIsa isa, float* row, const float* bias, const uint8_t* group, int64_t n) {
  int64_t j = 0;
#ifdef XMODAL_X86
  if (isa == ScanIsa::Avx512 || isa == ScanIsa::Avx512Bf16) j = add_group_bias_avx512(row, bias, group, n);
  if (isa == ScanIsa::Avx2) j = add_group_bias_avx2(row, bias, group, n);
#endif
  for (; j < n; ++j) row[j] += bias[group[j]];
}

}  // namespace

void Int8Terms::check_group_range(int64_t begin, int64_t end) const {
  if (!row_group || begin >= end) return;
  const uint8_t top = *std::max_element(row_group + begin, row_group + end);
  TORCH_CHECK(int64_t(top) < groups, "row_group values must be below G = ", groups, " (query_bias's columns), got ",
              int(top));
}

void Int8Terms::apply(ScanIsa isa, float* keys, int64_t qn, int64_t nt, const float* qbias, int64_t n0) const {
  if (!qbias && !row_scale && !row_bias) return;
  const float* scale = row_scale ? row_scale + n0 : nullptr;
  const float* shift = row_bias ? row_bias + n0 : nullptr;
  const uint8_t* group = row_group ? row_group + n0 : nullptr;
  const bool grouped = qbias && group;
  for (int64_t i = 0; i < qn; ++i) {
    float* row = keys + i * nt;
    if (grouped) add_group_bias(isa, row, qbias + i * groups, group, nt);
    const float add = qbias && !grouped ? qbias[i] : 0.f;  // one bias for the whole row
    // one loop per combination of terms, so each vectorises
    if (scale && shift)
      for (int64_t j = 0; j < nt; ++j) row[j] = (row[j] + add) * scale[j] + shift[j];
    else if (scale)
      for (int64_t j = 0; j < nt; ++j) row[j] = (row[j] + add) * scale[j];
    else if (shift)
      for (int64_t j = 0; j < nt; ++j) row[j] = row[j] + add + shift[j];
    else if (add != 0.f)
      for (int64_t j = 0; j < nt; ++j) row[j] = row[j] + add;
  }
}

void int8_dots(ScanIsa isa, const float* q, int64_t Q, int64_t D, const int8_t* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 4 <= Q; i += 4) dots_block<4>(isa, q + i * D, D, x, n, out + i * n, n);
  for (; i + 2 <= Q; i += 2) dots_block<2>(isa, q + i * D, D, x, n, out + i * n, n);
  for (; i < Q; ++i) dots_block<1>(isa, q + i * D, D, x, n, out + i * n, n);
}

Int16Queries::Int16Queries(const float* q, int64_t Q, int64_t D) : D(D), values(size_t(Q * D)), unit(size_t(Q)) {
  // |q16| <= limit keeps every sum of D products with codes in [-128, 127] inside int32
  const float limit = float(std::min<int64_t>(32767, (int64_t(1) << 31) / (128 * std::max<int64_t>(D, 1)) - 1));
  for (int64_t i = 0; i < Q && ok; ++i) {
    float top = 0.f;
    for (int64_t d = 0; d < D; ++d) top = std::max(top, std::abs(q[i * D + d]));
    const double inv = top > 0.f ? double(limit) / top : 0.0;
    ok = limit >= 1.f && std::isfinite(top) && std::isfinite(float(inv));  // else the fp32 kernel (huge D, tiny q)
    unit[i] = top / limit;
    for (int64_t d = 0; d < D && ok; ++d) values[i * D + d] = int16_t(std::lrint(double(q[i * D + d]) * inv));
  }
}

Int16Queries Int16Queries::rows(const int64_t* which, int64_t n) const {
  Int16Queries out;
  out.D = D;
  out.ok = ok;
  out.values.resize(size_t(n * D));
  out.unit.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(values.data() + which[i] * D, D, out.values.data() + i * D);
    out.unit[i] = unit[which[i]];
  }
  return out;
}

void int8_dots_i16(const Int16Queries& q, int64_t q0, int64_t Q, const int8_t* x, int64_t n, float* out) {
  const int64_t D = q.D;
  const int16_t* qp = q.values.data() + q0 * D;
  thread_local std::vector<int32_t> buffer;
  buffer.resize(size_t(Q * n));
  int32_t* sums = buffer.data();
#ifdef XMODAL_X86
  int64_t i = 0;
  for (; i + 4 <= Q; i += 4) dots_avx2_i16<4, 2>(qp + i * D, D, x, n, sums + i * n, n);
  for (; i + 2 <= Q; i += 2) dots_avx2_i16<2, 4>(qp + i * D, D, x, n, sums + i * n, n);
  for (; i < Q; ++i) dots_avx2_i16<1, 1>(qp + i * D, D, x, n, sums + i * n, n);
#else
  for (int64_t i = 0; i < Q; ++i)
    for (int64_t r = 0; r < n; ++r) {
      int32_t s = 0;
      for (int64_t d = 0; d < D; ++d) s += int32_t(qp[i * D + d]) * x[r * D + d];
      sums[i * n + r] = s;
    }
#endif
  for (int64_t i = 0; i < Q; ++i) {
    const float unit = q.unit[q0 + i];
    for (int64_t r = 0; r < n; ++r) out[i * n + r] = float(sums[i * n + r]) * unit;
  }
}

}  // namespace xmodal
