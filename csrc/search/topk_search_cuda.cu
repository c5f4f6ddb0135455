// Top-k similarity search on CUDA: the host side of the topk_search op, tile by tile.
//
// Few queries (<= 16, k <= 192, not kl): optionally a fused single-pass scan (topk_fused_scan_cuda.cuh,
// opt-in for now). The database is processed in tiles: one cuBLAS GEMM (through ATen, fp32 output with fp32
// accumulation for 16-bit inputs) scores a block of queries against a tile, then the tile's scores are merged
// into each query's running top-k with in-block radix selects (topk_select_cuda.cuh): one block per query
// when there are many queries, else several blocks per query (segments) and a second merge stage. The full
// Q x N score matrix is never materialised (workspace: one score tile). A final kernel sorts and converts
// keys to values. Everything runs on the current stream with no host synchronisation, except the optional
// check that kl inputs are non-negative, which is skipped while a CUDA graph is being captured.
#include "search/topk_common.h"
#include "common/settings.h"
#include "search/planner.h"
#include "search/topk_fused_scan_cuda.cuh"
#include "search/topk_mma_cuda.cuh"
#include "search/topk_select_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

namespace xmodal {
namespace {

// Each query's slots in sorted order -> metric values; empty slots become padding.
template <typename acc_t, typename scalar_t>
__global__ void finalize_kernel(int metric, int64_t total, int64_t k,
                                const typename KeyOf<acc_t>::type* __restrict__ run_key,
                                const int64_t* __restrict__ order, const int64_t* __restrict__ run_idx,
                                const acc_t* __restrict__ qterm, scalar_t* __restrict__ values,
                                int64_t* __restrict__ indices) {
  using key_t = typename KeyOf<acc_t>::type;
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= total) return;
  const int64_t row = t / k;
  const int64_t slot = row * k + order[t];
  const key_t key = run_key[slot];
  const Metric m = static_cast<Metric>(metric);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  if (key == 0) {
    values[t] = static_cast<scalar_t>(larger_is_better(m) ? -inf : inf);
    indices[t] = -1;
    return;
  }
  acc_t v = decode_key<acc_t>(key);
  switch (m) {
    case Metric::IP: break;
    case Metric::Cosine: v = v * qterm[row]; break;
    case Metric::CosineDistance: {
      const acc_t c = v * qterm[row];
      v = c != c ? c : sqrt(max(acc_t(2) * (acc_t(1) - c), acc_t(0)));
      break;
    }
    case Metric::SqEuclidean:
    case Metric::L2: {
      const acc_t sq = qterm[row] - v;
      v = sq != sq ? sq : (m == Metric::L2 ? sqrt(max(sq, acc_t(0))) : max(sq, acc_t(0)));
      break;
    }
    case Metric::KL: v = qterm[row] - v; break;
  }
  values[t] = static_cast<scalar_t>(v);
  indices[t] = run_idx[slot];
}

// ---- How tiles are selected -------------------------------------------------------------------------------
//
// Radix (strategy "tiled"): every tile's scores go through a radix select (verified correct on an H200).
// Filter ("filtered"): threshold-filtered selection of cuBLAS score tiles.
// FusedMma ("tensor_core"): 16-bit inputs, tiles after the first scored and filtered by mma_filter_kernel
// with no score tile. The planner checks each strategy's limits before a call gets here.
enum class TileSelection { Radix, Filter, FusedMma };

TileSelection tile_selection(Strategy strategy) {
  switch (strategy) {
    case Strategy::Filtered: return TileSelection::Filter;
    case Strategy::TensorCore: return TileSelection::FusedMma;
    default: return TileSelection::Radix;
  }
}

// Rows of the tile starting at row `seen`. Radix tiles are as large as the score workspace allows.
// Filtered: the first tile is small (a full select over it sets each query's threshold), and later tiles
// grow with the rows seen so that the candidates expected per query (~ k * rows / seen) fill at most half
// the buffer. Fused tiles have no score workspace to bound them.
int64_t next_tile_rows(TileSelection sel, int64_t seen, int64_t k, int64_t cap, int64_t score_tile_rows) {
  if (sel == TileSelection::Radix) return score_tile_rows;
  if (seen == 0) return std::min(score_tile_rows, std::max<int64_t>(8192, 4 * k));
  const int64_t grow = std::max<int64_t>(4096, seen * cap / (2 * k));
  if (sel == TileSelection::Filter) return std::min(score_tile_rows, grow);
  return std::min<int64_t>({grow, kMmaMaxTileRows, max_tile_rows()});
}

// scores [qn, nt] (fp32, row-major) = a [qn, D] . b [nt, D]^T through cuBLAS with TF32 tensor-core compute.
// A direct call, so the choice applies to this GEMM only (not to the process-wide matmul precision).
at::Tensor mm_tf32(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t qn = ac.size(0), nt = bc.size(0), D = ac.size(1);
  at::Tensor c = at::empty({qn, nt}, ac.options());
  if (qn == 0 || nt == 0) return c;
  if (D == 0) return c.zero_();
  TORCH_CHECK(qn < INT32_MAX && nt < INT32_MAX && D < INT32_MAX, "tf32 GEMM sizes must fit in int32");
  const float alpha = 1.f, beta = 0.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasSetStream(handle, at::cuda::getCurrentCUDAStream()));
  // column-major view: C^T [nt, qn] = B [nt, D] . A^T, i.e. op(B') = T on the stored [D, nt] matrix
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(nt), int(qn), int(D), &alpha,
                                    bc.data_ptr<float>(), CUDA_R_32F, int(D), ac.data_ptr<float>(), CUDA_R_32F, int(D),
                                    &beta, c.data_ptr<float>(), CUDA_R_32F, int(nt), CUBLAS_COMPUTE_32F_FAST_TF32,
                                    CUBLAS_GEMM_DEFAULT));
  return c;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> search_cuda(const SearchArgs& args, const Plan& plan, bool tf32) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using key_t = typename KeyOf<acc_t>::type;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const Metric metric = args.metric;
  const at::Tensor& queries = args.queries;
  const at::Tensor& database = args.database;
  const int64_t Q = queries.size(0), N = database.size(0), k = args.k;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto fopts = queries.options().dtype(acc_dtype);

  // Per-query terms (see topk_common.h) and the operand that multiplies the tiles.
  at::Tensor qterm = row_norm_term(queries, metric, acc_dtype), qgemm = queries, qpos;
  if (metric == Metric::KL) {
    qgemm = queries.to(acc_dtype);
    qterm = at::xlogy(qgemm, qgemm).sum(1);
    qpos = (qgemm > 0).to(acc_dtype);
  }
  if (!qterm.defined()) qterm = at::zeros({Q}, fopts);
  qterm = qterm.contiguous();
  const bool validate_kl = metric == Metric::KL && at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None;
  at::Tensor negatives = validate_kl ? (qgemm < 0).sum() : at::Tensor();

  // Running top-k (ping-pong buffers). Score tiles stay under ~256 MiB. The fused few-query scan needs none
  // of the tile state below (it computes row norms as it reads the rows).
  const bool fused = plan.strategy == Strategy::FusedScan;
  const TileSelection selection = tile_selection(plan.strategy);
  const bool filtered = !fused && selection != TileSelection::Radix;
  const int64_t query_block = std::min<int64_t>(Q, filtered ? 16384 : 65536);
  const int64_t score_tile_rows = std::min<int64_t>(
      max_tile_rows(), std::max<int64_t>(1024, (int64_t(64) << 20) / query_block));
  auto keys_a = at::zeros({Q, k}, queries.options().dtype(sizeof(key_t) == 4 ? at::kInt : at::kLong));
  auto keys_b = at::empty_like(keys_a);
  auto idx_a = at::full({Q, k}, -1, queries.options().dtype(at::kLong));
  auto idx_b = at::empty_like(idx_a);
  const bool* mask = args.mask ? args.mask->data_ptr<bool>() : nullptr;
  // The metric's per-row term of the whole database, once (tiles take slices).
  at::Tensor col_all = fused ? at::Tensor() : row_norm_term(database, metric, acc_dtype);
  if (col_all.defined()) col_all = col_all.contiguous();

  // Threshold filter state (see topk_select_cuda.cuh): per query a threshold and a counter, per query of a
  // block a candidate buffer of 4k slots (1024 to 8192; fewer where 12 bytes x cap x queries would pass
  // 512 MiB). Larger buffers let tiles grow faster (next_tile_rows).
  at::Tensor thr, count, cand_key, cand_idx;
  int64_t cap = 0;
  if (filtered) {
    cap = std::clamp<int64_t>(4 * k, 1024, 8192);
    cap = std::max<int64_t>(256, std::min<int64_t>(cap, (int64_t(512) << 20) / (query_block * int64_t(sizeof(key_t) + 8))));
    thr = at::zeros({Q}, keys_a.options());
    count = at::zeros({Q}, queries.options().dtype(at::kInt));
    cand_key = at::empty({query_block, cap}, keys_a.options());
    cand_idx = at::empty({query_block, cap}, idx_a.options());
  }
  auto filter_buffers = [&](int64_t q0) {
    return FilterBuffers{reinterpret_cast<key_t*>(thr.data_ptr()) + q0, count.data_ptr<int>() + q0, int(cap),
                         cand_key.data_ptr(), cand_idx.data_ptr<int64_t>()};
  };

  constexpr int kThreads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if constexpr (!std::is_same_v<scalar_t, double>) {  // the planner never sends float64 to the fused scan
    if (fused) {
      fused_scan<scalar_t>(args, keys_a, idx_a, keys_b, idx_b);  // from the empty top-k, as each tile below
      std::swap(keys_a, keys_b);
      std::swap(idx_a, idx_b);
    }
  }
  for (int64_t n0 = 0, nt = 0; n0 < N && !fused; n0 += nt) {
    // The first filtered tile sets the thresholds (with a full select over it), so it goes through a score tile.
    const bool mma_tile = selection == TileSelection::FusedMma && n0 > 0;
    nt = std::min(N - n0, next_tile_rows(selection, n0, k, cap, score_tile_rows));
    at::Tensor tile = database.narrow(0, n0, nt);
    at::Tensor tgemm = tile, col = col_all.defined() ? col_all.narrow(0, n0, nt) : at::Tensor(), zeros;
    if (metric == Metric::KL) {
      at::Tensor d = tile.to(acc_dtype);
      if (validate_kl) negatives = negatives + (d < 0).sum();
      at::Tensor zero = d == 0;
      tgemm = at::log(d).masked_fill_(zero, 0);
      zeros = zero.to(acc_dtype);
    }
    const acc_t* col_ptr = col.defined() ? col.data_ptr<acc_t>() : nullptr;
    for (int64_t q0 = 0; q0 < Q; q0 += query_block) {
      const int64_t qn = std::min(Q, q0 + query_block) - q0;
      TileArgs ta{static_cast<int>(metric), n0, nt, k, mask};
      const key_t* kin = reinterpret_cast<const key_t*>(keys_a.data_ptr()) + q0 * k;
      key_t* kout = reinterpret_cast<key_t*>(keys_b.data_ptr()) + q0 * k;
      const int64_t* iin = idx_a.data_ptr<int64_t>() + q0 * k;
      int64_t* iout = idx_b.data_ptr<int64_t>() + q0 * k;
      if (mma_tile) {
        if constexpr (sizeof(scalar_t) == 2) {
          const at::Tensor qa = queries.narrow(0, q0, qn);
          MmaTileArgs ma{qa.data_ptr(), tile.data_ptr(), qn, nt, database.size(1), n0, static_cast<int>(metric),
                         reinterpret_cast<const float*>(col_ptr), mask ? mask + n0 : nullptr, filter_buffers(q0)};
          const dim3 grid(unsigned((qn + kMmaRows - 1) / kMmaRows), unsigned((nt + kMmaRows - 1) / kMmaRows));
          mma_filter_kernel<scalar_t><<<grid, kMmaThreads, 0, stream>>>(ma);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          RecomputedKeys<scalar_t> keys{ta, qa.data_ptr<scalar_t>(), tile.data_ptr<scalar_t>(), database.size(1),
                                        reinterpret_cast<const float*>(col_ptr)};
          merge_filtered_kernel<key_t, kThreads><<<unsigned(qn), kThreads, 0, stream>>>(keys, filter_buffers(q0), kin, iin,
                                                                                        kout, iout);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        continue;
      }
      at::Tensor qa = qgemm.narrow(0, q0, qn);
      const bool use_tf32 = tf32 && qa.scalar_type() == at::kFloat && tgemm.scalar_type() == at::kFloat;
      at::Tensor scores = use_tf32 ? mm_tf32(qa, tgemm)
                                   : (qa.scalar_type() == acc_dtype ? at::mm(qa, tgemm.t()) : at::mm(qa, tgemm.t(), acc_dtype))
                                         .contiguous();
      at::Tensor zero_hits;
      if (metric == Metric::KL) zero_hits = at::mm(qpos.narrow(0, q0, qn), zeros.t()).contiguous();
      const acc_t* zero_ptr = zero_hits.defined() ? zero_hits.data_ptr<acc_t>() : nullptr;
      if (filtered) {
        ScoreTileKeys<acc_t> keys{ta, scores.data_ptr<acc_t>(), zero_ptr, col_ptr};
        constexpr int kItems = 8;
        const int64_t chunks = (nt + kThreads * kItems - 1) / (kThreads * kItems);
        filter_tile_kernel<acc_t, kThreads, kItems><<<dim3(unsigned(qn), unsigned(chunks)), kThreads, 0, stream>>>(
            keys, filter_buffers(q0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_filtered_kernel<key_t, kThreads><<<unsigned(qn), kThreads, 0, stream>>>(keys, filter_buffers(q0), kin, iin,
                                                                                      kout, iout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        continue;
      }
      // Few queries: split each query's tile over several blocks so the whole GPU works on it.
      int64_t segments = std::min({(4 * sms + qn - 1) / qn, std::max<int64_t>(1, (int64_t(64) << 10) / k),
                                   std::max<int64_t>(1, nt / std::max<int64_t>(k, 1024))});
      segments = std::max<int64_t>(segments, 1);
      if (segments == 1) {
        select_tile_kernel<acc_t, kThreads><<<qn, kThreads, 0, stream>>>(ta, scores.data_ptr<acc_t>(), zero_ptr, col_ptr,
                                                                         kin, iin, kout, iout);
      } else {
        const int64_t seg_len = (nt + segments - 1) / segments;
        segments = (nt + seg_len - 1) / seg_len;
        auto stage_key = at::empty({qn, segments, k}, keys_a.options());
        auto stage_idx = at::empty({qn, segments, k}, idx_a.options());
        select_segment_kernel<acc_t, kThreads><<<dim3(unsigned(qn), unsigned(segments)), kThreads, 0, stream>>>(
            ta, seg_len, scores.data_ptr<acc_t>(), zero_ptr, col_ptr, reinterpret_cast<key_t*>(stage_key.data_ptr()),
            stage_idx.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        merge_stage_kernel<key_t, kThreads><<<qn, kThreads, 0, stream>>>(
            k, segments, kin, iin, reinterpret_cast<const key_t*>(stage_key.data_ptr()), stage_idx.data_ptr<int64_t>(),
            kout, iout);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    std::swap(keys_a, keys_b);
    std::swap(idx_a, idx_b);
  }
  if (validate_kl) {
    TORCH_CHECK(negatives.item<int64_t>() == 0,
                "queries and database must be non-negative with metric 'kl', found a negative entry");
  }

  // Sort each query's k slots best first: as int64, unsigned 32-bit keys are already ordered, and 64-bit
  // keys are ordered once their top bit is flipped.
  at::Tensor sort_keys = sizeof(key_t) == 4 ? keys_a.to(at::kLong).bitwise_and(0xffffffffLL)
                                            : keys_a.bitwise_xor(std::numeric_limits<int64_t>::min());
  at::Tensor order = std::get<1>(at::sort(sort_keys, /*stable=*/true, /*dim=*/1, /*descending=*/true)).contiguous();
  auto values = at::empty({Q, k}, queries.options());
  auto indices = at::empty({Q, k}, queries.options().dtype(at::kLong));
  const int64_t total = Q * k;
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = (total + threads - 1) / threads;
    finalize_kernel<acc_t, scalar_t><<<blocks, threads, 0, stream>>>(
        static_cast<int>(metric), total, k, reinterpret_cast<const key_t*>(keys_a.data_ptr()),
        order.data_ptr<int64_t>(), idx_a.data_ptr<int64_t>(), qterm.data_ptr<acc_t>(), values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return finish_results(args, values, indices);
}

std::tuple<at::Tensor, at::Tensor> topk_search_cuda(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                                    c10::string_view metric, const std::optional<at::Tensor>& mask,
                                                    bool tf32, c10::string_view strategy) {
  // Kernels run below autograd (the op's autograd formula is registered in Python); the guard makes sure
  // the ATen calls below never record history, however the kernel is reached.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  SearchArgs args = validate_search_args(queries, database, k, std::string(metric), mask);
  c10::cuda::CUDAGuard guard(database.device());
  const Plan plan = plan_search(device_facts(database.device()), search_shape(args), parse_strategy(std::string(strategy)));
  if (args.queries.size(0) == 0 || database.size(0) == 0) return padded_results(args);
  if (plan.strategy == Strategy::Aten) return aten_search(args);
  TORCH_CHECK(plan.strategy != Strategy::FusedScan || fused_scan_fits(args),
              "strategy 'fused_scan' cannot run this search: its queries and candidate buffers need more than 96 KiB "
              "of shared memory at D = ", database.size(1), " and k = ", k);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, database.scalar_type(), "topk_search_cuda",
                                         [&] { return search_cuda<scalar_t>(args, plan, tf32); });
}

}  // namespace

TORCH_LIBRARY_IMPL(xmodal, CUDA, m) {
  m.impl("topk_search", &topk_search_cuda);
}

}  // namespace xmodal
