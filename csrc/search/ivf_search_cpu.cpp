// IVF search in one call (search_cpu.h): the composition IVFIndex makes of topk_search, ivf_scan and, for
// int8 codes, the codec's query terms and the metric's values, made here in C++.
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

#include "common/checks.h"
#include "search/search_cpu.h"
#include "search/topk_common.h"

namespace xmodal {
namespace {

bool is_l2(Metric m) { return m == Metric::L2 || m == Metric::SqEuclidean; }
bool is_unit(Metric m) { return m == Metric::Cosine || m == Metric::CosineDistance; }

// sqrt(2 (1 - cos)), as index/_rows.py's cosine_to_distance
float distance_of_cosine(float c) { return std::sqrt(std::max(2.0f * (1.0f - c), 0.0f)); }

// int8 codes: the codec's query terms, the scan, and the metric's values from its keys (index/codecs.py,
// Int8Codes.search)
std::tuple<at::Tensor, at::Tensor> int8_lists(const at::Tensor& queries, const at::Tensor& probes,
                                              const at::Tensor& list_ranges, const at::Tensor& codes,
                                              const at::Tensor& groups, const std::optional<at::Tensor>& row_terms,
                                              const at::Tensor& scale, const at::Tensor& bases, int64_t k,
                                              const std::string& metric, Metric m,
                                              const std::optional<at::Tensor>& mask) {
  const bool l2 = is_l2(m), unit = is_unit(m);
  TORCH_CHECK(l2 || unit ? row_terms.has_value() : !row_terms.has_value(), "row_terms must be given for metric '",
              metric, "' ", l2 || unit ? "(|row| terms of the l2 and cosine metrics)" : "only with l2 or cosine metrics");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && bases.scalar_type() == at::kFloat,
              "scale and bases must be float32, got ", scale.scalar_type(), " and ", bases.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == queries.size(1) && bases.dim() == 2 &&
                  bases.size(1) == queries.size(1),
              "scale must be [D] and bases [G, D] with D = ", queries.size(1), ", got shapes ", scale.sizes(), " and ",
              bases.sizes());
  // q . decoded row = (q * scale) . code + q . bases[group]: the second a bias per query and group; l2 ranks
  // by 2 q . x - |x|^2 and adds |q|^2 back below
  const float two = l2 ? 2.0f : 1.0f;
  const at::Tensor scaled = (queries * (scale * two)).contiguous();
  const at::Tensor bias = at::mm(queries, bases.t()) * two;
  auto [keys, slots] = ivf_scan_cpu(scaled, codes, list_ranges, probes, k, "ip", mask, bias,
                                    unit ? row_terms : std::nullopt, l2 ? row_terms : std::nullopt, groups);
  const int64_t Q = keys.size(0), width = keys.size(1);
  const at::Tensor query_sq = l2 ? queries.square().sum(1) : at::Tensor();
  float* v = keys.data_ptr<float>();
  const int64_t* s = slots.data_ptr<int64_t>();
  const bool root = m == Metric::L2, cosine_distance = m == Metric::CosineDistance;
  const float pad = larger_is_better(m) ? -std::numeric_limits<float>::infinity()
                                        : std::numeric_limits<float>::infinity();
  for (int64_t q = 0; q < Q; ++q) {
    const float qq = l2 ? query_sq.data_ptr<float>()[q] : 0.0f;
    for (int64_t j = q * width; j < (q + 1) * width; ++j) {
      if (s[j] < 0) {
        v[j] = pad;
      } else if (l2) {
        const float sq = std::max(qq - v[j], 0.0f);
        v[j] = root ? std::sqrt(sq) : sq;
      } else if (cosine_distance) {
        v[j] = distance_of_cosine(v[j]);
      }
    }
  }
  return {keys, slots};
}

// rows as they are (FloatRows.search): cosine as the inner product of unit rows, cosine distance from it
std::tuple<at::Tensor, at::Tensor> float_lists(const at::Tensor& queries, const at::Tensor& probes,
                                               const at::Tensor& list_ranges, const at::Tensor& rows, int64_t k,
                                               const std::string& metric, Metric m,
                                               const std::optional<at::Tensor>& mask) {
  auto [values, slots] = ivf_scan_cpu(queries.to(rows.scalar_type()), rows, list_ranges, probes, k,
                                      is_unit(m) ? "ip" : metric, mask, std::nullopt, std::nullopt, std::nullopt,
                                      std::nullopt);
  if (m == Metric::CosineDistance) {
    const at::Tensor cos = values.to(at::kFloat);
    const float* c = cos.data_ptr<float>();
    at::Tensor dist = at::empty_like(cos);
    float* d = dist.data_ptr<float>();
    const int64_t* s = slots.data_ptr<int64_t>();
    for (int64_t j = 0; j < cos.numel(); ++j)
      d[j] = s[j] < 0 ? std::numeric_limits<float>::infinity() : distance_of_cosine(c[j]);
    values = dist.to(values.scalar_type());
  }
  return {values, slots};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ivf_search_cpu(
    const at::Tensor& queries, const at::Tensor& centroids, int64_t nprobe, const std::optional<at::Tensor>& probes,
    const at::Tensor& list_ranges, const at::Tensor& rows, const std::optional<at::Tensor>& groups,
    const std::optional<at::Tensor>& row_terms, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bases, int64_t k, const std::string& metric,
    const std::optional<at::Tensor>& mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Metric m = parse_metric(
      metric, {Metric::IP, Metric::Cosine, Metric::CosineDistance, Metric::L2, Metric::SqEuclidean}, "ivf_search");
  TORCH_CHECK(nprobe > 0, "nprobe must be positive, got ", nprobe);
  check_dim(queries, 2, "queries", "[Q, D]");
  check_dim(centroids, 2, "centroids", "[nlist, D]");
  check_float_dtype(queries, "queries");
  TORCH_CHECK(centroids.scalar_type() == at::kFloat, "centroids must be float32, got ", centroids.scalar_type());
  const bool int8 = rows.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == (groups && scale && bases), "groups, scale and bases must be given with int8 rows (codes) ",
              "and only then, got rows of ", rows.scalar_type());
  const at::Tensor q = queries.to(at::kFloat);  // (the coarse search and the codes take float32 queries)
  const at::Tensor probed =
      probes ? *probes
             : std::get<1>(topk_search_cpu(q, centroids, std::min(nprobe, centroids.size(0)),
                                           is_l2(m) ? "l2" : "ip", std::nullopt, false, "auto"));
  if (int8) return int8_lists(q, probed, list_ranges, rows, *groups, row_terms, *scale, *bases, k, metric, m, mask);
  TORCH_CHECK(!row_terms, "row_terms apply to int8 rows (codes) only");
  return float_lists(queries, probed, list_ranges, rows, k, metric, m, mask);
}

}  // namespace xmodal
