// The CPU tiled top-k driver, shared by the float search (topk_search_cpu.cpp) and compressed search
// (codes_int8_cpu.cpp, codes_hamming_cpu.cpp): the rows are cut into equal, contiguous parts (a few per
// thread, taken by whichever thread is free), each part into tiles; a thread feeds per-query candidate buffers
// (topk_select.h) from each tile while it is in cache, and the buffers are merged at the end. The Q x N score
// matrix never exists: extra memory is O(parts * Q * k + tile).
#pragma once
#include "common/parallel.h"
#include "search/topk_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

namespace xmodal {

// A one-thread estimate of the nanoseconds to score one row of `row_bytes` for one query and select from it,
// for tiled_topk's thread count: reading the row (shared by the queries of a block) plus ~2 ns of selection
// (fitted on an AVX2 EPYC: 64 / 17 / 5.5 ns for one query over float32 / int8 / 256-bit rows of D = 256).
inline double scan_row_ns(int64_t row_bytes, int64_t query_block) {
  return 2.0 + double(row_bytes) * (0.06 / double(std::max<int64_t>(1, query_block)) + 0.02);
}

// make_scorer() gives each worker thread a scorer; scorer(n0, nt, q0, qn, emit) ranks rows n0 .. n0 + nt for
// queries q0 .. q0 + qn and calls emit(i, keys) with the nt ranking keys of query q0 + i (masked rows:
// kSkipOrd). For each tile it is called for consecutive query blocks, so a scorer may prepare a tile once.
// write(q, found, merged) then receives query q's best `found` (<= k) candidates, best first.
// row_ns: the caller's estimate of one thread's nanoseconds per row and query (0: unknown, use every thread);
// it sets the number of threads (parallel.h, threads_for_ns). blas: the scorer may call BLAS (parallel.h,
// parallel_take).
template <typename ord_t, typename MakeScorer, typename Write>
void tiled_topk(int64_t Q, int64_t N, int64_t k, int64_t tile_rows, int64_t query_block, const MakeScorer& make_scorer,
                const Write& write, double row_ns = 0, bool blas = true) {
  const int64_t threads = row_ns > 0 ? threads_for_ns(double(N) * double(Q) * row_ns) : xmodal_threads();
  query_block = std::max<int64_t>(1, std::min(Q, query_block));
  // Few rows and many queries (k-means' assignment: 10^5 rows against 256 centres): every thread scores all
  // rows, in one tile, for its own query blocks. Split by rows instead, each thread's GEMMs would cover a
  // sliver of the rows, and two threads ran no faster than one (200,000 x 256 x 128, k = 1: 378 vs 398 ms).
  const bool split_queries = threads > 1 && N > 0 && N <= tile_rows && Q >= threads * query_block;
  tile_rows = split_queries ? std::max<int64_t>(N, 1)
                            : std::max<int64_t>(1, std::min(tile_rows, std::max<int64_t>(16, (N + threads - 1) / threads)));
  // Each part scans an equal share of the rows (in multiples of 64), cut into tiles: handing out whole tiles
  // let one thread scan up to a tile more than the other (200,000 rows in 4 tiles of 65,536: 131,072
  // against 68,928). There are up to kPartsPerThread parts per thread, taken in turn by whichever thread is
  // free: when another process holds a core, its thread scans fewer parts instead of holding the others back
  // (one query over 200,000 x 256 with one core busy: 16.0 ms on 2 threads, 12.6 ms on 1, when each thread
  // owned half of the rows).
  constexpr int64_t kPartsPerThread = 4, kMinPartRows = 4096;
  const int64_t parts = threads == 1 || split_queries
                            ? 1
                            : std::min(std::max<int64_t>(1, N / 64),
                                       std::clamp<int64_t>(N / kMinPartRows, threads, threads * kPartsPerThread));
  const auto part_start = [&](int64_t p) { return p == parts ? N : p * N / parts / 64 * 64; };
  int64_t max_rows_per_part = 0;
  for (int64_t p = 0; p < parts; ++p) max_rows_per_part = std::max(max_rows_per_part, part_start(p + 1) - part_start(p));
  // A buffer of 2k keeps the best k of every 2k candidates; when a part has at most 4k rows, compactions would
  // discard little, so the buffer holds all of them and one selection at the merge does the work.
  const int64_t capacity = max_rows_per_part <= 4 * k
                               ? max_rows_per_part
                               : std::max<int64_t>(1, std::min(k + std::max<int64_t>(k, 32), max_rows_per_part));
  // Queries are processed in super-blocks so the candidate buffers stay under ~256 MiB for any Q and k. When
  // the buffers hold every row, a super-block's buffers are kept near L2 (2 MiB) instead: they are written
  // whole and read back by the merge, and the (few) rows cost little to score again per super-block.
  const int64_t per_query = parts * capacity * int64_t(sizeof(Candidate<ord_t>));
  const bool all_rows = capacity == max_rows_per_part;
  const int64_t buffer_bytes = all_rows ? (int64_t(2) << 20) : (int64_t(256) << 20);
  const int64_t super_block = std::min(std::max<int64_t>(Q, 1),
                                       std::max(std::max<int64_t>(1, buffer_bytes / per_query), all_rows ? 1 : query_block));
  if (all_rows) query_block = std::min(query_block, super_block);
  // not value-initialised: every slot is written before it is read
  std::unique_ptr<Candidate<ord_t>[]> slots(new Candidate<ord_t>[size_t(parts * super_block * capacity)]);
  std::vector<TopKBuffer<ord_t>> buffers(size_t(parts * super_block));

  for (int64_t s0 = 0; s0 < Q; s0 += super_block) {
    const int64_t s1 = std::min(Q, s0 + super_block);
    for (int64_t p = 0; p < parts; ++p)
      for (int64_t i = 0; i < s1 - s0; ++i)
        buffers[p * super_block + i] = {&slots[(p * super_block + i) * capacity], 0, kSkipOrd<ord_t>};
    if (split_queries) {  // one part (parts == 1): threads take query blocks
      parallel_take((s1 - s0 + query_block - 1) / query_block, threads, [&] {
        return [&, score = make_scorer()](int64_t b) mutable {
          const int64_t q0 = s0 + b * query_block, qn = std::min(s1, q0 + query_block) - q0;
          score(0, N, q0, qn, [&](int64_t i, const ord_t* keys) { buffers[q0 - s0 + i].scan(keys, N, 0, k, capacity); });
        };
      }, blas);
    } else {
      // A part is scanned by one thread, into its own buffers. Each query's k-th best key in a finished part
      // bounds its answer from below (its floor), so a part starting later takes only keys at or above the
      // best floor so far: its buffers skip the warm-up every part otherwise repeats (with 8 parts for 2
      // threads, a 16-query Hamming scan spent 14% more CPU time than on one thread, which showed as that much
      // more time when another process held the second core). Keys equal to a floor are kept, so the answer
      // does not depend on which parts finished first.
      std::vector<std::atomic<ord_t>> floors(size_t(s1 - s0));
      for (auto& f : floors) f.store(kSkipOrd<ord_t>, std::memory_order_relaxed);
      parallel_take(parts, threads, [&] {
        return [&, score = make_scorer()](int64_t p) mutable {
          for (int64_t i = 0; i < s1 - s0; ++i) {
            const ord_t floor = floors[i].load(std::memory_order_relaxed);
            if (floor != kSkipOrd<ord_t>) buffers[p * super_block + i].threshold = ord_t(floor - 1);
          }
          const int64_t end = part_start(p + 1);
          for (int64_t n0 = part_start(p); n0 < end; n0 += tile_rows) {
            const int64_t nt = std::min(end, n0 + tile_rows) - n0;
            for (int64_t q0 = s0; q0 < s1; q0 += query_block) {
              const int64_t qn = std::min(s1, q0 + query_block) - q0;
              score(n0, nt, q0, qn, [&](int64_t i, const ord_t* keys) {
                buffers[p * super_block + (q0 - s0 + i)].scan(keys, nt, n0, k, capacity);
              });
            }
          }
          if (parts == 1) return;
          for (int64_t i = 0; i < s1 - s0; ++i) {
            TopKBuffer<ord_t>& b = buffers[p * super_block + i];
            if (b.count < k) continue;
            b.compact(k);  // the part's k best, its k-th best last (the merge wants no more of a part)
            const ord_t kth = b.threshold;
            for (ord_t f = floors[i].load(std::memory_order_relaxed);
                 kth > f && !floors[i].compare_exchange_weak(f, kth, std::memory_order_relaxed);) {
            }
          }
        };
      }, blas);
    }
    // Merge the parts' candidates per query, best first, in blocks of 16 queries.
    parallel_take((s1 - s0 + 15) / 16, threads, [&] {
      return [&, merged = std::vector<Candidate<ord_t>>()](int64_t b) mutable {
        for (int64_t q = s0 + 16 * b; q < std::min(s1, s0 + 16 * (b + 1)); ++q)
          write(q, merge_buffers(buffers.data() + (q - s0), parts, super_block, k, merged), merged);
      };
    }, /*blas=*/false);  // (writes may read rows, never call BLAS)
  }
}

}  // namespace xmodal
