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

// make_scorer() gives each worker thread a scorer; scorer(n0, nt, q0, qn, emit) ranks rows n0 .. n0 + nt for
// queries q0 .. q0 + qn and calls emit(i, keys) with the nt ranking keys of query q0 + i (masked rows:
// kSkipOrd). For each tile it is called for consecutive query blocks, so a scorer may prepare a tile once.
// write(q, found, merged) then receives query q's best `found` (<= k) candidates, best first.
template <typename ord_t, typename MakeScorer, typename Write>
void tiled_topk(int64_t Q, int64_t N, int64_t k, int64_t tile_rows, int64_t query_block, const MakeScorer& make_scorer,
                const Write& write) {
  const int64_t threads = at::get_num_threads();
  query_block = std::max<int64_t>(1, std::min(Q, query_block));
  // Few rows and many queries (k-means' assignment: 10^5 rows against 256 centres): every thread scores all
  // rows, in one tile, for its own query blocks. Split by rows instead, each thread's GEMMs would cover a
  // sliver of the rows, and two threads ran no faster than one (200,000 x 256 x 128, k = 1: 378 vs 398 ms).
  const bool split_queries = threads > 1 && N > 0 && N <= tile_rows && Q >= threads * query_block;
  tile_rows = split_queries ? std::max<int64_t>(N, 1)
                            : std::max<int64_t>(1, std::min(tile_rows, std::max<int64_t>(16, (N + threads - 1) / threads)));
  const int64_t num_tiles = (N + tile_rows - 1) / tile_rows;
  // Each part scans an equal share of the rows (in multiples of 64), cut into tiles: handing out whole tiles
  // let one thread scan up to a tile more than the other (200,000 rows in 4 tiles of 65,536: 131,072
  // against 68,928). With enough rows there are kPartsPerThread parts per thread, taken in turn by whichever
  // thread is free: when another process holds a core, its thread scans fewer parts instead of holding the
  // others back (one query over 200,000 x 256 with one core busy: 16.0 ms on 2 threads, 12.6 ms on 1, when
  // each thread owned half of the rows).
  constexpr int64_t kPartsPerThread = 4, kMinPartRows = 4096;
  const bool shared_parts = threads > 1 && !split_queries && N >= threads * kPartsPerThread * kMinPartRows;
  const int64_t parts = shared_parts ? threads * kPartsPerThread : std::max<int64_t>(1, std::min(threads, num_tiles));
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
      const int64_t blocks = (s1 - s0 + query_block - 1) / query_block;
      parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
        auto score = make_scorer();
        for (int64_t b = bb; b < be; ++b) {
          const int64_t q0 = s0 + b * query_block, qn = std::min(s1, q0 + query_block) - q0;
          score(0, N, q0, qn, [&](int64_t i, const ord_t* keys) { buffers[q0 - s0 + i].scan(keys, N, 0, k, capacity); });
        }
      });
    } else {
      std::atomic<int64_t> next_part{0};
      parallel_for(0, std::min(threads, parts), 1, [&](int64_t, int64_t) {
        auto score = make_scorer();
        // each call takes parts until none is left (a part is scanned by one thread, into its own buffers)
        for (int64_t p; (p = next_part.fetch_add(1)) < parts;) {
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
        }
      });
    }
    // Merge the parts' candidates per query, best first.
    parallel_for(s0, s1, 16, [&](int64_t qb, int64_t qe) {
      std::vector<Candidate<ord_t>> merged;
      for (int64_t q = qb; q < qe; ++q) write(q, merge_buffers(buffers.data() + (q - s0), parts, super_block, k, merged), merged);
    });
  }
}

}  // namespace xmodal
