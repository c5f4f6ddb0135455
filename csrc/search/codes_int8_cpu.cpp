// Top-k search over int8 codes (scalar quantisation) on the CPU: the topk_int8 op. Like the float search
// (topk_search_cpu.cpp), each thread owns a range of row tiles, scores a tile while it is in cache and feeds
// per-query candidate buffers (codes_topk.h); the Q x N score matrix never exists. Few queries scan the codes
// with the row kernels of codes_int8_kernels.cpp. Many queries multiply tiles with oneDNN's int8 GEMM where
// it is exact (VNNI, AMX); on AVX2 a first pass with queries rounded to 6 bits (vpmaddubsw: 2.7x an fp32
// GEMM's products per instruction, below) keeps a few candidates per query, rescored with int16 queries;
// elsewhere a BLAS GEMM of tiles decoded to fp32 in cache.
#include "common/checks.h"
#include "common/parallel.h"
#include "search/codes_cpu.h"
#include "search/codes_topk.h"
#include "search/cpu_simd.h"
#include "search/planner.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace xmodal {
namespace {

using ord_t = int32_t;

#ifdef XMODAL_X86
// Many queries on AVX2, first pass: codes (signed bytes) times queries rounded to 6 bits and shifted to
// unsigned (u = q6 + 32 in [1, 63], 0 past D). One vpmaddubsw multiplies 32 byte pairs into 16 pair sums of
// at most 2 * 63 * 128 = 16128, so two of them add in int16 without saturating, and one vpmaddwd by ones
// widens the 64 products to int32: three multiply instructions per 64 products, where fp32 needs eight
// FMAs (7-bit queries, which need a widening per 32 products, measured 19% slower: 0.73 vs 0.62 s for
// 256 queries over 1M x 512, at the same recall). `qp`: kB blocks of 8 queries, each [D4][8][4] bytes;
// out[(b * 8 + l) * ldo + r] = sum over d < 4 * D4 of u_l[d] * rows[r][d]. Rows are read a dword at a time,
// up to 3 bytes past D: the caller makes sure that memory is there.
template <int kR, int kB>
__attribute__((target("avx2"))) void coarse_dots_avx2(const uint8_t* qp, int64_t D4, const int8_t* x, int64_t D,
                                                      int64_t n, int32_t* out, int64_t ldo) {
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t r0 = 0;
  for (; r0 + kR <= n; r0 += kR) {
    __m256i acc[kR][kB];
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kB; ++b) acc[r][b] = _mm256_setzero_si256();
    int64_t d4 = 0;
    for (; d4 + 2 <= D4; d4 += 2) {
      __m256i qv[kB][2];
      for (int b = 0; b < kB; ++b)
        for (int h = 0; h < 2; ++h)
          qv[b][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (b * D4 + d4 + h) * 32));
      for (int r = 0; r < kR; ++r) {
        int32_t w0, w1;
        std::memcpy(&w0, x + (r0 + r) * D + d4 * 4, 4);
        std::memcpy(&w1, x + (r0 + r) * D + d4 * 4 + 4, 4);
        const __m256i c0 = _mm256_set1_epi32(w0), c1 = _mm256_set1_epi32(w1);
        for (int b = 0; b < kB; ++b) {
          const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(qv[b][0], c0), _mm256_maddubs_epi16(qv[b][1], c1));
          acc[r][b] = _mm256_add_epi32(acc[r][b], _mm256_madd_epi16(pair, ones));
        }
      }
    }
    for (; d4 < D4; ++d4) {
      __m256i qv[kB];
      for (int b = 0; b < kB; ++b) qv[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (b * D4 + d4) * 32));
      for (int r = 0; r < kR; ++r) {
        int32_t word;
        std::memcpy(&word, x + (r0 + r) * D + d4 * 4, 4);
        const __m256i c = _mm256_set1_epi32(word);
        for (int b = 0; b < kB; ++b)
          acc[r][b] = _mm256_add_epi32(acc[r][b], _mm256_madd_epi16(_mm256_maddubs_epi16(qv[b], c), ones));
      }
    }
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kB; ++b) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][b]);
        for (int l = 0; l < 8; ++l) out[(b * 8 + l) * ldo + r0 + r] = lanes[l];
      }
  }
  if constexpr (kR > 1) {
    if (r0 < n) coarse_dots_avx2<1, kB>(qp, D4, x + r0 * D, D, n - r0, out + r0, ldo);
  }
}

