// Fused top-k similarity search on the CPU.
//
// The database is cut into tiles of rows that fit in L2 (the driver: tiled_topk.h). For every tile a
// thread computes a [query block x tile] score block with a GEMM (MKL/oneDNN through ATen, or MKL's
// bf16/fp16 GEMM with fp32 output), turns the scores into ranking keys while they are in cache, and feeds
// them to per-query candidate buffers (topk_select.h). The Q x N score matrix never exists.
#include "common/parallel.h"
#include "search/cpu_scan.h"
#include "search/planner.h"
#include "search/search_cpu.h"
#include "search/topk_common.h"
#include "search/tiled_topk.h"
#include "search/topk_select.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#include <cmath>
#include <cstdlib>
#include <vector>

namespace xmodal {
namespace {

// ---------------------------------------------------------------------------------------------------------
// MKL's 16-bit GEMMs (planner.h, find_gemm16) accumulate and write fp32 (AMX where present); ATen's CPU
// matmul would round bf16/fp16 scores to 16 bits. Where a torch build lacks them, ATen's 16-bit GEMM runs.
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

// out[m, n] = a[m, :] · b[n, :] (row-major, leading dimension n), the way the plan says (planner.h, TileGemm).
// `half_scores`: this thread's buffer for Aten16's 16-bit scores.
// `norms` (fp32 only): also write the tile rows' squared norms there, in the scan's pass over the rows.
template <typename acc_t>
void score_tile(const Plan& plan, const at::Tensor& a, const at::Tensor& b, acc_t* out, at::Tensor& half_scores,
                float* norms = nullptr) {
  const int64_t m = a.size(0), n = b.size(0), d = a.size(1);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (plan.gemm == TileGemm::Scan && a.scalar_type() == at::kFloat && a.is_contiguous() && b.stride(1) == 1) {
      scan_dots(plan.scan_isa, a.data_ptr<float>(), m, b, out, norms);
      return;
    }
    if (norms) squared_norms(plan.scan_isa, b, norms);
  }
  if (a.scalar_type() == acc_dtype) {
    if (m == 1) {  // one query: a row-major matrix-vector product streams the tile slightly faster
      auto o = at::from_blob(out, {n}, at::TensorOptions().dtype(acc_dtype));
      at::mv_out(o, b, a[0]);
      return;
    }
    auto o = at::from_blob(out, {m, n}, at::TensorOptions().dtype(acc_dtype));
    at::mm_out(o, a, b.t());
    return;
  }
  auto o = at::from_blob(out, {m, n}, at::TensorOptions().dtype(acc_dtype));
  Gemm16Fn fn = plan.gemm == TileGemm::Mkl16 ? find_gemm16(a.scalar_type()) : nullptr;
  const bool rows_ok = a.stride(1) == 1 && b.stride(1) == 1 && d > 0 && a.stride(0) >= d && b.stride(0) >= d &&
                       std::max({m, n, d, a.stride(0), b.stride(0)}) < (int64_t(1) << 31);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fn && rows_ok) {
      fn(kCblasRowMajor, kCblasNoTrans, kCblasTrans, int(m), int(n), int(d), 1.0f, a.data_ptr(), int(a.stride(0)),
         b.data_ptr(), int(b.stride(0)), 0.0f, out, int(n));
      return;
    }
  }
  // ATen's 16-bit GEMM: 16-bit scores (as naive PyTorch has them), widened while they are in cache
  if (!half_scores.defined() || half_scores.numel() < m * n) half_scores = at::empty({m * n}, a.options());
  at::Tensor h = half_scores.narrow(0, 0, m * n).view({m, n});
  at::mm_out(h, a, b.t());
  o.copy_(h);
}

// ---------------------------------------------------------------------------------------------------------

template <typename acc_t>
struct QuerySide {  // per-query terms, computed once per call
  at::Tensor gemm_operand;  // what multiplies the database tile (the queries, or fp32/64 queries for kl)
  at::Tensor positive;      // kl: 1 where q_i > 0 (to detect d_i = 0 < q_i with a second GEMM)
  std::vector<acc_t> term;  // cosine: 1/||q||; l2: ||q||²; kl: Σ q log q
};

template <typename acc_t>
struct TileSide {  // per-database-row terms for one tile
  at::Tensor gemm_operand;  // the tile rows, or log of them for kl
  at::Tensor zeros;         // kl: 1 where d_i = 0 (undefined when !has_zeros)
  at::Tensor widened;       // TileGemm::Widen: this thread's fp32 copy of the tile, reused from tile to tile
  bool has_zeros = false;
  bool norms_pending = false;  // term holds room for squared norms that the next scan of the tile writes
  std::vector<acc_t> term;  // cosine: 1/||x||; l2: ||x||²
};

