// Top-k search over binary codes on the CPU (Hamming distance): the topk_hamming op and its row kernel
// (popcnt, or AVX-512 VPOPCNTDQ on rows of a multiple of 512 bits), which the IVF list scan shares
// (codes_cpu.h). Tiles of rows feed per-query candidate buffers as in the other searches (codes_topk.h).
#include "common/checks.h"
#include "search/codes_cpu.h"
#include "search/codes_topk.h"
#include "search/cpu_simd.h"
#include "search/planner.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace xmodal {
namespace {

__attribute__((target("popcnt"))) void hamming_popcnt(const uint64_t* q, const uint64_t* x, int64_t n, int64_t words,
                                                      float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t* row = x + j * words;
    int64_t d = 0;
    for (int64_t w = 0; w < words; ++w) d += __builtin_popcountll(q[w] ^ row[w]);
    out[j] = -float(d);
  }
}

#ifdef XMODAL_X86
// 8 words per instruction; rows of a multiple of 8 words (512 bits), else the popcnt loop
__attribute__((target("avx512f,avx512vpopcntdq"))) void hamming_vpopcnt(const uint64_t* q, const uint64_t* x,
                                                                        int64_t n, int64_t words, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t* row = x + j * words;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t w = 0; w < words; w += 8) {
      const __m512i a = _mm512_loadu_si512(q + w), b = _mm512_loadu_si512(row + w);
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(a, b)));
    }
    out[j] = -float(_mm512_reduce_add_epi64(acc));
  }
}
#endif

}  // namespace

void hamming_keys(bool vpopcnt, const uint64_t* q, const uint64_t* x, int64_t n, int64_t words, float* out) {
#ifdef XMODAL_X86
  if (vpopcnt && words % 8 == 0) return hamming_vpopcnt(q, x, n, words, out);
#endif
  hamming_popcnt(q, x, n, words, out);
}

namespace {

std::tuple<at::Tensor, at::Tensor> topk_hamming_cpu(const at::Tensor& queries, const at::Tensor& codes, int64_t k,
                                                    const std::optional<at::Tensor>& mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_dim(queries, 2, "queries", "[Q, B]");
  check_dim(codes, 2, "codes", "[N, B]");
  TORCH_CHECK(queries.scalar_type() == at::kByte && codes.scalar_type() == at::kByte,
              "queries and codes must be uint8 (packed bits), got ", queries.scalar_type(), " and ",
              codes.scalar_type());
  TORCH_CHECK(queries.size(1) == codes.size(1), "queries and codes must have the same number of bytes B, got ",
              queries.size(1), " and ", codes.size(1));
  TORCH_CHECK(codes.size(1) % 8 == 0, "codes must hold a multiple of 8 bytes (64 bits) per row, got ",
              codes.size(1));
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  TORCH_CHECK(queries.device().is_cpu() && codes.device().is_cpu(), "queries and codes must be CPU tensors");
  const int64_t Q = queries.size(0), N = codes.size(0), words = codes.size(1) / 8;
  at::Tensor keep;
  const bool* mask_ptr = mask_data(mask, N, keep);
  if (Q == 0 || N == 0)
    return {at::full({Q, k}, std::numeric_limits<int32_t>::max(), at::kInt), at::full({Q, k}, -1, at::kLong)};
  const at::Tensor q = queries.contiguous(), x = codes.contiguous();
  const auto* qp = reinterpret_cast<const uint64_t*>(q.data_ptr<uint8_t>());
  const auto* xp = reinterpret_cast<const uint64_t*>(x.data_ptr<uint8_t>());
  const CodesPlan plan = plan_codes_search(device_facts(codes.device()), Q, words * 64, words * 8, true);
  const bool vpopcnt = plan.vpopcnt && words % 8 == 0;
  auto make_scorer = [&] {
    return [&](int64_t n0, int64_t nt, int64_t q0, int64_t qn, float* keys) {
      for (int64_t i = 0; i < qn; ++i) hamming_keys(vpopcnt, qp + (q0 + i) * words, xp + n0 * words, nt, words, keys + i * nt);
    };
  };
  auto [neg, indices] =
      float_key_topk(Q, N, k, plan.tile_rows, plan.query_block, mask_ptr, words * 8, /*blas=*/false, make_scorer);
  // keys are minus the distances; padding (-inf) becomes INT32_MAX
  at::Tensor dist = neg.neg().masked_fill_(indices < 0, 0).to(at::kInt).masked_fill_(
      indices < 0, std::numeric_limits<int32_t>::max());
  return {dist, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CPU, m) { m.impl("topk_hamming", &topk_hamming_cpu); }

}  // namespace xmodal
