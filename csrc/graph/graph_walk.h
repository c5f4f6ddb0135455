// The proximity graph's two building blocks, shared by building, searching and repairing (graph_cpu.cpp):
// a best-first walk from an entry node, and the pruning rule that picks a node's neighbours.
//
// The graph is a fixed-width table: row p of `adj` ([N, R] int32) lists p's out-neighbours, -1 after the last.
// Distances are "smaller is better" keys: -q·x for inner products, ||x||² - 2 q·x for l2 (the query's own
// squared norm, the same for every row, is added back at the end). Pruning always uses the rows' squared l2
// distances, so the graph is a geometric one whatever the search metric (for unit rows, cosine and l2 agree).
#pragma once
#include "graph/gather_dots.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

namespace xmodal {
namespace graph {

using Scored = std::pair<float, int32_t>;  // (key, row): smaller keys are better

template <typename T>
struct Rows {
  const T* x;          // [N, ld] rows
  int64_t ld, D, N;
  const float* norms;  // [N] squared norms
  ScanIsa isa;
};

// Locks for the neighbour lists while a build writes them, striped over the nodes (a node's list is read or
// written under its stripe; a thread holds one stripe at a time).
class ListLocks {
 public:
  ListLocks() : flags_(new std::atomic<bool>[kStripes]) {
    for (int64_t i = 0; i < kStripes; ++i) flags_[i].store(false, std::memory_order_relaxed);
  }
  void lock(int32_t node) {
    std::atomic<bool>& f = flags_[node & (kStripes - 1)];
    while (f.exchange(true, std::memory_order_acquire))
      while (f.load(std::memory_order_relaxed)) std::this_thread::yield();
  }
  void unlock(int32_t node) { flags_[node & (kStripes - 1)].store(false, std::memory_order_release); }

 private:
  static constexpr int64_t kStripes = 1 << 14;
  std::unique_ptr<std::atomic<bool>[]> flags_;
};

// Per-thread working memory, kept between calls so a search allocates nothing per query: the visited marks
// (16 bits per node, "visited" = equal to the current epoch, so clearing is one increment; half the bytes of
// a word keeps more of them in cache), the two heaps, and buffers for a node's neighbours and their keys.
struct Scratch {
  std::vector<uint16_t> seen;
  uint16_t epoch = 0;
  std::vector<Scored> frontier, best;
  std::vector<int32_t> ids;
  std::vector<float> keys, vec;
  std::vector<char> dropped;