template <typename acc_t>
QuerySide<acc_t> prepare_queries(const at::Tensor& queries, Metric metric, TileGemm gemm) {
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  QuerySide<acc_t> qs;
  at::Tensor term = row_norm_term(queries, metric, acc_dtype);
  if (metric == Metric::KL) {
    at::Tensor q = queries.to(acc_dtype);
    TORCH_CHECK(!(q < 0).any().item<bool>(), "queries must be non-negative with metric 'kl', found a negative entry");
    term = at::xlogy(q, q).sum(1);
    qs.positive = (q > 0).to(acc_dtype).contiguous();
    qs.gemm_operand = q.contiguous();
  }
  // widened tiles and the scan multiply fp32 queries
  if (!qs.gemm_operand.defined() && (gemm == TileGemm::Widen || gemm == TileGemm::Scan))
    qs.gemm_operand = queries.to(acc_dtype).contiguous();
  if (!qs.gemm_operand.defined()) qs.gemm_operand = queries.stride(1) == 1 ? queries : queries.contiguous();
  if (term.defined()) {
    term = term.contiguous();
    qs.term.assign(term.template data_ptr<acc_t>(), term.template data_ptr<acc_t>() + term.numel());
  }
  return qs;
}

// Squared norms into the metric's per-row term: cosine keeps 1 / max(norm, eps), l2 the squared norm.
inline void finish_norm_term(Metric metric, std::vector<float>& term) {
  if (metric == Metric::Cosine || metric == Metric::CosineDistance)
    for (float& v : term) v = 1.0f / std::max(std::sqrt(v), float(kNormEps));
}

template <typename acc_t>
void prepare_tile(const at::Tensor& tile, Metric metric, const Plan& plan, int64_t first_row, TileSide<acc_t>& ts) {
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const TileGemm gemm = plan.gemm;
  ts.term.clear();
  ts.has_zeros = false;
  ts.norms_pending = false;
  at::Tensor term;
  const bool needs_norms = metric == Metric::Cosine || metric == Metric::CosineDistance || metric == Metric::L2 ||
                           metric == Metric::SqEuclidean;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (needs_norms && (tile.element_size() == 2 || tile.scalar_type() == at::kFloat) && tile.stride(1) == 1) {
      // squared norms in registers (ATen would copy a 16-bit tile to fp32 first): during the scan of the tile
      // when the plan scans (the rows are then read once), else here
      ts.term.resize(size_t(tile.size(0)));
      if (gemm == TileGemm::Scan) {
        ts.norms_pending = true;
      } else {
        squared_norms(plan.scan_isa, tile, ts.term.data());
        finish_norm_term(metric, ts.term);
      }
    }
  }
  if (ts.term.empty()) term = row_norm_term(tile, metric, acc_dtype);
  if (metric == Metric::KL) {
    at::Tensor d = tile.to(acc_dtype);
    TORCH_CHECK(!(d < 0).any().item<bool>(), "database must be non-negative with metric 'kl', found a negative "
                "entry in rows ", first_row, " to ", first_row + tile.size(0) - 1);
    at::Tensor zero = d == 0;
    ts.has_zeros = zero.any().item<bool>();
    at::Tensor logd = at::log(d);
    if (ts.has_zeros) {
      logd.masked_fill_(zero, 0);  // 0·log 0 = 0; d_i = 0 < q_i is caught by the zeros GEMM
      ts.zeros = zero.to(acc_dtype);
    }
    ts.gemm_operand = logd;
  }
  if (metric != Metric::KL && gemm == TileGemm::Widen) {
    if (!ts.widened.defined() || ts.widened.size(0) < tile.size(0))
      ts.widened = at::empty({tile.size(0), tile.size(1)}, tile.options().dtype(acc_dtype));
    ts.gemm_operand = ts.widened.narrow(0, 0, tile.size(0));
    ts.gemm_operand.copy_(tile);
  } else if (metric != Metric::KL) {
    ts.gemm_operand = tile.stride(1) == 1 ? tile : tile.contiguous();
  }
  if (term.defined()) {
    term = term.contiguous();
    ts.term.assign(term.template data_ptr<acc_t>(), term.template data_ptr<acc_t>() + term.numel());
  }
}

