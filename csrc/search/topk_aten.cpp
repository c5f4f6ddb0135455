// The "aten" strategy: what naive PyTorch does (a GEMM, then torch.topk), in bounded tiles.
//
// Scores exist for one [query block x row chunk] at a time (at most 2^28 elements on a GPU, 2^26 on the
// CPU); each chunk's top-k is merged into a running top-k. When Q x N fits the budget this is one GEMM and
// one topk, as naive. The k winners' values are then recomputed from their rows in fp32/fp64, so they are
// exact to the accumulation dtype even when the GEMM ran in 16 bits, and sorted with the op's order (NaN
// after every number, padding last, ties to the smaller index). Written with ATen ops only: it runs on every
// device.
#include "common/checks.h"
#include "search/planner.h"

#include <limits>

#ifdef XMODAL_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

namespace xmodal {
namespace {

// Whether the current CUDA stream is being captured into a graph (then nothing may synchronise with the host).
bool capturing(const at::Tensor& t) {
#ifdef XMODAL_WITH_CUDA
  return t.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#else
  return false;
#endif
}

// The ranking key of every (query, row) pair of one chunk (larger is better; see topk_common.h), in the
// GEMM's dtype. kl: `qpos` marks q_i > 0, so rows with d_i = 0 < q_i get -inf.
at::Tensor chunk_keys(Metric metric, const at::Tensor& q, const at::Tensor& qpos, const at::Tensor& x,
                      at::ScalarType acc) {
  switch (metric) {
    case Metric::IP: return at::mm(q, x.t());
    case Metric::Cosine:
    case Metric::CosineDistance: return at::mm(q, x.t()).mul_(row_norm_term(x, metric, acc).to(q.scalar_type()));
    case Metric::L2:
    case Metric::SqEuclidean:
      return at::addmm(row_norm_term(x, metric, acc).neg_().to(q.scalar_type()).unsqueeze(0), q, x.t(), 1, 2);
    case Metric::KL: {
      const at::Tensor d = x.to(acc);
      const at::Tensor zero = d == 0;
      at::Tensor keys = at::mm(q, at::log(d).masked_fill_(zero, 0).t());
      return keys.masked_fill_(at::mm(qpos, zero.to(acc).t()) > 0, -std::numeric_limits<double>::infinity());
    }
  }
  TORCH_CHECK(false, "unknown metric");
}

// The metric's value between each query q [C, D] and its rows x [C, k, D] (acc dtype).
at::Tensor pair_values(Metric metric, const at::Tensor& q, const at::Tensor& x) {
  const at::Tensor qb = q.unsqueeze(1);
  switch (metric) {
    case Metric::IP: return (qb * x).sum(-1);
    case Metric::Cosine:
    case Metric::CosineDistance: {
      const at::Tensor cos = (qb * x).sum(-1) / (qb.norm(2, -1).clamp_min(kNormEps) * x.norm(2, -1).clamp_min(kNormEps));
      return metric == Metric::Cosine ? cos : (2 * (1 - cos)).clamp_min(0).sqrt();
    }
    case Metric::L2: return (qb - x).norm(2, -1);
    case Metric::SqEuclidean: return (qb - x).square().sum(-1);
    case Metric::KL: return (at::xlogy(qb, qb) - at::xlogy(qb, x)).sum(-1);
  }
  TORCH_CHECK(false, "unknown metric");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> aten_search(const SearchArgs& a) {
  const at::Tensor& X = a.database;
  const int64_t Q = a.queries.size(0), N = X.size(0), D = X.size(1), k = a.k;
  const Metric metric = a.metric;
  const auto acc = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double inf = std::numeric_limits<double>::infinity();

  at::Tensor q_gemm = metric == Metric::KL ? a.queries.to(acc) : a.queries;
  const at::Tensor qpos = metric == Metric::KL ? (q_gemm > 0).to(acc) : at::Tensor();
  // kl: negative entries counted on the device, checked once at the end (one synchronisation; not while a
  // CUDA graph is captured)
  at::Tensor negative_entries;
  if (metric == Metric::KL && !capturing(X)) {
    negative_entries = (q_gemm < 0).sum();
  }
  const int64_t budget = X.is_cuda() ? (int64_t(1) << 28) : (int64_t(1) << 26);
  const int64_t chunk_rows = std::min(N, std::max<int64_t>(4096, budget / std::max<int64_t>(Q, 1)));
  const int64_t query_block = std::min(Q, std::max<int64_t>(1, budget / chunk_rows));
  const at::Tensor excluded = a.mask.has_value() ? a.mask->logical_not() : at::Tensor();
  // torch.topk ranks NaN first: NaN and a real -inf become the keys' lowest finite value, so that masked-out
  // rows (-inf, below) are the only ones under them and are never chosen over a candidate
  const auto key_dtype = q_gemm.scalar_type();
  const double lowest = key_dtype == at::kDouble     ? std::numeric_limits<double>::lowest()
                        : key_dtype == at::kHalf     ? -65504.0
                        : key_dtype == at::kBFloat16 ? -3.3895313892515355e38
                                                     : double(std::numeric_limits<float>::lowest());

  std::vector<at::Tensor> block_idx, block_pad;
  for (int64_t q0 = 0; q0 < Q; q0 += query_block) {
    const at::Tensor qb = q_gemm.narrow(0, q0, std::min(Q, q0 + query_block) - q0);
    at::Tensor best_key, best_idx;
    for (int64_t n0 = 0; n0 < N; n0 += chunk_rows) {
      const int64_t nc = std::min(N, n0 + chunk_rows) - n0;
      const at::Tensor x = X.narrow(0, n0, nc);
      if (negative_entries.defined()) negative_entries = negative_entries + (x < 0).sum();
      at::Tensor keys = chunk_keys(metric, qb, metric == Metric::KL ? qpos.narrow(0, q0, qb.size(0)) : qpos, x, acc);
      keys.nan_to_num_(lowest, c10::nullopt, lowest);
      if (excluded.defined()) keys.masked_fill_(excluded.narrow(0, n0, nc).unsqueeze(0), -inf);
      auto [ck, ci] = at::topk(keys, std::min(k, nc), 1, true, false);
      ci.add_(n0);
      if (best_key.defined()) {
        ck = at::cat({best_key, ck}, 1);
        ci = at::cat({best_idx, ci}, 1);
        auto [mk, pos] = at::topk(ck, std::min<int64_t>(k, ck.size(1)), 1, true, false);
        ck = mk;
        ci = ci.gather(1, pos);
      }
      best_key = ck;
      best_idx = ci;
    }
    block_idx.push_back(best_idx);
    block_pad.push_back(best_key == -inf);  // only masked-out rows have key -inf
  }
  at::Tensor idx = at::cat(block_idx, 0), pad = at::cat(block_pad, 0);
  if (negative_entries.defined())
    TORCH_CHECK(negative_entries.item<int64_t>() == 0,
                "queries and database must be non-negative with metric 'kl', found a negative entry");

  // Recompute the winners' values from their rows, then order them: numbers best first, then NaN, then
  // padding; ties go to the smaller index (stable sorts, least significant key first).
  const int64_t found = idx.size(1);
  at::Tensor rows = X.index_select(0, idx.reshape({-1})).to(acc).view({Q, found, D});
  at::Tensor values = pair_values(metric, a.queries.to(acc), rows);
  const bool larger = larger_is_better(metric);
  at::Tensor order = std::get<1>(at::sort(idx, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  auto take = [&order](const at::Tensor& t) { return t.gather(1, order); };
  idx = take(idx), pad = take(pad), values = take(values);
  at::Tensor rank_key = (larger ? values : values.neg()).nan_to_num(-inf, inf, -inf).masked_fill(pad, -inf);
  order = std::get<1>(at::sort(rank_key, /*stable=*/true, /*dim=*/1, /*descending=*/true));
  idx = take(idx), pad = take(pad), values = take(values);
  const at::Tensor rank_class = pad.to(at::kInt) * 2 + (values.isnan() & pad.logical_not()).to(at::kInt);
  order = std::get<1>(at::sort(rank_class, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  idx = take(idx), pad = take(pad), values = take(values);

  const double pad_value = larger ? -inf : inf;
  at::Tensor out_v = at::full({Q, k}, pad_value, a.queries.options());
  at::Tensor out_i = at::full({Q, k}, -1, idx.options());
  out_v.narrow(1, 0, found).copy_(values.masked_fill(pad, pad_value));
  out_i.narrow(1, 0, found).copy_(idx.masked_fill(pad, -1));
  return finish_results(a, out_v, out_i);
}

}  // namespace xmodal
