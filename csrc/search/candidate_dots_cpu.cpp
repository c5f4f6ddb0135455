// candidate_dots on the CPU (schema in csrc/xmodal.cpp): each query's dot products with its own candidate
// rows, in float32 -- the exact rescoring of a shortlist that a cheaper pass picked (the k-means assignment's
// bf16 shortlist, python/xmodal/index/kmeans.py). A query's candidates are scattered rows, so this gathers them
// (graph/gather_dots.h) rather than scanning.
#include "common/checks.h"
#include "common/parallel.h"
#include "graph/gather_dots.h"
#include "search/planner.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace xmodal {
namespace {

template <typename T>
void dots_of_candidates(const float* q, int64_t Q, int64_t D, const T* x, int64_t ld, const int64_t* cand, int64_t W,
                        float* out) {
  const ScanIsa isa = cpu_scan_isa();
  constexpr int64_t kBlock = 256;  // queries an item takes
  const double ns = double(Q) * double(W) * double(D) * 0.5;  // ~0.5 ns a gathered element
  parallel_take((Q + kBlock - 1) / kBlock, threads_for_ns(ns), [&] {
    return [&, rows = std::vector<int32_t>(size_t(W)), at = std::vector<int64_t>(size_t(W)),
            dots = std::vector<float>(size_t(W))](int64_t b) mutable {
      for (int64_t i = b * kBlock; i < std::min(Q, (b + 1) * kBlock); ++i) {
        float* o = out + i * W;
        int64_t n = 0;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t c = cand[i * W + j];
          if (c < 0) {
            o[j] = -std::numeric_limits<float>::infinity();
          } else {
            rows[n] = int32_t(c);
            at[n++] = j;
          }
        }
        gather_dots(isa, q + i * D, x, ld, rows.data(), n, D, dots.data());
        for (int64_t j = 0; j < n; ++j) o[at[j]] = dots[j];
      }
    };
  }, /*blas=*/false);
}

at::Tensor candidate_dots_cpu(const at::Tensor& queries, const at::Tensor& rows, const at::Tensor& candidates) {
  check_dim(queries, 2, "queries", "[Q, D]");
  check_dim(rows, 2, "rows", "[N, D]");
  check_dim(candidates, 2, "candidates", "[Q, W]");
  TORCH_CHECK(queries.scalar_type() == at::kFloat && queries.device().is_cpu(),
              "queries must be float32 on the CPU, got ", queries.scalar_type(), " on ", queries.device());
  TORCH_CHECK((rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16) && rows.device().is_cpu(),
              "rows must be float32 or bfloat16 on the CPU, got ", rows.scalar_type(), " on ", rows.device());
  TORCH_CHECK(rows.stride(1) == 1 || rows.size(1) <= 1, "rows must have unit stride within a row");
  TORCH_CHECK(rows.size(1) == queries.size(1), "rows must have D = ", queries.size(1),
              " columns (the queries' dimension), got ", rows.size(1));
  TORCH_CHECK(rows.size(0) < (int64_t(1) << 31), "rows must number fewer than 2^31, got ", rows.size(0));
  TORCH_CHECK(candidates.scalar_type() == at::kLong && candidates.device().is_cpu() &&
                  candidates.size(0) == queries.size(0),
              "candidates must be an int64 [Q, W] CPU tensor with Q = ", queries.size(0), " rows, got ",
              candidates.scalar_type(), " ", candidates.sizes(), " on ", candidates.device());
  const at::Tensor q = queries.contiguous(), c = candidates.contiguous();
  const int64_t Q = q.size(0), D = q.size(1), W = c.size(1), N = rows.size(0);
  const int64_t* cp = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < Q * W; ++i)
    TORCH_CHECK_INDEX(cp[i] >= -1 && cp[i] < N, "candidates must be rows in [0, ", N, ") or -1, got ", cp[i],
                      " at [", i / std::max<int64_t>(W, 1), ", ", i % std::max<int64_t>(W, 1), "]");
  at::Tensor out = at::empty({Q, W}, q.options());
  if (Q == 0 || W == 0) return out;
  if (rows.scalar_type() == at::kFloat)
    dots_of_candidates(q.data_ptr<float>(), Q, D, rows.data_ptr<float>(), rows.stride(0), cp, W, out.data_ptr<float>());
  else
    dots_of_candidates(q.data_ptr<float>(), Q, D, rows.data_ptr<c10::BFloat16>(), rows.stride(0), cp, W,
                       out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CPU, m) { m.impl("candidate_dots", &candidate_dots_cpu); }

}  // namespace xmodal
