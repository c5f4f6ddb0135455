// Gradients of topk_search's values with respect to the queries and the database.
//
// The indices are constants, so each returned value is a function of one query and one database row: the
// backward gathers the k selected rows per query, differentiates the metric there and scatters the row
// gradients back (index_add). Memory is O(Q k D) in chunks, never O(Q N). Written with ATen ops only, so
// one kernel (CompositeExplicitAutograd) serves every device. The autograd formula that calls it is at the end.
#include "common/checks.h"
#include "search/topk_common.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

namespace xmodal {
namespace {

// dv/dq and dv/dx for one chunk of queries q [C, D] against their selected rows x [C, k, D], in acc dtype.
// Values are recomputed here (in acc precision) rather than read from the 16-bit outputs.
std::pair<at::Tensor, at::Tensor> metric_grads(Metric metric, const at::Tensor& q, const at::Tensor& x) {
  const at::Tensor qb = q.unsqueeze(1);  // [C, 1, D]
  switch (metric) {
    case Metric::IP: return {x, qb.expand_as(x)};
    case Metric::SqEuclidean: {
      const at::Tensor diff = qb - x;
      return {2 * diff, -2 * diff};
    }
    case Metric::L2: {
      const at::Tensor diff = qb - x;
      const at::Tensor dist = diff.norm(2, -1, true);
      // the distance is not differentiable at 0 (a query equal to its row): use the zero subgradient there
      const at::Tensor dq = at::where(dist > 0, diff / dist, at::zeros_like(diff));
      return {dq, -dq};
    }
    case Metric::Cosine:
    case Metric::CosineDistance: {
      // c = q·x / (max(|q|, eps) max(|x|, eps)); a norm clamped at eps is a constant
      const at::Tensor nq = qb.norm(2, -1, true), nx = x.norm(2, -1, true);
      const at::Tensor cq = nq.clamp_min(kNormEps), cx = nx.clamp_min(kNormEps);
      const at::Tensor c = (qb * x).sum(-1, true) / (cq * cx);
      at::Tensor dq = x / (cq * cx) - at::where(nq > kNormEps, c * qb / (cq * cq), at::zeros_like(qb));
      at::Tensor dx = qb / (cq * cx) - at::where(nx > kNormEps, c * x / (cx * cx), at::zeros_like(x));
      if (metric == Metric::CosineDistance) {
        // v = sqrt(2 (1 - c)): dv/dc = -1 / v, with the zero subgradient at v = 0
        const at::Tensor v = (2 * (1 - c)).clamp_min(0).sqrt();
        const at::Tensor dvdc = at::where(v > 0, -1 / v, at::zeros_like(v));
        dq = dq * dvdc;
        dx = dx * dvdc;
      }
      return {dq, dx};
    }
    case Metric::KL: {
      // v = sum_i q_i log q_i - q_i log d_i: dv/dq_i = log q_i + 1 - log d_i, dv/dd_i = -q_i / d_i. Entries
      // with q_i = 0 contribute nothing to v, and pass no gradient (the derivative of q log q is -inf at 0).
      const at::Tensor positive = qb > 0;
      const at::Tensor dq = at::where(positive, at::log(qb) + 1 - at::log(x), at::zeros_like(x));
      const at::Tensor dx = at::where(positive, -qb / x, at::zeros_like(x));
      return {dq, dx};
    }
  }
  TORCH_CHECK(false, "unknown metric");
}

std::tuple<at::Tensor, at::Tensor> topk_search_backward(const at::Tensor& grad_values, const at::Tensor& values,
                                                        const at::Tensor& indices, const at::Tensor& queries,
                                                        const at::Tensor& database, c10::string_view metric_name,
                                                        std::array<bool, 2> output_mask) {
  const Metric metric = parse_metric(std::string(metric_name));
  TORCH_CHECK(grad_values.sizes() == indices.sizes() && values.sizes() == indices.sizes(),
              "grad_values, values and indices must have the same shape, got ", grad_values.sizes(), ", ",
              values.sizes(), " and ", indices.sizes());
  const bool squeeze = queries.dim() == 1;
  const at::Tensor q_all = squeeze ? queries.unsqueeze(0) : queries;
  const int64_t Q = q_all.size(0), D = q_all.size(1), k = indices.size(-1);
  const auto acc = database.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor idx_all = indices.reshape({Q, k});
  // Padding (index -1) and non-finite values (a NaN row, KL's +inf) pass no gradient.
  const at::Tensor g_all = at::where((idx_all >= 0) & values.reshape({Q, k}).isfinite(),
                                     grad_values.reshape({Q, k}).to(acc), at::zeros({}, grad_values.options().dtype(acc)));
  at::Tensor grad_q = output_mask[0] ? at::zeros({Q, D}, q_all.options().dtype(acc)) : at::Tensor();
  at::Tensor grad_x = output_mask[1] ? at::zeros({database.size(0), D}, database.options().dtype(acc)) : at::Tensor();
  if (Q > 0 && k > 0 && (output_mask[0] || output_mask[1])) {
    // chunks of queries whose gathered rows stay under ~16M elements
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, k * D));
    for (int64_t q0 = 0; q0 < Q; q0 += chunk) {
      const int64_t c = std::min(Q, q0 + chunk) - q0;
      const at::Tensor idx = idx_all.narrow(0, q0, c).clamp_min(0).reshape({-1});
      const at::Tensor g = g_all.narrow(0, q0, c).unsqueeze(-1);  // [c, k, 1]
      const at::Tensor q = q_all.narrow(0, q0, c).to(acc);
      const at::Tensor x = database.index_select(0, idx).to(acc).view({c, k, D});
      auto [dq, dx] = metric_grads(metric, q, x);
      // a zero gradient times an infinite derivative must stay zero, not NaN
      if (output_mask[0]) grad_q.narrow(0, q0, c).copy_(at::where(g != 0, g * dq, at::zeros({}, g.options())).sum(1));
      if (output_mask[1]) grad_x.index_add_(0, idx, at::where(g != 0, g * dx, at::zeros({}, g.options())).view({-1, D}));
    }
  }
  if (output_mask[0]) {
    grad_q = grad_q.to(queries.scalar_type());
    if (squeeze) grad_q = grad_q.squeeze(0);
  } else {
    grad_q = queries.new_empty({0});
  }
  grad_x = output_mask[1] ? grad_x.to(database.scalar_type()) : database.new_empty({0});
  return {grad_q, grad_x};
}

