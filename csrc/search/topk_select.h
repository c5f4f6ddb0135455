// Host-side k-selection primitives: order-preserving integer keys and a threshold-filtered candidate
// buffer. Shared by the CPU kernel; the CUDA kernels use the same key encoding (topk_search_cuda.cu).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace xmodal {

// Scores are compared as signed integers whose order matches the float order (-inf < ... < +inf), with
// NaN mapped just above the "skip" value so that NaN ranks below every number but is still a candidate,
// and masked-out rows (kSkipOrd) are never accepted.
template <typename acc_t>
using ord_type = std::conditional_t<std::is_same_v<acc_t, double>, int64_t, int32_t>;

template <typename ord_t>
constexpr ord_t kSkipOrd = std::numeric_limits<ord_t>::min();
template <typename ord_t>
constexpr ord_t kNanOrd = std::numeric_limits<ord_t>::min() + 1;

template <typename acc_t, typename ord_t = ord_type<acc_t>>
inline ord_t to_ord(acc_t v) {
  ord_t b;
  std::memcpy(&b, &v, sizeof b);
  const ord_t o = b ^ ((b >> (8 * sizeof(ord_t) - 1)) & std::numeric_limits<ord_t>::max());
  return v != v ? kNanOrd<ord_t> : o;
}

template <typename acc_t, typename ord_t = ord_type<acc_t>>
inline acc_t from_ord(ord_t o) {
  if (o == kNanOrd<ord_t>) return std::numeric_limits<acc_t>::quiet_NaN();
  const ord_t b = o ^ ((o >> (8 * sizeof(ord_t) - 1)) & std::numeric_limits<ord_t>::max());
  acc_t v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

template <typename ord_t>
struct Candidate {
  ord_t key;
  int64_t index;
};

// Best first; ties go to the smaller index so results do not depend on the order candidates arrived in.
template <typename ord_t>
inline bool better(const Candidate<ord_t>& a, const Candidate<ord_t>& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

// `better` as a function object, for the std algorithms: a function pointer is not inlined there, which made
// the comparisons a fifth of a large-k search's time.
struct Better {
  template <typename ord_t>
  bool operator()(const Candidate<ord_t>& a, const Candidate<ord_t>& b) const {
    return better(a, b);
  }
};

// A per-query top-k in progress: an unsorted buffer of `capacity` > k slots. Keys above the threshold are
// appended; when the buffer fills, the best k are kept (nth_element) and the threshold becomes the k-th
// key, so each candidate costs O(1) amortised and most are rejected by one comparison.
template <typename ord_t>
struct TopKBuffer {
  Candidate<ord_t>* slots;
  int64_t count;
  ord_t threshold;

  void compact(int64_t k) {
    std::nth_element(slots, slots + (k - 1), slots + count, Better{});
    count = k;
    threshold = slots[k - 1].key;
  }

  // keys[j] is the key of database row base + j.
  void scan(const ord_t* __restrict keys, int64_t n, int64_t base, int64_t k, int64_t capacity) {
    if (append_all(keys, n, base, k, capacity)) return;
    constexpr int64_t kBlock = 32;
    int64_t j = 0;
    for (; j + kBlock <= n; j += kBlock) {
      // A local copy of the threshold lets the compiler vectorise this test (keys cannot alias it).
      const ord_t thr = threshold;
      int any = 0;
      for (int64_t t = 0; t < kBlock; ++t) any |= keys[j + t] > thr;
      if (!any) continue;
      for (int64_t t = 0; t < kBlock; ++t) push(keys[j + t], base + j + t, k, capacity);
    }
    for (; j < n; ++j) push(keys[j], base + j, k, capacity);
  }

  // All n keys at once, when they fit without a compaction and none has been made (no threshold yet):
  // only masked-out rows are left out.
  bool append_all(const ord_t* __restrict keys, int64_t n, int64_t base, int64_t k, int64_t capacity) {
    if (threshold != kSkipOrd<ord_t> || count + n > capacity) return false;
    Candidate<ord_t>* out = slots + count;
    for (int64_t j = 0; j < n; ++j) {
      out->key = keys[j];
      out->index = base + j;
      out += keys[j] != kSkipOrd<ord_t>;
    }
    count = out - slots;
    if (count == capacity && capacity > k) compact(k);  // as push does: a full buffer is never left behind
    return true;
  }

  void push(ord_t key, int64_t index, int64_t k, int64_t capacity) {
    if (!(key > threshold)) return;
    slots[count++] = {key, index};
    if (count == capacity && capacity > k) compact(k);
  }
};

// The best (at most k) candidates of one query over `parts` buffers (its buffer of part p is
// buffers[p * stride]), best first, into `merged`; returns how many there are.
template <typename ord_t>
int64_t merge_buffers(const TopKBuffer<ord_t>* buffers, int64_t parts, int64_t stride, int64_t k,
                      std::vector<Candidate<ord_t>>& merged) {
  merged.clear();
  for (int64_t p = 0; p < parts; ++p) {
    const TopKBuffer<ord_t>& b = buffers[p * stride];
    merged.insert(merged.end(), b.slots, b.slots + b.count);
  }
  const int64_t found = std::min<int64_t>(k, int64_t(merged.size()));
  // A heap (partial_sort) rejects most candidates with one comparison when k is a small share of them; when
  // it is not, selecting the k best first (linear) and sorting only those is several times faster.
  if (found > 0 && found * 64 > int64_t(merged.size())) {
    std::nth_element(merged.begin(), merged.begin() + (found - 1), merged.end(), Better{});
    std::sort(merged.begin(), merged.begin() + found, Better{});
  } else {
    std::partial_sort(merged.begin(), merged.begin() + found, merged.end(), Better{});
  }
  return found;
}

}  // namespace xmodal
