// The top-k driver of the compressed-code searches (codes_int8_cpu.cpp, codes_hamming_cpu.cpp): per-tile scorers
// that write float keys feed the tiled top-k (tiled_topk.h), and the optional row mask is checked once.
#pragma once
#include "search/tiled_topk.h"
#include "search/topk_select.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace xmodal {

// The k largest float keys of each query over N rows, from scorers that write a tile's keys [qn, nt] as
// floats (score_tile(n0, nt, q0, qn, keys)): float32 keys [Q, k] best first (padded with -inf) and int64 row
// indices (-1 padding); ties go to the smaller index.
// row_bytes: the bytes of one row, for the thread count (tiled_topk.h, scan_row_ns); blas: a scorer may call
// BLAS (parallel.h, parallel_take).
template <typename MakeScorer>
std::tuple<at::Tensor, at::Tensor> float_key_topk(int64_t Q, int64_t N, int64_t k, int64_t tile_rows,
                                                  int64_t query_block, const bool* mask, int64_t row_bytes,
                                                  bool blas, const MakeScorer& make_scorer) {
  using ord_t = int32_t;
  at::Tensor values = at::empty({Q, k}, at::kFloat), indices = at::empty({Q, k}, at::kLong);
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  auto make_ranker = [&] {
    return [score_tile = make_scorer(), keys = std::vector<float>(), ords = std::vector<ord_t>(), mask](
               int64_t n0, int64_t nt, int64_t q0, int64_t qn, const auto& emit) mutable {
      keys.resize(size_t(qn * nt));
      ords.resize(size_t(nt));
      score_tile(n0, nt, q0, qn, keys.data());
      for (int64_t i = 0; i < qn; ++i) {
        const float* row = keys.data() + i * nt;
        for (int64_t j = 0; j < nt; ++j) ords[j] = (mask && !mask[n0 + j]) ? kSkipOrd<ord_t> : to_ord<float>(row[j]);
        emit(i, ords.data());
      }
    };
  };
  tiled_topk<ord_t>(Q, N, k, tile_rows, query_block, make_ranker,
                    [&](int64_t q, int64_t found, const std::vector<Candidate<ord_t>>& merged) {
                      for (int64_t r = 0; r < k; ++r) {
                        out_v[q * k + r] = r < found ? from_ord<float>(merged[r].key) : -std::numeric_limits<float>::infinity();
                        out_i[q * k + r] = r < found ? merged[r].index : -1;
                      }
                    },
                    scan_row_ns(row_bytes, std::min(std::max<int64_t>(Q, 1), query_block)), blas);
  return {values, indices};
}

// The mask's data ([N] bool, checked; `keep` holds a contiguous copy), or nullptr without a mask.
inline const bool* mask_data(const std::optional<at::Tensor>& mask, int64_t n, at::Tensor& keep) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == n,
              "mask must be a 1-D bool tensor [N] = [", n, "], got ", mask->scalar_type(), " of shape ",
              mask->sizes());
  keep = mask->contiguous();
  return keep.data_ptr<bool>();
}

}  // namespace xmodal
