// IVF list scan on the CPU: for every query, the top-k rows over the inverted lists it probes, in one call.
//
// Work is list-major, as a GEMM over each list would be: the (query, probed list) pairs are grouped by list
// (counting sort), and each thread scans whole lists: one small GEMM for all the queries that probe the list
// (inner products of float/double rows), or else a block of rows at a time scored against every such query
// while the block is in L1; the scores feed a per-pair top-k buffer. A second pass
// merges each query's nprobe x k candidates. Replaces one op call per probed list from Python, whose
// overhead dominated small nprobe.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "search/codes_cpu.h"
#include "search/planner.h"
#include "search/search_cpu.h"
#include "search/tiled_topk.h"
#include "search/topk_common.h"
#include "search/topk_select.h"

namespace xmodal {
namespace {

template <typename T, typename acc_t>
inline acc_t score(const T* __restrict q, const T* __restrict x, int64_t D, Metric m) {
  acc_t s = 0;
  if (m == Metric::IP) {
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += acc_t(q[d]) * acc_t(x[d]);
    return s;
  }
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t t = acc_t(q[d]) - acc_t(x[d]);
    s += t * t;
  }
  return -s;  // keys: larger is better
}

// The (query, probe) pairs grouped by list: pair p = q * nprobe + j; the pairs of list l are
// order[start[l] .. start[l + 1]). A list probed twice by one query is scanned once.
struct ListPairs {
  std::vector<int64_t> start, order, busy;  // busy: the lists some pair probes
};

ListPairs group_pairs(const int64_t* probes, int64_t Q, int64_t nprobe, int64_t nlist) {
  std::vector<char> scanned(Q * nprobe, 0);  // pair p names a list, and its query's first mention of it
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t* row = probes + q * nprobe;
    for (int64_t j = 0; j < nprobe; ++j) scanned[q * nprobe + j] = row[j] >= 0 && std::find(row, row + j, row[j]) == row + j;
  }
  ListPairs g;
  g.start.assign(nlist + 1, 0);
  g.order.resize(Q * nprobe);
  for (int64_t p = 0; p < Q * nprobe; ++p) if (scanned[p]) ++g.start[probes[p] + 1];
  for (int64_t l = 0; l < nlist; ++l) g.start[l + 1] += g.start[l];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t p = 0; p < Q * nprobe; ++p) if (scanned[p]) g.order[fill[probes[p]]++] = p;
  for (int64_t l = 0; l < nlist; ++l) if (g.start[l + 1] > g.start[l]) g.busy.push_back(l);
  return g;
}

// One thread's estimated nanoseconds to scan the busy lists (rows of row_bytes; tiled_topk.h, scan_row_ns).
double lists_ns(const ListPairs& g, const std::vector<int64_t>& begin, const std::vector<int64_t>& end,
                int64_t row_bytes) {
  double ns = 0;
  for (int64_t l : g.busy) {
    const int64_t np = g.start[l + 1] - g.start[l];
    ns += double(end[l] - begin[l]) * double(np) * scan_row_ns(row_bytes, np);
  }
  return ns;
}