  void start_walk(int64_t N) {
    if (int64_t(seen.size()) < N) seen.resize(N, 0);
    if (++epoch == 0) {  // wrapped: forget every mark
      std::fill(seen.begin(), seen.end(), uint16_t(0));
      epoch = 1;
    }
  }
  bool visit(int32_t node) {  // true the first time in this walk
    if (seen[node] == epoch) return false;
    seen[node] = epoch;
    return true;
  }
  static Scratch& mine() {
    thread_local Scratch s;
    return s;
  }
};

// The number of neighbours listed in a row of R entries.
inline int64_t degree_of(const int32_t* list, int64_t R) {
  int64_t n = 0;
  while (n < R && list[n] >= 0) ++n;
  return n;
}

// keys[j] of rows ids[j] for the fp32 vector q (see the header comment); l2: squared-l2 keys, else -dot.
template <typename T>
void keys_of(const Rows<T>& g, const float* q, bool l2, const int32_t* ids, int64_t n, float* keys) {
  gather_dots(g.isa, q, g.x, g.ld, ids, n, g.D, keys);
  if (l2) {
    for (int64_t j = 0; j < n; ++j) keys[j] = g.norms[ids[j]] - 2.f * keys[j];
  } else {
    for (int64_t j = 0; j < n; ++j) keys[j] = -keys[j];
  }
}

// Asks for the rows' cache lines before their dot products need them: the rows a step scores are scattered,
// and their loads would otherwise wait on memory one after another.
template <typename T>
inline void prefetch_rows(const Rows<T>& g, const int32_t* ids, int64_t n) {
  const int64_t bytes = g.D * int64_t(sizeof(T));
  for (int64_t j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(g.x + int64_t(ids[j]) * g.ld);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
}

// Best-first walk for q, as in HNSW's bottom layer: expand the closest unexpanded node until it is farther than
// the ef-th best found. It starts from `entry` and `pivots` rows spread evenly over the row numbers (rows i N /
// pivots): scoring a few dozen rows costs less than the hops a walk from one far entry takes to reach the
// query's region, which HNSW's upper layers shorten instead. Only rows where allowed[row] (all if null) enter
// the answer; the others are still walked through, so a filter does not cut the graph. On return s.best holds
// the up to ef best allowed rows as a max-heap. `locks`: lists may change under a concurrent build (read each
// under its lock).
template <typename T>
void walk(const Rows<T>& g, const int32_t* adj, int64_t R, const float* q, bool l2, int64_t ef, int32_t entry,
          int64_t pivots, const bool* allowed, Scratch& s, ListLocks* locks = nullptr) {
  const auto farther = [](const Scored& a, const Scored& b) { return a.first > b.first; };  // min-heap order
  const auto nearer = [](const Scored& a, const Scored& b) { return a.first < b.first; };   // max-heap order
  s.start_walk(g.N);
  s.frontier.clear();
  s.best.clear();
  pivots = std::min(pivots, g.N);
  const size_t room = size_t(std::max(R, pivots + 1));
  if (s.ids.size() < room) s.ids.resize(room), s.keys.resize(room);
  int64_t n = 0;
  s.visit(entry);
  s.ids[n++] = entry;
  for (int64_t i = 0; i < pivots; ++i) {
    const int32_t p = int32_t(i * g.N / pivots);
    if (s.visit(p)) s.ids[n++] = p;
  }
  prefetch_rows(g, s.ids.data(), n);
  keys_of(g, q, l2, s.ids.data(), n, s.keys.data());
  for (int64_t j = 0; j < n; ++j) {
    const Scored v{s.keys[j], s.ids[j]};
    s.frontier.push_back(v);
    if (!allowed || allowed[v.second]) s.best.push_back(v);
  }
  std::make_heap(s.frontier.begin(), s.frontier.end(), farther);
  std::make_heap(s.best.begin(), s.best.end(), nearer);
  while (int64_t(s.best.size()) > ef) {
    std::pop_heap(s.best.begin(), s.best.end(), nearer);
    s.best.pop_back();
  }
  float bound = s.best.empty() ? std::numeric_limits<float>::infinity() : s.best.front().first;
  while (!s.frontier.empty()) {
    const Scored c = s.frontier.front();
    if (c.first > bound && int64_t(s.best.size()) >= ef) break;
    std::pop_heap(s.frontier.begin(), s.frontier.end(), farther);
    s.frontier.pop_back();
    // the list most likely expanded next: its cache lines load while this step scores
    if (!s.frontier.empty()) __builtin_prefetch(adj + int64_t(s.frontier.front().second) * R);
    const int32_t* list = adj + int64_t(c.second) * R;
    n = 0;
    if (locks) locks->lock(c.second);
    const int64_t deg = degree_of(list, R);
    for (int64_t j = 0; j < deg; ++j) __builtin_prefetch(&s.seen[list[j]]);
    for (int64_t j = 0; j < deg; ++j)
      if (s.visit(list[j])) s.ids[n++] = list[j];
    if (locks) locks->unlock(c.second);
    prefetch_rows(g, s.ids.data(), n);
    keys_of(g, q, l2, s.ids.data(), n, s.keys.data());
    for (int64_t j = 0; j < n; ++j) {
      const Scored v{s.keys[j], s.ids[j]};
      if (int64_t(s.best.size()) >= ef && !(v.first < bound)) continue;
      s.frontier.push_back(v);
      std::push_heap(s.frontier.begin(), s.frontier.end(), farther);
      if (allowed && !allowed[v.second]) continue;
      s.best.push_back(v);
      std::push_heap(s.best.begin(), s.best.end(), nearer);
      if (int64_t(s.best.size()) > ef) {
        std::pop_heap(s.best.begin(), s.best.end(), nearer);
        s.best.pop_back();
      }
      bound = s.best.front().first;
    }
  }
}

// Row p (any T) widened to fp32 in s.vec.
template <typename T>
const float* row_as_float(const Rows<T>& g, int32_t p, Scratch& s) {
  s.vec.resize(g.D);
  const T* r = g.x + int64_t(p) * g.ld;
  for (int64_t d = 0; d < g.D; ++d) s.vec[d] = static_cast<float>(r[d]);
  return s.vec.data();
}

// Picks p's neighbours from candidates (squared l2 distances to p, sorted nearest first, no repeats, not p)
// into out[0..R), -1 after the last: nearest first, a candidate c is left out when a neighbour n already
// picked is closer to it than p is by the factor alpha (alpha * d(n, c) <= d(p, c)). alpha = 1 keeps only
// edges no shorter path replaces (a relative neighbourhood graph); alpha > 1 keeps some longer edges, which
// shortens walks from far away (DiskANN's Vamana rule). Uses s.ids, s.keys, s.vec, s.dropped.
template <typename T>
void prune(const Rows<T>& g, const std::vector<Scored>& cands, float alpha, int64_t R, int32_t* out, Scratch& s) {
  const int64_t m = int64_t(cands.size());
  s.dropped.assign(m, 0);
  if (int64_t(s.ids.size()) < 2 * m) s.ids.resize(2 * m), s.keys.resize(2 * m);
  int32_t* slots = s.ids.data();     // the candidates still in play after the one picked
  int32_t* rows = slots + m;         // their rows
  int64_t kept = 0;
  for (int64_t i = 0; i < m && kept < R; ++i) {
    if (s.dropped[i]) continue;
    const int32_t c = cands[i].second;
    out[kept++] = c;
    if (kept == R) break;
    int64_t n = 0;
    for (int64_t j = i + 1; j < m; ++j)
      if (!s.dropped[j]) slots[n] = int32_t(j), rows[n++] = cands[j].second;
    if (n == 0) break;
    gather_dots(g.isa, row_as_float(g, c, s), g.x, g.ld, rows, n, g.D, s.keys.data());
    const float cn = g.norms[c];
    for (int64_t j = 0; j < n; ++j) {
      const float d = cn + g.norms[rows[j]] - 2.f * s.keys[j];
      if (alpha * d <= cands[slots[j]].first) s.dropped[slots[j]] = 1;
    }
  }
  for (int64_t i = kept; i < R; ++i) out[i] = -1;
}

}  // namespace graph
}  // namespace xmodal
