// What the CPU and CUDA top-k search kernels share: metric names, argument validation, output shapes.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <initializer_list>
#include <optional>
#include <string>

#include "common/constants.h"

namespace xmodal {

enum class Metric { IP, Cosine, L2, SqEuclidean, CosineDistance, KL };

// THE metric table: every metric's name and whether larger values are better. Python's xmodal.METRICS is
// read from it (_C.metrics()), so a metric is added here and nowhere else.
struct MetricInfo {
  Metric metric;
  const char* name;
  bool larger_is_better;
};
inline constexpr MetricInfo kMetrics[] = {
    {Metric::IP, "ip", true},          {Metric::Cosine, "cosine", true},
    {Metric::L2, "l2", false},         {Metric::SqEuclidean, "sqeuclidean", false},
    {Metric::CosineDistance, "cosine_distance", false}, {Metric::KL, "kl", false},
};

// The kernels rank by a "key" where larger is better:
//   ip: q·x                      cosine, cosine_distance: q·x / ||x||   (the query's norm is applied at the end)
//   l2, sqeuclidean: 2 q·x - ||x||²  (the query's ||q||² is added at the end, then clamped at 0)
//   kl: Σ q log d  (minus infinity where some d_i = 0 < q_i); KL = Σ q log q - key
// and turn the k best keys into the metric's values once per query.
// The metric named `name`; an error lists the names of `allowed` (default: every metric) and names `op`.
Metric parse_metric(const std::string& name, std::initializer_list<Metric> allowed = {}, const char* op = nullptr);
// kMetrics' column, as a switch the CUDA kernels can call.
C10_HOST_DEVICE inline bool larger_is_better(Metric m) { return m == Metric::IP || m == Metric::Cosine; }

// The per-row term a metric's key needs (see above), in dtype acc: 1/max(||x||, eps) for cosine and
// cosine_distance, ||x||² for l2 and sqeuclidean; undefined for ip and kl. Used for queries and tiles alike.
at::Tensor row_norm_term(const at::Tensor& rows, Metric metric, at::ScalarType acc);

struct SearchArgs {
  at::Tensor queries;   // [Q, D] (a 1-D query is viewed as [1, D])
  at::Tensor database;  // [N, D]
  std::optional<at::Tensor> mask;  // bool [N]
  int64_t k;
  Metric metric;
  bool squeeze;  // the caller passed a 1-D query: drop the leading dim of the results
};

// Validates every argument (names it in the error) and normalises shapes.
SearchArgs validate_search_args(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                const std::string& metric, const std::optional<at::Tensor>& mask);

// Values and indices filled with padding (index -1, value -inf for similarities, +inf for distances).
std::tuple<at::Tensor, at::Tensor> padded_results(const SearchArgs& a);

std::tuple<at::Tensor, at::Tensor> finish_results(const SearchArgs& a, at::Tensor values, at::Tensor indices);

}  // namespace xmodal