// Scans the busy lists in parallel, list-major: scan_list(l, pairs, np, buffers, capacity) feeds the np
// pairs' candidate buffers with list l's rows. Threads take lists one at a time (parallel.h, parallel_take),
// as many threads as `ns` (lists_ns) pays for; `blas`: scan_list may call BLAS. Returns k candidates per pair
// (unused: kSkipOrd).
template <typename ord_t, typename ScanList>
std::vector<Candidate<ord_t>> scan_lists(const ListPairs& g, int64_t pairs, int64_t k, double ns, bool blas,
                                         const ScanList& scan_list) {
  std::vector<Candidate<ord_t>> cand(pairs * k, Candidate<ord_t>{kSkipOrd<ord_t>, -1});
  const int64_t capacity = std::max<int64_t>(2 * k, k + 32);
  parallel_take(int64_t(g.busy.size()), threads_for_ns(ns), [&] {
    return [&, slots = std::vector<Candidate<ord_t>>(), buffers = std::vector<TopKBuffer<ord_t>>()](int64_t li) mutable {
      const int64_t l = g.busy[li];
      const int64_t p0 = g.start[l], np = g.start[l + 1] - p0;
      slots.resize(np * capacity);
      buffers.assign(np, TopKBuffer<ord_t>{nullptr, 0, kSkipOrd<ord_t>});
      for (int64_t i = 0; i < np; ++i) buffers[i].slots = slots.data() + i * capacity;
      scan_list(l, g.order.data() + p0, np, buffers.data(), capacity);
      for (int64_t i = 0; i < np; ++i) {
        auto& b = buffers[i];
        if (b.count > k) b.compact(k);
        std::copy(b.slots, b.slots + b.count, cand.begin() + g.order[p0 + i] * k);
      }
    };
  }, blas);
  return cand;
}

// Each query's k best of its nprobe x k candidates, best first: value(key) for found ones, else (pad, -1).
template <typename ord_t, typename V, typename ToValue>
void merge_pairs(std::vector<Candidate<ord_t>>& cand, int64_t Q, int64_t nprobe, int64_t k, V pad,
                 const ToValue& value, V* vp, int64_t* ip) {
  // blocks of 16 queries; ~10 ns a candidate
  parallel_take((Q + 15) / 16, threads_for_ns(10.0 * double(Q * nprobe * k)), [&] {
    return [&](int64_t b) {
      for (int64_t q = 16 * b; q < std::min(Q, 16 * (b + 1)); ++q) {
        auto first = cand.begin() + q * nprobe * k, last = first + nprobe * k;
        const int64_t take = std::min<int64_t>(k, nprobe * k);
        std::partial_sort(first, first + take, last, Better{});
        for (int64_t j = 0; j < k; ++j) {
          const bool real = j < take && first[j].key != kSkipOrd<ord_t>;
          vp[q * k + j] = real ? value(first[j].key) : pad;
          ip[q * k + j] = real ? first[j].index : -1;
        }
      }
    };
  }, /*blas=*/false);
}