// Ranking keys of one query's row of scores against one tile (larger is better); see topk_common.h.
template <typename acc_t, typename ord_t>
void row_keys(Metric metric, const acc_t* score, const acc_t* zero_hits, const acc_t* term, const bool* mask,
              int64_t n, ord_t* keys) {
  switch (metric) {
    case Metric::IP:
      for (int64_t j = 0; j < n; ++j) keys[j] = to_ord<acc_t>(score[j]);
      break;
    case Metric::Cosine:
    case Metric::CosineDistance:
      for (int64_t j = 0; j < n; ++j) keys[j] = to_ord<acc_t>(score[j] * term[j]);
      break;
    case Metric::L2:
    case Metric::SqEuclidean:
      for (int64_t j = 0; j < n; ++j) keys[j] = to_ord<acc_t>(2 * score[j] - term[j]);
      break;
    case Metric::KL:
      if (zero_hits) {
        const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < n; ++j) keys[j] = to_ord<acc_t>(zero_hits[j] > 0 ? ninf : score[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) keys[j] = to_ord<acc_t>(score[j]);
      }
      break;
  }
  if (mask)
    for (int64_t j = 0; j < n; ++j) keys[j] = mask[j] ? keys[j] : kSkipOrd<ord_t>;
}

// The metric's value for query i from its ranking key.
template <typename acc_t>
acc_t key_to_value(Metric metric, acc_t key, const std::vector<acc_t>& qterm, int64_t i) {
  switch (metric) {
    case Metric::IP: return key;
    case Metric::Cosine: return key * qterm[i];
    case Metric::CosineDistance: {
      const acc_t c = key * qterm[i];
      return c != c ? c : std::sqrt(std::max<acc_t>(2 * (1 - c), 0));
    }
    case Metric::SqEuclidean:
    case Metric::L2: {
      const acc_t sq = qterm[i] - key;
      if (sq != sq) return sq;
      return metric == Metric::L2 ? std::sqrt(std::max<acc_t>(sq, 0)) : std::max<acc_t>(sq, 0);
    }
    case Metric::KL: return qterm[i] - key;
  }
  return key;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> search_cpu(const SearchArgs& args, const Plan& plan) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using ord_t = ord_type<acc_t>;
  const Metric metric = args.metric;
  const at::Tensor& database = args.database;
  const int64_t Q = args.queries.size(0), N = database.size(0), D = database.size(1), k = args.k;
  const int64_t gemm_elem = metric == Metric::KL ? int64_t(sizeof(acc_t)) : database.element_size();
  // Tile sizes come from the plan (search/planner.cpp says why).
  // (never more rows than the database has: the scorers' buffers are sized by it, and a small search must
  // not pay for clearing a large one)
  const int64_t tile_rows = std::min(std::clamp<int64_t>(plan.tile_bytes / std::max<int64_t>(D * gemm_elem, 1) / 16 * 16, 64, 65536),
                                     std::max<int64_t>((N + 15) / 16 * 16, 16));
  const int64_t query_block = std::min<int64_t>(Q, plan.query_block);

  QuerySide<acc_t> qside = prepare_queries<acc_t>(args.queries, metric, plan.gemm);
  const bool* mask = args.mask ? args.mask->data_ptr<bool>() : nullptr;
  at::Tensor values = at::empty({Q, k}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  auto indices = at::empty({Q, k}, at::TensorOptions().dtype(at::kLong));
  acc_t* out_v = values.template data_ptr<acc_t>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  const acc_t pad = larger_is_better(metric) ? -std::numeric_limits<acc_t>::infinity()
                                             : std::numeric_limits<acc_t>::infinity();

  // Each thread scores a tile per query block with the plan's GEMM and turns the scores into ranking keys
  // while they are in cache; the tile's per-row terms are prepared once for all its query blocks.
  auto make_scorer = [&] {
    return [&, scores = std::vector<acc_t>(size_t(query_block * tile_rows)),
            zero_hits = std::vector<acc_t>(metric == Metric::KL ? size_t(query_block * tile_rows) : 0),
            keys = std::vector<ord_t>(size_t(tile_rows)), tside = TileSide<acc_t>(), half_scores = at::Tensor(),
            prepared = int64_t(-1)](int64_t n0, int64_t nt, int64_t q0, int64_t qn, const auto& emit) mutable {
      if (prepared != n0) {
        prepare_tile<acc_t>(database.narrow(0, n0, nt), metric, plan, n0, tside);
        prepared = n0;
      }
      float* norms = nullptr;
      if constexpr (std::is_same_v<acc_t, float>) norms = tside.norms_pending ? tside.term.data() : nullptr;
      score_tile<acc_t>(plan, qside.gemm_operand.narrow(0, q0, qn), tside.gemm_operand, scores.data(), half_scores,
                        norms);
      if constexpr (std::is_same_v<acc_t, float>) {
        if (tside.norms_pending) {
          finish_norm_term(metric, tside.term);
          tside.norms_pending = false;
        }
      }
      if (tside.has_zeros)
        score_tile<acc_t>(plan, qside.positive.narrow(0, q0, qn), tside.zeros, zero_hits.data(), half_scores);
      for (int64_t i = 0; i < qn; ++i) {
        row_keys<acc_t, ord_t>(metric, scores.data() + i * nt, tside.has_zeros ? zero_hits.data() + i * nt : nullptr,
                               tside.term.data(), mask ? mask + n0 : nullptr, nt, keys.data());
        emit(i, keys.data());
      }
    };
  };
  // Distances of the winners, summed from their differences: ||q||² + ||x||² - 2 q·x loses the digits of a
  // small distance (a row searched for itself came back 3e-4 away instead of 0), and the sums of its terms
  // round differently in each kernel. Then re-ordered by these values (ties to the smaller index).
  const bool exact_distances = metric == Metric::L2 || metric == Metric::SqEuclidean;
  const scalar_t* q_data = args.queries.data_ptr<scalar_t>();
  const scalar_t* x_data = database.data_ptr<scalar_t>();
  const int64_t qs0 = args.queries.stride(0), qs1 = args.queries.stride(1), xs0 = database.stride(0),
                xs1 = database.stride(1);
  auto squared_distance = [&](int64_t i, int64_t row) {
    acc_t sum = 0;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t t = acc_t(q_data[i * qs0 + d * qs1]) - acc_t(x_data[row * xs0 + d * xs1]);
      sum += t * t;
    }
    return metric == Metric::L2 ? std::sqrt(sum) : sum;
  };
  tiled_topk<ord_t>(Q, N, k, tile_rows, query_block, make_scorer,
                    [&](int64_t i, int64_t found, const std::vector<Candidate<ord_t>>& merged) {
                      for (int64_t r = 0; r < k; ++r) {
                        out_v[i * k + r] = r < found ? key_to_value<acc_t>(metric, from_ord<acc_t>(merged[r].key), qside.term, i)
                                                     : pad;
                        out_i[i * k + r] = r < found ? merged[r].index : -1;
                      }
                      if (exact_distances && found > 0) {
                        std::vector<std::pair<acc_t, int64_t>> exact(static_cast<size_t>(found));
                        for (int64_t r = 0; r < found; ++r) {
                          const acc_t v = out_v[i * k + r];
                          exact[r] = {v != v ? v : squared_distance(i, out_i[i * k + r]), out_i[i * k + r]};
                        }
                        // smaller first, NaN last, ties to the smaller index
                        std::sort(exact.begin(), exact.end(), [](const auto& a, const auto& b) {
                          const bool an = a.first != a.first, bn = b.first != b.first;
                          if (an != bn) return bn;
                          if (!an && a.first != b.first) return a.first < b.first;
                          return a.second < b.second;
                        });
                        for (int64_t r = 0; r < found; ++r) {
                          out_v[i * k + r] = exact[r].first;
                          out_i[i * k + r] = exact[r].second;
                        }
                      }
                    },
                    scan_row_ns(D * database.element_size(), query_block),
                    /*blas=*/!(plan.gemm == TileGemm::Scan && metric != Metric::KL));
  return finish_results(args, values.to(args.queries.scalar_type()), indices);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_search_cpu(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                                   c10::string_view metric, const std::optional<at::Tensor>& mask,
                                                   bool /*tf32: the CPU has no TF32; fp32 stays exact*/,
                                                   c10::string_view strategy) {
  // Kernels run below autograd (the op's autograd formula is registered in Python); the guard makes sure
  // the ATen calls below (mm_out refuses inputs that require grad) never record history, however the
  // kernel is reached.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  SearchArgs args = validate_search_args(queries, database, k, std::string(metric), mask);
  TORCH_CHECK(database.device().is_cpu(), "database must be a CPU tensor for the CPU kernel, got ", database.device());
  const Plan plan = plan_search(device_facts(database.device()), search_shape(args), parse_strategy(std::string(strategy)));
  if (args.queries.size(0) == 0 || database.size(0) == 0) return padded_results(args);
  if (plan.strategy == Strategy::Aten) return aten_search(args);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, database.scalar_type(), "topk_search_cpu",
                                         [&] { return search_cpu<scalar_t>(args, plan); });
}


TORCH_LIBRARY_IMPL(xmodal, CPU, m) {
  m.impl("topk_search", &topk_search_cpu);
}

}  // namespace xmodal
