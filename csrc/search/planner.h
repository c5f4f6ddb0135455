// How a top-k search runs: one pure function, plan_search, decides from the device, the inputs' shape and
// dtype, the metric and k. Every kernel asks it; nothing else picks a path.
//
// Strategies (the `strategy` argument of topk_search; "auto" asks the planner):
//   tiled        score tiles with a GEMM and select from each tile while it is in cache (CPU), or with
//                cuBLAS score tiles and a radix select per tile (CUDA)
//   aten         bounded-memory tiles of torch.mm + torch.topk: the GEMM and selection naive PyTorch uses,
//                without ever holding more than a fixed budget of scores (any device)
//   filtered     CUDA: cuBLAS score tiles, threshold-filtered selection (only scores above each query's
//                current k-th best reach a small candidate buffer)
//   tensor_core  CUDA, float16/bfloat16, sm_80+: the filtered selection applied in the epilogue of a
//                tensor-core (mma.sync) tile kernel, so scores never reach memory
//   fused_scan   CUDA, up to 16 queries: one pass over the database, scores kept in shared memory
#pragma once
#include "search/cpu_scan.h"
#include "search/topk_common.h"

#include <cstdint>
#include <string>

namespace xmodal {

enum class Strategy { Auto, Tiled, Aten, Filtered, TensorCore, FusedScan };
Strategy parse_strategy(const std::string& name);
const char* strategy_name(Strategy s);

// What the CPU offers for 16-bit dot products. AMX and AVX512-BF16 multiply bf16 natively (MKL's bf16
// GEMM is fast there); plain AVX-512 and AVX2 CPUs do not (MKL emulates it, slowly).
enum class CpuKind { Amx, Avx512Bf16, Avx512, Avx2, Arm, Baseline };
const char* cpu_kind_name(CpuKind k);
CpuKind parse_cpu_kind(const std::string& name);

struct DeviceFacts {
  bool cuda = false;
  int cc_major = 0, cc_minor = 0;  // CUDA compute capability
  CpuKind cpu = CpuKind::Avx2;
  bool mkl_gemm16 = false;  // MKL's bf16/fp16 GEMMs with fp32 output are linked in (find_gemm16)
  int64_t tile_kib_override = 0;  // the cpu_tile_kib setting: 0 = decide
  int tile_gemm_override = 0;  // the cpu_tile_gemm setting (common/settings.h): 0 = decide, else TileGemm + 1
};

// The scan's instructions for a CPU kind (ScanIsa::Avx512Bf16 where the CPU multiplies bf16 natively).
ScanIsa scan_isa_for(CpuKind cpu);

// scan_isa_for this process's CPU, decided once: the instructions of kernels the planner does not plan (the
// graph walk, candidate_dots).
ScanIsa cpu_scan_isa();

// This process's facts for a device (the CPU's kind honours ATEN_CPU_CAPABILITY, as ATen's own kernels do).
DeviceFacts device_facts(const at::Device& device);

struct SearchShape {
  at::ScalarType dtype = at::kFloat;
  Metric metric = Metric::IP;
  int64_t Q = 0, N = 0, D = 0, k = 1;
  bool aligned_rows = true;  // database (and queries) contiguous and 16-byte aligned: the CUDA kernels' loads
};

SearchShape search_shape(const SearchArgs& args);

// How the CPU tiled path scores a tile (queries x tile rows):
//   Blas    fp32/fp64 GEMM (GEMV for one query) through ATen's BLAS
//   Mkl16   MKL's bf16/fp16 GEMM with fp32 output (fast with AMX)
//   Widen   16-bit tile widened to fp32 in cache, then the fp32 GEMM (CPUs without native 16-bit dot products)
//   Aten16  ATen's 16-bit GEMM (oneDNN: native bf16 dot products), 16-bit scores as naive PyTorch has them
//   Scan    a handful of queries: scan_dots (cpu_scan.h), one pass over the rows at memory speed
enum class TileGemm { Blas, Mkl16, Widen, Aten16, Scan };

// MKL's 16-bit GEMMs with fp32 output (cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, linked into
// libtorch_cpu), looked up at run time: nullptr for other dtypes or where a torch build lacks them.
using Gemm16Fn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const void* a,
                          int lda, const void* b, int ldb, float beta, float* c, int ldc);
Gemm16Fn find_gemm16(at::ScalarType t);

struct Plan {
  Strategy strategy = Strategy::Tiled;
  TileGemm gemm = TileGemm::Blas;
  ScanIsa scan_isa = ScanIsa::Portable;  // TileGemm::Scan: which instructions
  int64_t tile_bytes = 0;   // CPU tiled: bytes of database rows per tile
  int64_t query_block = 0;  // CPU tiled: queries per GEMM
  std::string describe() const;
};

// The limits of the CUDA kernels (the kernels include this header, so there is one definition of each).
constexpr int64_t kFusedScanMaxQueries = 16;
constexpr int64_t kFusedScanMaxK = 192;
constexpr int64_t kFilterMaxK = 2048;

// Decides how to run a search. `requested` other than Auto forces that strategy, after checking that it
// can run these inputs (a clear error otherwise).
Plan plan_search(const DeviceFacts& device, const SearchShape& shape, Strategy requested);

// The aten strategy (topk_aten.cpp): runs on every device.
std::tuple<at::Tensor, at::Tensor> aten_search(const SearchArgs& args);

// How a top-k search over compressed rows (int8 codes, binary codes) runs on the CPU: tiles of rows are
// decoded (int8) or compared (binary) while in cache, as the tiled float search does.
struct CodesPlan {
  ScanIsa isa = ScanIsa::Portable;  // int8: which instructions decode and scan a tile
  bool vpopcnt = false;             // binary: AVX-512 VPOPCNTDQ counts 8 words at once
  bool gemm = false;                // int8: many queries multiply a tile with a GEMM (else: scan)
  bool int8_gemm = false;           // ... an int8 GEMM (VNNI / AMX) rather than a decoded fp32 tile's
  int64_t tile_rows = 0;            // rows per tile
  int64_t query_block = 0;          // queries per GEMM / scan call
};
// `bytes_per_row`: the stored row's size (int8: D; binary: D / 8 rounded up to 8 bytes).
CodesPlan plan_codes_search(const DeviceFacts& dev, int64_t Q, int64_t D, int64_t bytes_per_row, bool binary);

}  // namespace xmodal
