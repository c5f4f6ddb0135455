// The proximity graph's ops on the CPU (schemas in csrc/xmodal.cpp): build by inserting rows one at a time
// into the graph in parallel (DiskANN's incremental Vamana: walk to the new row, prune the walk's nodes to
// its neighbours, add the reverse edges, re-pruning lists that overflow), re-link rows around what a sample of
// queries finds (cross-modal projection), repair the graph around removed rows, and search.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "common/checks.h"
#include "common/parallel.h"
#include "graph/graph_search.h"
#include "graph/graph_walk.h"
#include "search/planner.h"

namespace xmodal {
namespace {

using graph::ListLocks;
using graph::Rows;
using graph::Scored;
using graph::Scratch;

// rows besides the entry that every walk starts from (see graph::walk). Measured at 100,000 x 128 (caption
// queries against image rows), recall@10 at ef 16 / queries/s: none 0.945 / 41k, 16 0.965 / 45k, 64 0.984 / 49k,
// 256 0.993 / 29k; on a two-cone set 64 kept recall and raised queries/s by a quarter.
constexpr int64_t kPivots = 64;

// Checks shared by the ops: rows float32 or bfloat16 [N, D] with unit stride in a row, norms float32 [N],
// graph int32 [N, R] contiguous, all on the CPU.
void check_graph(const at::Tensor& vectors, const at::Tensor& norms, const at::Tensor& graph) {
  check_dim(vectors, 2, "vectors", "[N, D]");
  TORCH_CHECK(vectors.device().is_cpu(), "graph ops run on the CPU, got vectors on ", vectors.device());
  TORCH_CHECK(vectors.scalar_type() == at::kFloat || vectors.scalar_type() == at::kBFloat16,
              "vectors must be float32 or bfloat16, got ", vectors.scalar_type());
  TORCH_CHECK(vectors.stride(1) == 1 || vectors.size(1) <= 1, "vectors must have unit stride within a row");
  TORCH_CHECK(vectors.size(0) < (int64_t(1) << 31), "a graph holds fewer than 2^31 rows, got ", vectors.size(0));
  TORCH_CHECK(norms.scalar_type() == at::kFloat && norms.dim() == 1 && norms.size(0) == vectors.size(0) &&
                  norms.is_contiguous() && norms.device().is_cpu(),
              "norms must be a contiguous float32 [N] CPU tensor (N = vectors.size(0) = ", vectors.size(0),
              "), got ", norms.scalar_type(), " ", norms.sizes());
  check_dim(graph, 2, "graph", "[N, R]");
  TORCH_CHECK(graph.scalar_type() == at::kInt && graph.size(0) == vectors.size(0) && graph.size(1) > 0 &&
                  graph.is_contiguous() && graph.device().is_cpu(),
              "graph must be a contiguous int32 [N, R] CPU tensor with R > 0 (N = vectors.size(0) = ",
              vectors.size(0), "), got ", graph.scalar_type(), " ", graph.sizes());
}

template <typename T>
Rows<T> rows_of(const at::Tensor& vectors, const at::Tensor& norms) {
  return {vectors.data_ptr<T>(), vectors.size(0) ? vectors.stride(0) : 0, vectors.size(1), vectors.size(0),
          norms.data_ptr<float>(), cpu_scan_isa()};
}

// Writes to out[0..R) x's neighbours pruned from the rows `ids` (no repeats, not x): what insertion, re-pruning
// and repair share. Uses s.vec, s.keys and cands.
template <typename T>
void prune_from(const Rows<T>& g, int32_t x, const std::vector<int32_t>& ids, float alpha, int64_t R, int32_t* out,
                Scratch& s, std::vector<Scored>& cands) {
  const int64_t n = int64_t(ids.size());
  s.keys.resize(std::max<size_t>(s.keys.size(), size_t(n)));
  gather_dots(g.isa, graph::row_as_float(g, x, s), g.x, g.ld, ids.data(), n, g.D, s.keys.data());
  cands.resize(n);
  for (int64_t j = 0; j < n; ++j) cands[j] = {g.norms[x] + g.norms[ids[j]] - 2.f * s.keys[j], ids[j]};
  std::sort(cands.begin(), cands.end());
  graph::prune(g, cands, alpha, R, out, s);
}

// Sets x's neighbours to the pruned union of its current ones and `extra` (rows other than x), under x's lock.
template <typename T>
void relink(const Rows<T>& g, int32_t* adj, int64_t R, int32_t x, const int32_t* extra, int64_t n_extra,
            float alpha, ListLocks& locks, Scratch& s, std::vector<int32_t>& ids, std::vector<Scored>& cands) {
  int32_t* list = adj + int64_t(x) * R;
  locks.lock(x);
  s.start_walk(g.N);  // marks used to drop repeats
  s.visit(x);
  ids.clear();
  for (int64_t j = 0; j < R && list[j] >= 0; ++j)
    if (s.visit(list[j])) ids.push_back(list[j]);
  for (int64_t j = 0; j < n_extra; ++j)
    if (s.visit(extra[j])) ids.push_back(extra[j]);
  prune_from(g, x, ids, alpha, R, list, s, cands);
  locks.unlock(x);
}

// Adds the edge n -> p where n's list has room (and lacks p); a full list stays as it is. Returns false only
// then (n's list is full and lacks p).
inline bool append_edge(int32_t* adj, int64_t R, int32_t n, int32_t p, ListLocks& locks) {
  int32_t* list = adj + int64_t(n) * R;
  locks.lock(n);
  const int64_t deg = graph::degree_of(list, R);
  const bool present = std::find(list, list + deg, p) != list + deg;
  if (!present && deg < R) list[deg] = p;
  locks.unlock(n);
  return present || deg < R;
}

// Adds the edge n -> p: appended where n's list has room, else n's list is re-pruned with p among the candidates.
template <typename T>
void add_edge(const Rows<T>& g, int32_t* adj, int64_t R, int32_t n, int32_t p, float alpha, ListLocks& locks,
              Scratch& s, std::vector<int32_t>& ids, std::vector<Scored>& cands) {
  if (!append_edge(adj, R, n, p, locks)) relink(g, adj, R, n, &p, 1, alpha, locks, s, ids, cands);
}

// out = x's neighbours, read under x's lock.
inline void read_list(const int32_t* adj, int64_t R, int32_t x, ListLocks& locks, std::vector<int32_t>& out) {
  const int32_t* list = adj + int64_t(x) * R;
  locks.lock(x);
  out.assign(list, list + graph::degree_of(list, R));
  locks.unlock(x);
}

// A scattered order of [0, m): consecutive rows of an add often come from one cluster, and inserting a
// cluster at a time builds a worse graph (DiskANN inserts in random order too).
int64_t scatter_stride(int64_t m) {
  int64_t stride = m > 1 ? int64_t(2654435761u % uint64_t(m)) : 1;
  const auto gcd = [](int64_t a, int64_t b) { while (b) { const int64_t t = a % b; a = b; b = t; } return a; };
  while (stride <= 0 || gcd(stride, m) != 1) ++stride;
  return stride;
}

template <typename T>
void insert_rows(const Rows<T>& g, int32_t* adj, int64_t R, int64_t start, int64_t entry, int64_t build_ef,
                 float alpha) {
  const int64_t m = g.N - start;
  const int64_t stride = scatter_stride(m);
  ListLocks locks;
  const auto make_worker = [&] {
    return [&, ids = std::vector<int32_t>(), cands = std::vector<Scored>(),
            found = std::vector<int32_t>()](int64_t i) mutable {
      const int32_t p = int32_t(start + (i * stride) % m);
      if (p == entry) return;
      Scratch& s = Scratch::mine();
      // (the walk leaves s.vec alone: p's row stays there until relink below reuses it)
      graph::walk(g, adj, R, graph::row_as_float(g, p, s), true, build_ef, int32_t(entry), kPivots, nullptr, s,
                  &locks);
      found.clear();
      for (const Scored& v : s.best)
        if (v.second != p) found.push_back(v.second);
      relink(g, adj, R, p, found.data(), int64_t(found.size()), alpha, locks, s, ids, cands);
      read_list(adj, R, p, locks, found);
      for (const int32_t n : found) add_edge(g, adj, R, n, p, alpha, locks, s, ids, cands);
    };
  };
  parallel_take(m, xmodal_threads(), make_worker, /*blas=*/false);
}

void graph_insert_cpu(const at::Tensor& vectors, const at::Tensor& norms, const at::Tensor& graph, int64_t start,
                      int64_t entry, int64_t build_ef, double alpha) {
  check_graph(vectors, norms, graph);
  const int64_t N = vectors.size(0);
  TORCH_CHECK(start >= 0 && start <= N, "start must be in [0, ", N, "], got ", start);
  TORCH_CHECK(N == 0 || (entry >= 0 && entry < N), "entry must be a row in [0, ", N, "), got ", entry);
  TORCH_CHECK(build_ef > 0, "build_ef must be positive, got ", build_ef);
  TORCH_CHECK(alpha >= 1.0, "alpha must be at least 1, got ", alpha);
  if (start == N) return;
  int32_t* adj = graph.data_ptr<int32_t>();
  if (vectors.scalar_type() == at::kFloat)
    insert_rows(rows_of<float>(vectors, norms), adj, graph.size(1), start, entry, build_ef, float(alpha));
  else
    insert_rows(rows_of<c10::BFloat16>(vectors, norms), adj, graph.size(1), start, entry, build_ef, float(alpha));
}

// Cross-modal projection (after RoarGraph's projected bipartite graph): the rows a sample query finds nearest
// are what a walk for a query like it must reach together, though the rows' own geometry may put them far
// apart (the modality gap). neighbours[s] lists sample query s's nearest rows, best first, -1 padded. Each row
// among a query's first `hubs` ones is re-linked: its candidates are its current neighbours plus every row its
// queries list, pruned as in insertion (so the list keeps the query-found directions no nearer neighbour
// covers); each row it newly points to gains the reverse edge where that list has room.
template <typename T>
void project_rows(const Rows<T>& g, int32_t* adj, int64_t R, const int64_t* neighbours, int64_t S, int64_t K,
                  int64_t hubs, float alpha) {
  // (hub row, query) pairs grouped by hub, so that one worker re-links each list
  std::vector<std::pair<int32_t, int32_t>> by_hub;
  by_hub.reserve(S * std::min(hubs, K));
  for (int64_t q = 0; q < S; ++q)
    for (int64_t h = 0; h < std::min(hubs, K) && neighbours[q * K + h] >= 0; ++h)
      by_hub.push_back({int32_t(neighbours[q * K + h]), int32_t(q)});
  std::sort(by_hub.begin(), by_hub.end());
  std::vector<int64_t> group_start;
  for (int64_t i = 0; i < int64_t(by_hub.size()); ++i)
    if (i == 0 || by_hub[i].first != by_hub[i - 1].first) group_start.push_back(i);
  const int64_t groups = int64_t(group_start.size());
  group_start.push_back(int64_t(by_hub.size()));
  ListLocks locks;
  const auto make_worker = [&] {
    return [&, ids = std::vector<int32_t>(), cands = std::vector<Scored>(), extra = std::vector<int32_t>(),
            before = std::vector<int32_t>()](int64_t gi) mutable {
      const int32_t t = by_hub[group_start[gi]].first;
      Scratch& s = Scratch::mine();
      extra.clear();
      for (int64_t i = group_start[gi]; i < group_start[gi + 1]; ++i) {
        const int64_t* nb = neighbours + int64_t(by_hub[i].second) * K;
        for (int64_t j = 0; j < K && nb[j] >= 0; ++j)
          if (nb[j] != t) extra.push_back(int32_t(nb[j]));
      }
      read_list(adj, R, t, locks, before);
      relink(g, adj, R, t, extra.data(), int64_t(extra.size()), alpha, locks, s, ids, cands);
      std::sort(before.begin(), before.end());
      read_list(adj, R, t, locks, extra);
      for (const int32_t n : extra)
        if (!std::binary_search(before.begin(), before.end(), n)) append_edge(adj, R, n, t, locks);
    };
  };
  parallel_take(groups, xmodal_threads(), make_worker, /*blas=*/false);
}

void graph_project_cpu(const at::Tensor& vectors, const at::Tensor& norms, const at::Tensor& graph,
                       const at::Tensor& neighbours, int64_t hubs, double alpha) {
  check_graph(vectors, norms, graph);
  check_dim(neighbours, 2, "neighbours", "[S, K]");
  TORCH_CHECK(neighbours.scalar_type() == at::kLong && neighbours.device().is_cpu(),
              "neighbours must be an int64 CPU tensor, got ", neighbours.scalar_type(), " on ", neighbours.device());
  TORCH_CHECK(hubs > 0, "hubs must be positive, got ", hubs);
  TORCH_CHECK(alpha >= 1.0, "alpha must be at least 1, got ", alpha);
  const at::Tensor nb = neighbours.contiguous();
  const int64_t N = graph.size(0);
  if (nb.numel()) {
    const auto [lo, hi] = at::aminmax(nb);
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < N, "neighbours must be rows in [0, ", N,
                ") or -1, got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  int32_t* adj = graph.data_ptr<int32_t>();
  if (vectors.scalar_type() == at::kFloat)
    project_rows(rows_of<float>(vectors, norms), adj, graph.size(1), nb.data_ptr<int64_t>(), nb.size(0), nb.size(1),
                 hubs, float(alpha));
  else
    project_rows(rows_of<c10::BFloat16>(vectors, norms), adj, graph.size(1), nb.data_ptr<int64_t>(), nb.size(0),
                 nb.size(1), hubs, float(alpha));
}

// The graph of the kept rows, renumbered: a kept row whose neighbours were all kept keeps its list; one that
// lost some takes as candidates its kept neighbours and the kept neighbours of the removed ones, pruned
// (FreshDiskANN's delete consolidation), so walks still pass where removed rows used to lead.
template <typename T>
at::Tensor repair_rows(const Rows<T>& g, const int32_t* adj, int64_t R, const bool* keep, float alpha) {
  std::vector<int32_t> renumber(g.N, -1);
  int64_t M = 0;
  for (int64_t i = 0; i < g.N; ++i)
    if (keep[i]) renumber[i] = int32_t(M++);
  std::vector<int32_t> kept_rows;
  kept_rows.reserve(M);
  for (int64_t i = 0; i < g.N; ++i)
    if (keep[i]) kept_rows.push_back(int32_t(i));
  at::Tensor out = at::empty({M, R}, at::kInt);
  int32_t* o = out.data_ptr<int32_t>();
  const auto make_worker = [&] {
    return [&, ids = std::vector<int32_t>(), cands = std::vector<Scored>(),
            tmp = std::vector<int32_t>(R)](int64_t i) mutable {
      const int32_t p = kept_rows[i];
      const int32_t* list = adj + int64_t(p) * R;
      int32_t* dst = o + i * R;
      const int64_t deg = graph::degree_of(list, R);
      bool lost = false;
      for (int64_t j = 0; j < deg; ++j) lost |= !keep[list[j]];
      if (!lost) {
        for (int64_t j = 0; j < R; ++j) dst[j] = j < deg ? renumber[list[j]] : -1;
        return;
      }
      Scratch& s = Scratch::mine();
      s.start_walk(g.N);
      s.visit(p);
      ids.clear();
      for (int64_t j = 0; j < deg; ++j) {
        const int32_t n = list[j];
        if (keep[n]) {
          if (s.visit(n)) ids.push_back(n);
          continue;
        }
        const int32_t* second = adj + int64_t(n) * R;
        for (int64_t t = 0; t < R && second[t] >= 0; ++t)
          if (keep[second[t]] && s.visit(second[t])) ids.push_back(second[t]);
      }
      prune_from(g, p, ids, alpha, R, tmp.data(), s, cands);
      for (int64_t j = 0; j < R; ++j) dst[j] = tmp[j] >= 0 ? renumber[tmp[j]] : -1;
    };
  };
  parallel_take(M, xmodal_threads(), make_worker, /*blas=*/false);
  return out;
}

at::Tensor graph_repair_cpu(const at::Tensor& vectors, const at::Tensor& norms, const at::Tensor& graph,
                            const at::Tensor& keep, double alpha) {
  check_graph(vectors, norms, graph);
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 1 && keep.size(0) == vectors.size(0) &&
                  keep.device().is_cpu(),
              "keep must be a bool [N] CPU tensor (N = ", vectors.size(0), "), got ", keep.scalar_type(), " ",
              keep.sizes());
  TORCH_CHECK(alpha >= 1.0, "alpha must be at least 1, got ", alpha);
  const at::Tensor k = keep.contiguous();
  if (vectors.scalar_type() == at::kFloat)
    return repair_rows(rows_of<float>(vectors, norms), graph.data_ptr<int32_t>(), graph.size(1), k.data_ptr<bool>(),
                       float(alpha));
  return repair_rows(rows_of<c10::BFloat16>(vectors, norms), graph.data_ptr<int32_t>(), graph.size(1),
                     k.data_ptr<bool>(), float(alpha));
}

// graph_search's metrics: inner product, cosine (rows stored unit-normalised; queries taken as given) and
// squared l2
enum class GraphMetric { IP, Cosine, L2 };

template <typename T>
void search_rows(const Rows<T>& g, const int32_t* adj, int64_t R, const float* q, int64_t Q, int64_t entry,
                 int64_t k, int64_t ef, GraphMetric metric, const bool* allowed, const int64_t* ids, float* values,
                 int64_t* indices) {
  const bool l2 = metric == GraphMetric::L2;
  const float pad = l2 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
  const auto make_worker = [&] {
    return [&](int64_t i) {
      Scratch& s = Scratch::mine();
      const float* qi = q + i * g.D;
      float* v = values + i * k;
      int64_t* ix = indices + i * k;
      int64_t found = 0;
      if (g.N > 0) {
        graph::walk(g, adj, R, qi, l2, ef, int32_t(entry), kPivots, allowed, s);
        std::sort_heap(s.best.begin(), s.best.end(), [](const Scored& a, const Scored& b) { return a.first < b.first; });
        float qn = 0.f;
        for (int64_t d = 0; d < g.D; ++d) qn += qi[d] * qi[d];
        // cosine: the walk ranks by q · x (the same order as for q / |q|), the values are divided by |q|
        const float scale = metric == GraphMetric::Cosine && qn > 0.f ? 1.f / std::sqrt(qn) : 1.f;
        found = std::min<int64_t>(k, int64_t(s.best.size()));
        for (int64_t j = 0; j < found; ++j) {
          v[j] = l2 ? std::max(s.best[j].first + qn, 0.f) : -s.best[j].first * scale;
          ix[j] = ids ? ids[s.best[j].second] : s.best[j].second;
        }
      }
      for (int64_t j = found; j < k; ++j) v[j] = pad, ix[j] = -1;
    };
  };
  // one thread per ~1 ms of work (threads_for_ns), a query's walk estimated at ef * R gathered rows of D
  const double ns = double(Q) * double(ef) * double(R) * double(g.D) * 0.25;
  parallel_take(Q, threads_for_ns(ns), make_worker, /*blas=*/false);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> graph_search_cpu(const at::Tensor& queries, const at::Tensor& vectors,
                                                    const at::Tensor& norms, const at::Tensor& graph, int64_t entry,
                                                    int64_t k, int64_t ef, c10::string_view metric,
                                                    const std::optional<at::Tensor>& mask,
                                                    const std::optional<at::Tensor>& ids) {
  check_graph(vectors, norms, graph);
  check_dim(queries, 2, "queries", "[Q, D]");
  TORCH_CHECK(queries.scalar_type() == at::kFloat && queries.device().is_cpu(),
              "queries must be float32 on the CPU, got ", queries.scalar_type(), " on ", queries.device());
  TORCH_CHECK(queries.size(1) == vectors.size(1), "queries must have D = ", vectors.size(1),
              " columns (the rows' dimension), got ", queries.size(1));
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  TORCH_CHECK(ef >= k, "ef must be at least k = ", k, ", got ", ef);
  TORCH_CHECK(metric == "ip" || metric == "cosine" || metric == "l2",
              "metric must be 'ip', 'cosine' or 'l2' (squared), got '", metric, "'");
  const GraphMetric gm = metric == "l2" ? GraphMetric::L2 : metric == "cosine" ? GraphMetric::Cosine : GraphMetric::IP;
  const int64_t N = vectors.size(0);
  TORCH_CHECK(N == 0 || (entry >= 0 && entry < N), "entry must be a row in [0, ", N, "), got ", entry);
  const bool* allowed = nullptr;
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 1 && m.size(0) == N && m.device().is_cpu(),
                "mask must be a bool [N] CPU tensor (N = ", N, "), got ", m.scalar_type(), " ", m.sizes(), " on ",
                m.device());
    allowed = m.data_ptr<bool>();
  }
  const int64_t* id_of = nullptr;
  if (ids.has_value()) {
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->size(0) >= N && ids->is_contiguous() &&
                    ids->device().is_cpu(),
                "ids must be a contiguous int64 CPU tensor of at least N = ", N, " entries, got ", ids->scalar_type(),
                " ", ids->sizes());
    id_of = ids->data_ptr<int64_t>();
  }
  const at::Tensor q = queries.contiguous();
  const int64_t Q = q.size(0);
  const float* qp = q.data_ptr<float>();
  for (int64_t i = 0; i < Q * q.size(1); ++i)  // a NaN would break the walk's ordering
    TORCH_CHECK_VALUE(std::isfinite(qp[i]), "queries must be finite, found NaN or inf in row ", i / q.size(1));
  at::Tensor values = at::empty({Q, k}, at::kFloat), indices = at::empty({Q, k}, at::kLong);
  const int32_t* adj = graph.data_ptr<int32_t>();
  if (vectors.scalar_type() == at::kFloat)
    search_rows(rows_of<float>(vectors, norms), adj, graph.size(1), q.data_ptr<float>(), Q, entry, k, ef,
                gm, allowed, id_of, values.data_ptr<float>(), indices.data_ptr<int64_t>());
  else
    search_rows(rows_of<c10::BFloat16>(vectors, norms), adj, graph.size(1), q.data_ptr<float>(), Q, entry, k, ef,
                gm, allowed, id_of, values.data_ptr<float>(), indices.data_ptr<int64_t>());
  return {values, indices};
}

TORCH_LIBRARY_IMPL(xmodal, CPU, m) {
  m.impl("graph_search", &graph_search_cpu);
  m.impl("graph_insert", &graph_insert_cpu);
  m.impl("graph_project", &graph_project_cpu);
  m.impl("graph_repair", &graph_repair_cpu);
}

}  // namespace xmodal