// Ranking keys of int8 codes or packed bits (see the op's schema): float keys, larger is better.
void code_keys(const at::Tensor& vectors, const float* qrows, const Int16Queries& q16, const uint64_t* qbits,
               int64_t np, int64_t D, int64_t r0, int64_t nr, const float* qbias, const Int8Terms& terms,
               const CodesPlan& plan, float* keys) {
  if (vectors.scalar_type() == at::kChar) {
    if (q16.usable()) int8_dots_i16(q16, 0, np, vectors.data_ptr<int8_t>() + r0 * D, nr, keys);
    else int8_dots(plan.isa, qrows, np, D, vectors.data_ptr<int8_t>() + r0 * D, nr, keys);
    terms.apply(plan.isa, keys, np, nr, qbias, r0);
    return;
  }
  const int64_t words = D / 8;  // D: bytes per row for bits
  const auto* xp = reinterpret_cast<const uint64_t*>(vectors.data_ptr<uint8_t>());
  for (int64_t i = 0; i < np; ++i) hamming_keys(plan.vpopcnt, qbits + i * words, xp + r0 * words, nr, words, keys + i * nr);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ivf_scan_cpu(const at::Tensor& queries, const at::Tensor& vectors,
                                               const at::Tensor& list_offsets, const at::Tensor& probes, int64_t k,
                                               const std::string& metric, const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& query_bias,
                                               const std::optional<at::Tensor>& row_scale,
                                               const std::optional<at::Tensor>& row_bias,
                                               const std::optional<at::Tensor>& row_group) {
  // No autograd kernel sits above this op, so without the guard the ATen calls below would record
  // autograd history for inputs that require grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool int8_codes = vectors.scalar_type() == at::kChar, bits = vectors.scalar_type() == at::kByte;
  check_dim(queries, 2, "queries", "[Q, D]");
  check_dim(vectors, 2, "vectors", "[N, D]");
  if (int8_codes) {
    TORCH_CHECK(queries.scalar_type() == at::kFloat, "queries must be float32 with int8 vectors, got ",
                queries.scalar_type());
    TORCH_CHECK(metric == "ip", "metric must be 'ip' with int8 vectors (the keys of topk_int8), got '", metric, "'");
  } else if (bits) {
    TORCH_CHECK(queries.scalar_type() == at::kByte, "queries must be uint8 (packed bits) with uint8 vectors, got ",
                queries.scalar_type());
    TORCH_CHECK(metric == "hamming", "metric must be 'hamming' with uint8 vectors (packed bits), got '", metric, "'");
    TORCH_CHECK(vectors.size(1) % 8 == 0, "vectors must hold a multiple of 8 bytes (64 bits) per row, got ",
                vectors.size(1));
  } else {
    check_float_dtype(vectors, "vectors");
    check_same_dtype(queries, "queries", vectors, "vectors");
  }
  TORCH_CHECK(int8_codes || !(query_bias || row_scale || row_bias || row_group),
              "query_bias, row_scale, row_bias and row_group apply to int8 vectors only");
  TORCH_CHECK(queries.size(1) == vectors.size(1), "queries and vectors must have the same dimension D, got ",
              queries.size(1), " and ", vectors.size(1));
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  const Metric m = int8_codes || bits ? Metric::IP
                                      : parse_metric(metric, {Metric::IP, Metric::L2, Metric::SqEuclidean}, "ivf_scan");
  TORCH_CHECK(probes.scalar_type() == at::kLong && probes.dim() == 2 && probes.size(0) == queries.size(0),
              "probes must be a 2-D int64 tensor [Q, nprobe] with Q = ", queries.size(0), ", got ",
              probes.scalar_type(), " of shape ", probes.sizes());
  const int64_t Q = queries.size(0), N = vectors.size(0), D = vectors.size(1), nprobe = probes.size(1);
  // List l holds rows begin[l] .. end[l]: lists stored back to back ([nlist + 1] offsets) or each in its
  // own range with gaps between ([nlist, 2] (begin, end) rows, the index's appendable layout).
  const bool ranges = list_offsets.dim() == 2;
  TORCH_CHECK(list_offsets.scalar_type() == at::kLong &&
                  ((list_offsets.dim() == 1 && list_offsets.size(0) >= 1) ||
                   (ranges && list_offsets.size(1) == 2)),
              "list_offsets must be a 1-D int64 tensor [nlist + 1] or a 2-D int64 tensor [nlist, 2], got ",
              list_offsets.scalar_type(), " of shape ", list_offsets.sizes());
  for (const auto* t : {&queries, &vectors, &list_offsets, &probes}) {
    TORCH_CHECK(t->device().is_cpu(), "ivf_scan runs on the CPU; got a tensor on ", t->device());
  }
  const int64_t nlist = ranges ? list_offsets.size(0) : list_offsets.size(0) - 1;
  const at::Tensor offsets = list_offsets.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<int64_t> begin(nlist), end(nlist);
  for (int64_t l = 0; l < nlist; ++l) {
    begin[l] = ranges ? off[2 * l] : off[l];
    end[l] = ranges ? off[2 * l + 1] : off[l + 1];
  }
  if (ranges) {
    for (int64_t l = 0; l < nlist; ++l) {
      TORCH_CHECK(0 <= begin[l] && begin[l] <= end[l] && end[l] <= N, "list_offsets row ", l,
                  " must be a range 0 <= begin <= end <= N = ", N, ", got (", begin[l], ", ", end[l], ")");
    }
  } else {
    TORCH_CHECK(off[0] == 0 && off[nlist] == N, "list_offsets must start at 0 and end at N = ", N, ", got ", off[0],
                " and ", off[nlist]);
    for (int64_t l = 0; l < nlist; ++l) {
      TORCH_CHECK(off[l] <= off[l + 1], "list_offsets must be non-decreasing, got ", off[l], " before ", off[l + 1]);
    }
  }
  const bool* keep = nullptr;
  at::Tensor mask_c;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == N,
                "mask must be a 1-D bool tensor [N] = [", N, "], got ", mask->scalar_type(), " of shape ",
                mask->sizes());
    mask_c = mask->contiguous();
    keep = mask_c.data_ptr<bool>();
  }
  const at::Tensor probes_c = probes.contiguous();
  const int64_t* pr = probes_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < Q * nprobe; ++i) {
    TORCH_CHECK(pr[i] >= -1 && pr[i] < nlist, "probes must hold list ids in [0, ", nlist, ") or -1, got ", pr[i]);
  }

  const ListPairs g = group_pairs(pr, Q, nprobe, nlist);
  at::Tensor indices = at::empty({Q, k}, vectors.options().dtype(at::kLong));
  int64_t* ip = indices.data_ptr<int64_t>();
  const at::Tensor qc = queries.contiguous(), xc = vectors.contiguous();
  constexpr int64_t kRowBlock = 64;

  if (int8_codes || bits) {
    // row groups are checked on the probed lists' rows only, the rows this call reads: slots between lists hold
    // anything, and checking every list read all N groups per call (10 MB, milliseconds, at 10^7 rows)
    const Int8Terms terms(query_bias, row_scale, row_bias, row_group, Q, N, /*check_groups=*/false);
    for (const int64_t l : g.busy) terms.check_group_range(begin[l], end[l]);
    const CodesPlan plan = plan_codes_search(device_facts(vectors.device()), 1, D, D, bits);
    const Int16Queries q16_all = int8_codes && plan.isa == ScanIsa::Avx2 ? Int16Queries(qc.data_ptr<float>(), Q, D)
                                                                         : Int16Queries();
    using ord_t = int32_t;
    auto cand = scan_lists<ord_t>(g, Q * nprobe, k, lists_ns(g, begin, end, D), /*blas=*/false,
                                  [&](int64_t l, const int64_t* pairs, int64_t np, TopKBuffer<ord_t>* buffers,
                                      int64_t capacity) {
      // this list's queries side by side, then blocks of rows scored against all of them
      const int64_t qwidth = bits ? D / 8 : D;
      const int64_t width = terms.bias_width();
      std::vector<float> qrows(int8_codes ? np * D : 0), bias(terms.query_bias ? np * width : 0), keys(np * kRowBlock);
      std::vector<uint64_t> qbits(bits ? np * qwidth : 0);
      std::vector<ord_t> ords(kRowBlock);
      for (int64_t i = 0; i < np; ++i) {
        const int64_t q = pairs[i] / nprobe;
        if (int8_codes) std::copy_n(qc.data_ptr<float>() + q * D, D, qrows.data() + i * D);
        else std::memcpy(qbits.data() + i * qwidth, qc.data_ptr<uint8_t>() + q * D, D);
        if (terms.query_bias) std::copy_n(terms.query_bias + q * width, width, bias.data() + i * width);
      }
      // AVX2: this list's queries, rounded to int16 once for the whole call
      std::vector<int64_t> which(q16_all.usable() ? np : 0);
      for (size_t i = 0; i < which.size(); ++i) which[i] = pairs[i] / nprobe;
      const Int16Queries q16 = q16_all.usable() ? q16_all.rows(which.data(), np) : Int16Queries();
      for (int64_t r0 = begin[l]; r0 < end[l]; r0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, end[l] - r0);
        code_keys(xc, qrows.data(), q16, qbits.data(), np, D, r0, nr, terms.query_bias ? bias.data() : nullptr, terms,
                  plan, keys.data());
        for (int64_t i = 0; i < np; ++i) {
          for (int64_t r = 0; r < nr; ++r)
            ords[r] = (keep && !keep[r0 + r]) ? kSkipOrd<ord_t> : to_ord<float>(keys[i * nr + r]);
          buffers[i].scan(ords.data(), nr, r0, k, capacity);
        }
      }
    });
    if (int8_codes) {
      at::Tensor values = at::empty({Q, k}, vectors.options().dtype(at::kFloat));
      merge_pairs(cand, Q, nprobe, k, -std::numeric_limits<float>::infinity(),
                  [](ord_t key) { return from_ord<float>(key); }, values.data_ptr<float>(), ip);
      return {values, indices};
    }
    at::Tensor values = at::empty({Q, k}, vectors.options().dtype(at::kInt));
    merge_pairs(cand, Q, nprobe, k, std::numeric_limits<int32_t>::max(),
                [](ord_t key) { return int32_t(-from_ord<float>(key)); }, values.data_ptr<int32_t>(), ip);
    return {values, indices};
  }

  const bool larger = m == Metric::IP;
  const auto acc_type = vectors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor values = at::empty({Q, k}, vectors.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "ivf_scan_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using ord_t = ord_type<acc_t>;
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    // Inner products of float/double rows go through BLAS when two or more queries probe a list (measured
    // at 1M x 128: nprobe 8 went from 140 to 61 ms); 16-bit rows and distances keep the dot-product loop,
    // which accumulates 16-bit rows in fp32.
    constexpr bool kBlasType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    auto cand = scan_lists<ord_t>(g, Q * nprobe, k, lists_ns(g, begin, end, D * int64_t(sizeof(scalar_t))), /*blas=*/true,
                                  [&](int64_t l, const int64_t* pairs, int64_t np, TopKBuffer<ord_t>* buffers,
                                      int64_t capacity) {
      std::vector<ord_t> keys(kRowBlock);
      if (kBlasType && m == Metric::IP && np >= 2) {
        // Several queries share this list: score them all with one small GEMM (BLAS, single-threaded
        // inside this worker), then select from each query's row of scores.
        const int64_t lo = begin[l], n_l = end[l] - lo;
        at::Tensor group = at::empty({np, D}, qc.options());
        for (int64_t i = 0; i < np; ++i) group[i].copy_(qc[pairs[i] / nprobe]);
        const at::Tensor scores = at::mm(group, xc.narrow(0, lo, n_l).t()).contiguous();
        const scalar_t* sp = scores.data_ptr<scalar_t>();
        keys.resize(std::max<int64_t>(kRowBlock, n_l));
        for (int64_t i = 0; i < np; ++i) {
          for (int64_t r = 0; r < n_l; ++r)
            keys[r] = (keep && !keep[lo + r]) ? kSkipOrd<ord_t> : to_ord<acc_t>(acc_t(sp[i * n_l + r]));
          buffers[i].scan(keys.data(), n_l, lo, k, capacity);
        }
        return;
      }
      for (int64_t r0 = begin[l]; r0 < end[l]; r0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, end[l] - r0);
        for (int64_t i = 0; i < np; ++i) {
          const scalar_t* q = qp + (pairs[i] / nprobe) * D;
          for (int64_t r = 0; r < nr; ++r)
            keys[r] = (keep && !keep[r0 + r]) ? kSkipOrd<ord_t>
                                              : to_ord<acc_t>(score<scalar_t, acc_t>(q, xp + (r0 + r) * D, D, m));
          buffers[i].scan(keys.data(), nr, r0, k, capacity);
        }
      }
    });
    const acc_t pad = larger ? -std::numeric_limits<acc_t>::infinity() : std::numeric_limits<acc_t>::infinity();
    merge_pairs(cand, Q, nprobe, k, pad, [&](ord_t key) {
      acc_t v = from_ord<acc_t>(key);
      if (!larger) v = -v;
      return m == Metric::L2 ? std::sqrt(v) : v;
    }, values.data_ptr<acc_t>(), ip);
  });
  return {values.to(vectors.scalar_type()), indices};
}


TORCH_LIBRARY_IMPL(xmodal, CPU, m) { m.impl("ivf_scan", &ivf_scan_cpu); }

}  // namespace xmodal