// -- autograd ------------------------------------------------------------------------------------------
// topk_search's values are differentiable for queries and database (the indices are constants). Written in
// C++ rather than with torch.library.register_autograd: the Python formula cost every call ~5 us, as much as
// a whole small naive search, whether or not anything needed a gradient.

using SearchFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view,
                                                    const std::optional<at::Tensor>&, bool, c10::string_view);
using BackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, c10::string_view,
                                                      std::array<bool, 2>);

std::tuple<at::Tensor, at::Tensor> search_below_autograd(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                                         c10::string_view metric, const std::optional<at::Tensor>& mask,
                                                         bool tf32, c10::string_view strategy) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("xmodal::topk_search", "").typed<SearchFn>();
  const at::AutoDispatchBelowADInplaceOrView below;
  return op.call(queries, database, k, metric, mask, tf32, strategy);
}

struct TopkSearchFunction : public torch::autograd::Function<TopkSearchFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& queries,
                                                const at::Tensor& database, int64_t k, c10::string_view metric,
                                                const std::optional<at::Tensor>& mask, bool tf32,
                                                c10::string_view strategy) {
    auto [values, indices] = search_below_autograd(queries, database, k, metric, mask, tf32, strategy);
    ctx->save_for_backward({queries, database, values, indices});
    ctx->saved_data["metric"] = std::string(metric);
    ctx->mark_non_differentiable({indices});
    return {values, indices};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::array<bool, 2> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    torch::autograd::variable_list out(7);  // one per forward argument; only the first two have gradients
    if (!need[0] && !need[1]) return out;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("xmodal::topk_search_backward", "").typed<BackwardFn>();
    const auto saved = ctx->get_saved_variables();
    const std::string metric = ctx->saved_data["metric"].toStringRef();
    auto [grad_q, grad_x] = op.call(grads[0], saved[2], saved[3], saved[0], saved[1], metric, need);
    if (need[0]) out[0] = grad_q;
    if (need[1]) out[1] = grad_x;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> topk_search_autograd(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                                        c10::string_view metric, const std::optional<at::Tensor>& mask,
                                                        bool tf32, c10::string_view strategy) {
  // nothing to differentiate: no graph node, no saved tensors
  if (!at::GradMode::is_enabled() || !(queries.requires_grad() || database.requires_grad()))
    return search_below_autograd(queries, database, k, metric, mask, tf32, strategy);
  auto out = TopkSearchFunction::apply(queries, database, k, metric, mask, tf32, strategy);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CompositeExplicitAutograd, m) {
  m.impl("topk_search_backward", &topk_search_backward);
}

TORCH_LIBRARY_IMPL(xmodal, Autograd, m) {
  m.impl("topk_search", &topk_search_autograd);
}

}  // namespace xmodal
