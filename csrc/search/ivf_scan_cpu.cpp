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
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
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

std::tuple<at::Tensor, at::Tensor> ivf_scan_cpu(const at::Tensor& queries, const at::Tensor& vectors,
                                               const at::Tensor& list_offsets, const at::Tensor& probes, int64_t k,
                                               const std::string& metric, const std::optional<at::Tensor>& mask) {
  // No autograd kernel sits above this op, so without the guard the ATen calls below would record
  // autograd history for inputs that require grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_dtype(vectors, "vectors");
  check_same_dtype(queries, "queries", vectors, "vectors");
  check_dim(queries, 2, "queries", "[Q, D]");
  check_dim(vectors, 2, "vectors", "[N, D]");
  TORCH_CHECK(queries.size(1) == vectors.size(1), "queries and vectors must have the same dimension D, got ",
              queries.size(1), " and ", vectors.size(1));
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  const Metric m = parse_metric(metric, {Metric::IP, Metric::L2, Metric::SqEuclidean}, "ivf_scan");
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

  // Group the (query, probe) pairs by list: pair p = q * nprobe + j, pairs of list l at
  // pair_order[pair_start[l] .. pair_start[l + 1]). A list probed twice by one query is scanned once.
  std::vector<char> scanned(Q * nprobe, 0);  // pair p names a list, and its query's first mention of it
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t j = 0; j < nprobe; ++j) {
      const int64_t* row = pr + q * nprobe;
      scanned[q * nprobe + j] = row[j] >= 0 && std::find(row, row + j, row[j]) == row + j;
    }
  }
  std::vector<int64_t> pair_start(nlist + 1, 0), pair_order(Q * nprobe);
  for (int64_t p = 0; p < Q * nprobe; ++p) if (scanned[p]) ++pair_start[pr[p] + 1];
  for (int64_t l = 0; l < nlist; ++l) pair_start[l + 1] += pair_start[l];
  {
    std::vector<int64_t> fill(pair_start.begin(), pair_start.end() - 1);
    for (int64_t p = 0; p < Q * nprobe; ++p) if (scanned[p]) pair_order[fill[pr[p]]++] = p;
  }
  std::vector<int64_t> busy_lists;
  for (int64_t l = 0; l < nlist; ++l) if (pair_start[l + 1] > pair_start[l]) busy_lists.push_back(l);

  const bool larger = m == Metric::IP;
  const auto acc_type = vectors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor values = at::empty({Q, k}, vectors.options().dtype(acc_type));
  at::Tensor indices = at::empty({Q, k}, vectors.options().dtype(at::kLong));
  const at::Tensor qc = queries.contiguous(), xc = vectors.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vectors.scalar_type(), "ivf_scan_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using ord_t = ord_type<acc_t>;
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    // candidates of each (query, probe) pair: k slots, unused ones marked kSkipOrd
    std::vector<Candidate<ord_t>> cand(Q * nprobe * k, Candidate<ord_t>{kSkipOrd<ord_t>, -1});
    const int64_t capacity = std::max<int64_t>(2 * k, k + 32);
    constexpr int64_t kRowBlock = 64;
    // Inner products of float/double rows go through BLAS when two or more queries probe a list (measured
    // at 1M x 128: nprobe 8 went from 140 to 61 ms); 16-bit rows and distances keep the dot-product loop,
    // which accumulates 16-bit rows in fp32.
    constexpr bool kBlasType = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
    auto use_gemm = [&](int64_t np) { return kBlasType && m == Metric::IP && np >= 2; };

    parallel_for(0, int64_t(busy_lists.size()), 1, [&](int64_t l0, int64_t l1) {
      std::vector<Candidate<ord_t>> slots;
      std::vector<TopKBuffer<ord_t>> buffers;
      std::vector<ord_t> keys(kRowBlock);
      for (int64_t li = l0; li < l1; ++li) {
        const int64_t l = busy_lists[li];
        const int64_t p0 = pair_start[l], np = pair_start[l + 1] - p0;
        slots.resize(np * capacity);
        buffers.assign(np, TopKBuffer<ord_t>{nullptr, 0, kSkipOrd<ord_t>});
        for (int64_t i = 0; i < np; ++i) buffers[i].slots = slots.data() + i * capacity;
        if (use_gemm(np)) {
          // Several queries share this list: score them all with one small GEMM (BLAS, single-threaded
          // inside this worker), then select from each query's row of scores.
          const int64_t lo = begin[l], n_l = end[l] - lo;
          at::Tensor group = at::empty({np, D}, qc.options());
          for (int64_t i = 0; i < np; ++i) group[i].copy_(qc[pair_order[p0 + i] / nprobe]);
          const at::Tensor scores = at::mm(group, xc.narrow(0, lo, n_l).t()).contiguous();
          const scalar_t* sp = scores.data_ptr<scalar_t>();
          keys.resize(std::max<int64_t>(kRowBlock, n_l));
          for (int64_t i = 0; i < np; ++i) {
            for (int64_t r = 0; r < n_l; ++r) {
              keys[r] = (keep && !keep[lo + r]) ? kSkipOrd<ord_t> : to_ord<acc_t>(acc_t(sp[i * n_l + r]));
            }
            buffers[i].scan(keys.data(), n_l, lo, k, capacity);
          }
        } else {
          for (int64_t r0 = begin[l]; r0 < end[l]; r0 += kRowBlock) {
            const int64_t nr = std::min(kRowBlock, end[l] - r0);
            for (int64_t i = 0; i < np; ++i) {
              const scalar_t* q = qp + (pair_order[p0 + i] / nprobe) * D;
              for (int64_t r = 0; r < nr; ++r) {
                keys[r] = (keep && !keep[r0 + r]) ? kSkipOrd<ord_t>
                                                  : to_ord<acc_t>(score<scalar_t, acc_t>(q, xp + (r0 + r) * D, D, m));
              }
              buffers[i].scan(keys.data(), nr, r0, k, capacity);
            }
          }
        }
        for (int64_t i = 0; i < np; ++i) {
          auto& b = buffers[i];
          if (b.count > k) b.compact(k);
          std::copy(b.slots, b.slots + b.count, cand.begin() + pair_order[p0 + i] * k);
        }
      }
    });

    acc_t* vp = values.data_ptr<acc_t>();
    int64_t* ip = indices.data_ptr<int64_t>();
    const acc_t pad = larger ? -std::numeric_limits<acc_t>::infinity() : std::numeric_limits<acc_t>::infinity();
    parallel_for(0, Q, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        auto first = cand.begin() + q * nprobe * k, last = first + nprobe * k;
        const int64_t take = std::min<int64_t>(k, nprobe * k);
        std::partial_sort(first, first + take, last, better<ord_t>);
        for (int64_t j = 0; j < k; ++j) {
          const bool real = j < take && first[j].key != kSkipOrd<ord_t>;
          if (!real) {
            vp[q * k + j] = pad;
            ip[q * k + j] = -1;
            continue;
          }
          acc_t v = from_ord<acc_t>(first[j].key);
          if (!larger) v = -v;
          if (m == Metric::L2) v = std::sqrt(v);
          vp[q * k + j] = v;
          ip[q * k + j] = first[j].index;
        }
      }
    });
  });
  return {values.to(vectors.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CPU, m) { m.impl("ivf_scan", &ivf_scan_cpu); }

}  // namespace xmodal