// out[j] = the sum of row j's D codes
__attribute__((target("avx2"))) void code_sums_avx2(const int8_t* x, int64_t D, int64_t n, int32_t* out) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const int64_t full = D / 32 * 32;
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* row = x + r * D;
    __m256i acc = _mm256_setzero_si256();
    for (int64_t d = 0; d < full; d += 32)
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(
          _mm256_maddubs_epi16(ones8, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d))), ones16));
    int32_t sum = hsum_epi32_avx2(acc);
    for (int64_t d = full; d < D; ++d) sum += row[d];
    out[r] = sum;
  }
}
#endif

void decode(ScanIsa isa, const int8_t* codes, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = float(codes[i]);  // vectorised by the compiler; GEMM path only
}

// Whether torch._int_mm multiplies int8 exactly on this CPU. oneDNN's int8 GEMM is exact with VNNI (and
// AMX); on AVX2-only CPUs its u8 x s8 pair sums saturate at int16 and results come back wrong (measured:
// errors up to 1e5 on 512-long rows), so the int8 GEMM is used only after this probe passes.
bool int8_gemm_exact() {
  static const bool exact = [] {
    const at::Tensor a = at::full({32, 256}, -127, at::kChar), b = at::full({32, 256}, -128, at::kChar);
    const at::Tensor got = at::_int_mm(a, b.t()).to(at::kLong);
    return bool((got == int64_t(127) * 128 * 256).all().item<bool>());
  }();
  return exact;
}

// Queries of the AVX2 many-query first pass (coarse_dots_avx2): each rounded to 6 bits (its largest |value|
// maps to 31), shifted to unsigned and packed in blocks of 8 queries, [blocks][D4][8][4] bytes, 0 past D.
struct CoarseQueries {
  CoarseQueries(const float* q, int64_t Q, int64_t D)
      : D4((D + 3) / 4), packed(size_t((Q + 7) / 8 * D4 * 32), 0), unit(size_t(Q)) {
    for (int64_t i = 0; i < Q; ++i) {
      float top = 0.f;
      for (int64_t d = 0; d < D; ++d) top = std::max(top, std::abs(q[i * D + d]));
      const float inv = top > 0.f ? 31.f / top : 0.f;
      unit[i] = top / 31.f;
      uint8_t* lane = packed.data() + (i / 8) * D4 * 32 + (i % 8) * 4;
      for (int64_t d = 0; d < D; ++d)
        lane[(d / 4) * 32 + d % 4] = uint8_t(std::clamp<long>(std::lrint(q[i * D + d] * inv), -31, 31) + kOffset);
    }
  }
  static constexpr int32_t kOffset = 32;
  int64_t D4;
  std::vector<uint8_t> packed;
  std::vector<float> unit;  // each query's value of one step
};

// The first pass keeps this many more candidates than k per query for rescoring. Its keys carry the 6-bit
// rounding, whose step is set by a query's largest value, so queries with a few dominant dimensions (after
// PCA) round the rest coarsely, and rows that near-tie the k-th (thousands per attribute combination in the
// demo model's 1M embeddings) trade places. Measured there under AVX2, recall@10 with k + 64 / 256 / 512 /
// 1024 candidates: int8 0.9777 / 0.9785 / 0.9785 / 0.9785, PCA 128 + int8 0.819 / 0.910 / 0.922 / 0.923, for
// 634 / 677 / 708 / 754 ms at Q = 256.
int64_t coarse_candidates(int64_t k, int64_t N) { return std::min(N, k + std::max<int64_t>(k, 512)); }

