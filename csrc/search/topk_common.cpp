#include "search/topk_common.h"

#include "common/checks.h"

#include <algorithm>
#include <limits>

namespace xmodal {

Metric parse_metric(const std::string& name, std::initializer_list<Metric> allowed, const char* op) {
  auto is_allowed = [&](Metric m) { return allowed.size() == 0 || std::find(allowed.begin(), allowed.end(), m) != allowed.end(); };
  std::string names;
  for (const MetricInfo& info : kMetrics) {
    if (!is_allowed(info.metric)) continue;
    if (name == info.name) return info.metric;
    names += std::string(names.empty() ? "'" : ", '") + info.name + "'";
  }
  TORCH_CHECK(false, "metric must be one of ", names, op ? " for " : "", op ? op : "", ", got '", name, "'");
}

at::Tensor row_norm_term(const at::Tensor& rows, Metric metric, at::ScalarType acc) {
  switch (metric) {
    case Metric::Cosine:
    case Metric::CosineDistance:
      return at::linalg_vector_norm(rows, 2, {1}, false, acc).clamp_min(kNormEps).reciprocal();
    case Metric::L2:
    case Metric::SqEuclidean: return at::linalg_vector_norm(rows, 2, {1}, false, acc).square();
    default: return at::Tensor();
  }
}

SearchArgs validate_search_args(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                const std::string& metric, const std::optional<at::Tensor>& mask) {
  SearchArgs a;
  a.metric = parse_metric(metric);
  TORCH_CHECK(queries.dim() == 1 || queries.dim() == 2, "queries must be 1-D [D] or 2-D [Q, D], got shape ",
              queries.sizes());
  check_dim(database, 2, "database", "[N, D]");
  check_float_dtype(queries, "queries");
  check_float_dtype(database, "database");
  check_same_dtype(queries, "queries", database, "database");
  check_same_device(queries, "queries", database, "database");
  a.squeeze = queries.dim() == 1;
  a.queries = a.squeeze ? queries.unsqueeze(0) : queries;
  a.database = database;
  TORCH_CHECK(a.queries.size(1) == database.size(1), "queries and database must have the same dimension D, got ",
              a.queries.size(1), " and ", database.size(1));
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "mask must be a bool tensor, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == database.size(0), "mask must have shape [N] = [", database.size(0),
                "], got ", m.sizes());
    check_same_device(m, "mask", database, "database");
    a.mask = m.contiguous();
  }
  a.k = k;
  return a;
}

std::tuple<at::Tensor, at::Tensor> padded_results(const SearchArgs& a) {
  const int64_t Q = a.queries.size(0);
  const double pad = larger_is_better(a.metric) ? -std::numeric_limits<double>::infinity()
                                                : std::numeric_limits<double>::infinity();
  auto values = at::full({Q, a.k}, pad, a.queries.options());
  auto indices = at::full({Q, a.k}, -1, a.queries.options().dtype(at::kLong));
  return finish_results(a, values, indices);
}

std::tuple<at::Tensor, at::Tensor> finish_results(const SearchArgs& a, at::Tensor values, at::Tensor indices) {
  if (a.squeeze) return {values.squeeze(0), indices.squeeze(0)};
  return {values, indices};
}

}  // namespace xmodal