// Each query's k best of its candidate rows ([Q, W] row indices; -1 entries and repeats are skipped, as are rows
// the mask leaves out) by the keys of the scans: int16 queries where `q16` is usable (AVX2), else the fp32
// queries `qp` [Q, D]; then the terms. Ties to the smaller index: float32 keys and int64 indices [Q, k].
std::tuple<at::Tensor, at::Tensor> rescore_int8(const Int16Queries& q16, const float* qp, const Int8Terms& terms,
                                                ScanIsa isa, const int8_t* x, int64_t D, const bool* mask,
                                                const at::Tensor& candidates, int64_t k) {
  const int64_t Q = candidates.size(0), kc = candidates.size(1);
  at::Tensor values = at::empty({Q, k}, at::kFloat), indices = at::empty({Q, k}, at::kLong);
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  const int64_t* cand = candidates.data_ptr<int64_t>();
  const bool int16 = q16.usable();
  // blocks of 16 queries, taken by as many threads as the rescoring pays for
  parallel_take((Q + 15) / 16, threads_for_ns(double(Q * kc) * scan_row_ns(D, 1)), [&] {
    return [&, ranked = std::vector<std::pair<ord_t, int64_t>>()](int64_t b) mutable {
      for (int64_t q = 16 * b; q < std::min(Q, 16 * (b + 1)); ++q) {
        ranked.clear();
        for (int64_t j = 0; j < kc; ++j) {
          const int64_t row = cand[q * kc + j];
          if (row < 0 || (mask && !mask[row])) continue;
          float key;
          if (int16) int8_dots_i16(q16, q, 1, x + row * D, 1, &key);
          else int8_dots(isa, qp + q * D, 1, D, x + row * D, 1, &key);
          terms.apply(isa, &key, 1, 1, terms.query_bias ? terms.query_bias + q * terms.bias_width() : nullptr, row);
          ranked.emplace_back(to_ord<float>(key), row);
        }
        auto better = [](const auto& a, const auto& b) {
          return a.first != b.first ? a.first > b.first : a.second < b.second;
        };
        std::sort(ranked.begin(), ranked.end(), better);  // a repeated row sits next to itself: dropped
        ranked.erase(std::unique(ranked.begin(), ranked.end(),
                                 [](const auto& a, const auto& b) { return a.second == b.second; }),
                     ranked.end());
        const int64_t found = std::min<int64_t>(k, int64_t(ranked.size()));
        for (int64_t r = 0; r < k; ++r) {
          out_v[q * k + r] = r < found ? from_ord<float>(ranked[r].first) : -std::numeric_limits<float>::infinity();
          out_i[q * k + r] = r < found ? ranked[r].second : -1;
        }
      }
    };
  }, /*blas=*/false);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_int8_cpu(const at::Tensor& queries, const at::Tensor& codes, int64_t k,
                                                 const std::optional<at::Tensor>& query_bias,
                                                 const std::optional<at::Tensor>& row_scale,
                                                 const std::optional<at::Tensor>& row_bias,
                                                 const std::optional<at::Tensor>& mask,
                                                 const std::optional<at::Tensor>& row_group,
                                                 const std::optional<at::Tensor>& candidates) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dim(queries, 2, "queries", "[Q, D]");
  check_dim(codes, 2, "codes", "[N, D]");
  TORCH_CHECK(queries.scalar_type() == at::kFloat, "queries must be float32, got ", queries.scalar_type());
  TORCH_CHECK(codes.scalar_type() == at::kChar, "codes must be int8, got ", codes.scalar_type());
  TORCH_CHECK(queries.size(1) == codes.size(1), "queries and codes must have the same dimension D, got ",
              queries.size(1), " and ", codes.size(1));
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  TORCH_CHECK(queries.device().is_cpu() && codes.device().is_cpu(), "queries and codes must be CPU tensors");
  const int64_t Q = queries.size(0), N = codes.size(0), D = codes.size(1);
  // with candidates only their rows' groups are read, and checked (an IVF store's unused slots hold anything)
  const Int8Terms terms(query_bias, row_scale, row_bias, row_group, Q, N, /*check_groups=*/!candidates.has_value());
  at::Tensor keep;
  const bool* mask_ptr = mask_data(mask, N, keep);
  at::Tensor cand;
  if (candidates.has_value()) {
    check_dim(*candidates, 2, "candidates", "[Q, W]");
    TORCH_CHECK(candidates->scalar_type() == at::kLong && candidates->size(0) == Q,
                "candidates must be an int64 tensor [Q, W] with Q = ", Q, ", got ", candidates->scalar_type(),
                " of shape ", candidates->sizes());
    cand = candidates->contiguous();
    if (cand.numel()) {
      const auto [low, high] = at::aminmax(cand);
      TORCH_CHECK(low.item<int64_t>() >= -1 && high.item<int64_t>() < N,
                  "candidates must be row indices in [0, N) = [0, ", N, ") or -1, got values in [",
                  low.item<int64_t>(), ", ", high.item<int64_t>(), "]");
    }
  }
  if (Q == 0 || N == 0 || (cand.defined() && cand.size(1) == 0)) {
    return {at::full({Q, k}, -std::numeric_limits<float>::infinity(), at::kFloat), at::full({Q, k}, -1, at::kLong)};
  }
  const at::Tensor q = queries.contiguous(), x = codes.contiguous();
  const int8_t* xp = x.data_ptr<int8_t>();
  const float* qp = q.data_ptr<float>();
  if (cand.defined()) {  // only these rows per query: the rescoring pass (binary codes, the AVX2 first pass)
    const int64_t* rows = cand.data_ptr<int64_t>();
    for (int64_t i = 0; i < cand.numel(); ++i)
      if (rows[i] >= 0) terms.check_group_range(rows[i], rows[i] + 1);
    const ScanIsa isa = plan_codes_search(device_facts(codes.device()), 1, D, D, false).isa;
    const Int16Queries q16 = isa == ScanIsa::Avx2 ? Int16Queries(qp, Q, D) : Int16Queries();
    return rescore_int8(q16, qp, terms, isa, xp, D, mask_ptr, cand, k);
  }
  const CodesPlan plan = plan_codes_search(device_facts(codes.device()), Q, D, D, false);

  // Many queries on a CPU with an exact int8 GEMM: queries quantised to int8 (per-query scale), tiles
  // multiplied with torch._int_mm, keys = scale * int32. Else tiles are scanned (few queries) or decoded to
  // fp32 for a BLAS GEMM.
  const bool int8_gemm = plan.gemm && plan.int8_gemm && int8_gemm_exact();
  // The query is quantised twice: q / s = hi + lo / 254 with hi, lo in [-127, 127], so two int8 GEMMs give
  // the dot products to ~2e-5 of the query's range (one alone: ~4e-3, which swapped 12% of the top 10 in
  // tests) at half an int8 GEMM's speed, still ~2.5x an fp32 GEMM.
  at::Tensor q_hi, q_lo, qscale;
  if (int8_gemm) {
    qscale = q.abs().amax(1).clamp_min(1e-30) / 127.0;
    const at::Tensor scaled = q / qscale.unsqueeze(1);
    const at::Tensor hi = scaled.round().clamp_(-127, 127);
    q_hi = hi.to(at::kChar);
    q_lo = ((scaled - hi) * 254.0).round_().clamp_(-127, 127).to(at::kChar);
  }
  const float* qsp = int8_gemm ? qscale.data_ptr<float>() : nullptr;
  // AVX2 scans: queries rounded to int16 once (the codes widen to int16 in registers; see Int16Queries)
  const Int16Queries q16 = plan.isa == ScanIsa::Avx2 && (!plan.gemm || !int8_gemm) ? Int16Queries(qp, Q, D)
                                                                                  : Int16Queries();
  // Many queries on AVX2 (no exact int8 GEMM): a first pass with 6-bit queries (coarse_dots_avx2) keeps a
  // few candidates per query, rescored with the int16 queries. The pass's int32 sums hold up to
  // 63 * 128 * D; queries the int16 rounding refuses take the fp32 route whole.
  if (plan.gemm && !int8_gemm && plan.isa == ScanIsa::Avx2 && q16.usable() && D <= 65536) {
#ifdef XMODAL_X86
    const CoarseQueries cq(qp, Q, D);
    auto make_coarse = [&] {
      return [&, sums = std::vector<int32_t>(), row_sums = std::vector<int32_t>(), last = std::vector<int8_t>(),
              tile = int64_t(-1)](int64_t n0, int64_t nt, int64_t q0, int64_t qn, float* keys) mutable {
        const int64_t b0 = q0 / 8, b1 = (q0 + qn + 7) / 8, D4 = cq.D4;
        sums.resize(size_t((b1 - b0) * 8 * nt));
        const int8_t* rows = xp + n0 * D;
        // rows are read a dword at a time: the codes' very last row, when D is not a multiple of 4, from a copy
        const int64_t body = D % 4 != 0 && n0 + nt == N ? nt - 1 : nt;
        if (tile != n0) {  // once per tile: its query blocks come one after another
          tile = n0;
          row_sums.resize(size_t(nt));
          code_sums_avx2(rows, D, nt, row_sums.data());
          if (body < nt) {
            last.assign(size_t(D4 * 4), 0);
            std::copy_n(rows + body * D, D, last.data());
          }
        }
        auto run = [&](auto kernel, int64_t b) {
          int32_t* out = sums.data() + (b - b0) * 8 * nt;
          kernel(cq.packed.data() + b * D4 * 32, D4, rows, D, body, out, nt);
          if (body < nt) kernel(cq.packed.data() + b * D4 * 32, D4, last.data(), D, 1, out + body, nt);
        };
        int64_t b = b0;
        for (; b + 2 <= b1; b += 2) run(coarse_dots_avx2<3, 2>, b);
        if (b < b1) run(coarse_dots_avx2<3, 1>, b);
        for (int64_t i = 0; i < qn; ++i) {
          const int32_t* sum = sums.data() + (q0 + i - b0 * 8) * nt;
          const float unit = cq.unit[q0 + i];
          for (int64_t j = 0; j < nt; ++j)
            keys[i * nt + j] = float(sum[j] - CoarseQueries::kOffset * row_sums[j]) * unit;
        }
        terms.apply(plan.isa, keys, qn, nt, terms.query_bias ? terms.query_bias + q0 * terms.bias_width() : nullptr, n0);
      };
    };
    const at::Tensor candidates =
        std::get<1>(float_key_topk(Q, N, coarse_candidates(k, N), plan.tile_rows, plan.query_block, mask_ptr, D,
                                   /*blas=*/true, make_coarse));
    return rescore_int8(q16, qp, terms, plan.isa, xp, D, mask_ptr, candidates, k);
#endif
  }
  auto make_scorer = [&] {
    // this thread's decoded tile / int32 scores, reused from tile to tile
    at::Tensor scratch = int8_gemm ? at::empty({2, plan.query_block * plan.tile_rows}, at::kInt)
                         : plan.gemm ? at::empty({plan.tile_rows, D}, at::kFloat)
                                     : at::Tensor();
    return [&, scratch](int64_t n0, int64_t nt, int64_t q0, int64_t qn, float* keys) mutable {
      if (int8_gemm) {
        at::Tensor hi = scratch[0].narrow(0, 0, qn * nt).view({qn, nt});
        at::Tensor lo = scratch[1].narrow(0, 0, qn * nt).view({qn, nt});
        const at::Tensor tile = x.narrow(0, n0, nt).t();
        at::_int_mm_out(hi, q_hi.narrow(0, q0, qn), tile);
        at::_int_mm_out(lo, q_lo.narrow(0, q0, qn), tile);
        const int32_t* hp = hi.data_ptr<int32_t>();
        const int32_t* lp = lo.data_ptr<int32_t>();
        for (int64_t i = 0; i < qn; ++i) {
          const float s = qsp[q0 + i];
          for (int64_t j = 0; j < nt; ++j)
            keys[i * nt + j] = (float(hp[i * nt + j]) + float(lp[i * nt + j]) * (1.0f / 254.0f)) * s;
        }
      } else if (plan.gemm) {
        float* tp = scratch.data_ptr<float>();
        decode(plan.isa, xp + n0 * D, nt * D, tp);
        at::Tensor out = at::from_blob(keys, {qn, nt}, at::kFloat);
        at::mm_out(out, q.narrow(0, q0, qn), scratch.narrow(0, 0, nt).t());
      } else {
        if (q16.usable()) int8_dots_i16(q16, q0, qn, xp + n0 * D, nt, keys);
        else int8_dots(plan.isa, qp + q0 * D, qn, D, xp + n0 * D, nt, keys);
      }
      terms.apply(plan.isa, keys, qn, nt, terms.query_bias ? terms.query_bias + q0 * terms.bias_width() : nullptr, n0);
    };
  };
  return float_key_topk(Q, N, k, plan.tile_rows, plan.query_block, mask_ptr, D, plan.gemm, make_scorer);
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CPU, m) { m.impl("topk_int8", &topk_int8_cpu); }

}  // namespace xmodal
