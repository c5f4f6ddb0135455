#include "search/planner.h"

#include "common/settings.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>

#include <fstream>
#include <sstream>

#ifdef XMODAL_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace xmodal {

namespace {
constexpr const char* kStrategyNames[] = {"auto", "tiled", "aten", "filtered", "tensor_core", "fused_scan"};
constexpr const char* kCpuKindNames[] = {"amx", "avx512_bf16", "avx512", "avx2", "arm", "baseline"};

// Shape classes in which a committed GPU report shows a custom CUDA strategy correct and faster than naive
// PyTorch; "auto" on CUDA picks the first class that matches and runs "aten" (naive's own GEMM and
// selection, in bounded tiles) elsewhere. scripts/gpu_check.sh writes the verdict these rows come from.
// Empty: no GPU run has verified a custom kernel yet (benchmarks/results/*_topk_search_cuda_*.md).
struct VerifiedClass {
  Strategy strategy;
  int min_cc_major;
  int dtype_bits;  // 16 or 32 (fp32); 0 = any
  int64_t min_q, max_q, max_k;
};
constexpr std::array<VerifiedClass, 0> kVerifiedCuda{};

bool matches(const VerifiedClass& c, const DeviceFacts& dev, const SearchShape& s) {
  const int bits = int(c10::elementSize(s.dtype)) * 8;
  return dev.cc_major >= c.min_cc_major && (c.dtype_bits == 0 || c.dtype_bits == bits) && s.Q >= c.min_q &&
         s.Q <= c.max_q && s.k <= c.max_k;
}

bool is16(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Up to this many queries a one-pass scan beats a GEMM, whether it multiplies natively or converts 16-bit
// values first (benchmarks/results, the 2026-12-01 CPU search reports).
constexpr int64_t kScanMaxQueries = 16;

// Why a forced CUDA strategy cannot run these inputs ("" when it can).
std::string cuda_strategy_problem(Strategy st, const DeviceFacts& dev, const SearchShape& s) {
  std::ostringstream why;
  if (!dev.cuda) {
    why << "it runs on CUDA tensors only, got CPU tensors";
  } else if (st == Strategy::Filtered || st == Strategy::TensorCore) {
    if (s.k > kFilterMaxK) why << "it supports k <= " << kFilterMaxK << ", got k = " << s.k;
    else if (st == Strategy::TensorCore && !is16(s.dtype)) why << "it needs float16 or bfloat16 inputs, got " << s.dtype;
    else if (st == Strategy::TensorCore && dev.cc_major < 8) why << "it needs compute capability 8.0 or newer, got "
                                                                  << dev.cc_major << "." << dev.cc_minor;
    else if (st == Strategy::TensorCore && s.metric == Metric::KL) why << "it does not support metric 'kl'";
    else if (st == Strategy::TensorCore && (s.D % 8 != 0 || !s.aligned_rows))
      why << "it needs contiguous, 16-byte aligned rows with D a multiple of 8, got D = " << s.D;
  } else if (st == Strategy::FusedScan) {
    if (s.Q > kFusedScanMaxQueries) why << "it supports up to " << kFusedScanMaxQueries << " queries, got " << s.Q;
    else if (s.k > kFusedScanMaxK) why << "it supports k <= " << kFusedScanMaxK << ", got k = " << s.k;
    else if (s.metric == Metric::KL) why << "it does not support metric 'kl'";
    else if (s.dtype == at::kDouble) why << "it does not support float64";
    else if (s.D % 4 != 0 || !s.aligned_rows)
      why << "it needs a contiguous, 16-byte aligned database with D a multiple of 4, got D = " << s.D;
    else if (s.N >= (int64_t(1) << 31)) why << "it supports N < 2^31 rows, got " << s.N;
  }
  return why.str();
}

CpuKind detect_cpu_kind() {
#if defined(__aarch64__) || defined(__arm__)
  return CpuKind::Arm;
#else
  const std::string capability = at::get_cpu_capability();  // "AVX512", "AVX2" or "DEFAULT"
  if (capability == "AVX2") return CpuKind::Avx2;
  if (capability != "AVX512") return CpuKind::Baseline;
  // ATen uses AVX-512 here; does the CPU also have native bf16 dot products?
  bool amx = false, bf16 = false;
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream flags(line);
    for (std::string f; flags >> f;) {
      amx |= f == "amx_bf16";
      bf16 |= f == "avx512_bf16";
    }
    break;
  }
  return amx ? CpuKind::Amx : (bf16 ? CpuKind::Avx512Bf16 : CpuKind::Avx512);
#endif
}

}  // namespace

Gemm16Fn find_gemm16(at::ScalarType t) {
  static void* handle = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
  if (!handle) return nullptr;
  static auto bf16 = reinterpret_cast<Gemm16Fn>(dlsym(handle, "cblas_gemm_bf16bf16f32"));
  static auto f16 = reinterpret_cast<Gemm16Fn>(dlsym(handle, "cblas_gemm_f16f16f32"));
  return t == at::kBFloat16 ? bf16 : (t == at::kHalf ? f16 : nullptr);
}

Strategy parse_strategy(const std::string& name) {
  for (int i = 0; i < int(std::size(kStrategyNames)); ++i)
    if (name == kStrategyNames[i]) return Strategy(i);
  TORCH_CHECK(false, "strategy must be one of 'auto', 'tiled', 'aten', 'filtered', 'tensor_core', 'fused_scan', got '",
              name, "'");
}

const char* strategy_name(Strategy s) { return kStrategyNames[int(s)]; }
const char* cpu_kind_name(CpuKind k) { return kCpuKindNames[int(k)]; }

CpuKind parse_cpu_kind(const std::string& name) {
  for (int i = 0; i < int(std::size(kCpuKindNames)); ++i)
    if (name == kCpuKindNames[i]) return CpuKind(i);
  TORCH_CHECK(false, "cpu kind must be one of 'amx', 'avx512_bf16', 'avx512', 'avx2', 'arm', 'baseline', got '", name, "'");
}

DeviceFacts device_facts(const at::Device& device) {
  static const CpuKind cpu = detect_cpu_kind();
  static const bool mkl16 = find_gemm16(at::kBFloat16) && find_gemm16(at::kHalf);
  DeviceFacts f;
  f.cpu = cpu;
  f.mkl_gemm16 = mkl16;
  f.tile_gemm_override = int(cpu_tile_gemm_override());
  f.tile_kib_override = cpu_tile_kib_override();
  if (device.is_cuda()) {
    f.cuda = true;
#ifdef XMODAL_WITH_CUDA
    const auto* prop = at::cuda::getDeviceProperties(device.index() < 0 ? at::cuda::current_device() : device.index());
    f.cc_major = prop->major;
    f.cc_minor = prop->minor;
#endif
  }
  return f;
}

SearchShape search_shape(const SearchArgs& a) {
  SearchShape s;
  s.dtype = a.database.scalar_type();
  s.metric = a.metric;
  s.Q = a.queries.size(0);
  s.N = a.database.size(0);
  s.D = a.database.size(1);
  s.k = a.k;
  auto aligned = [](const at::Tensor& t) {
    return t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  s.aligned_rows = aligned(a.database) && aligned(a.queries);
  return s;
}

std::string Plan::describe() const {
  std::ostringstream out;
  out << strategy_name(strategy);
  if (strategy == Strategy::Tiled && tile_bytes > 0) {
    out << " (";
    switch (gemm) {
      case TileGemm::Blas: out << "BLAS GEMM"; break;
      case TileGemm::Mkl16: out << "MKL's 16-bit GEMM with fp32 output"; break;
      case TileGemm::Widen: out << "16-bit tiles widened to fp32 in cache, BLAS GEMM"; break;
      case TileGemm::Aten16: out << "ATen's 16-bit GEMM (native bf16 dot products)"; break;
      case TileGemm::Scan:
        out << "one-pass scan, "
            << (scan_isa == ScanIsa::Amx          ? "AMX"
                : scan_isa == ScanIsa::Avx512Bf16 ? "AVX512-BF16"
                : scan_isa == ScanIsa::Avx512   ? "AVX-512"
                : scan_isa == ScanIsa::Avx2     ? "AVX2"
                                                : "portable");
        break;
    }
    out << ", " << (tile_bytes >> 10) << " KiB tiles, query blocks of " << query_block << ")";
  }
  return out.str();
}

Plan plan_search(const DeviceFacts& dev, const SearchShape& s, Strategy requested) {
  Plan plan;
  if (requested == Strategy::Filtered || requested == Strategy::TensorCore || requested == Strategy::FusedScan) {
    const std::string problem = cuda_strategy_problem(requested, dev, s);
    TORCH_CHECK(problem.empty(), "strategy '", strategy_name(requested), "' cannot run this search: ", problem);
    plan.strategy = requested;
    return plan;
  }
  if (dev.cuda) {
    plan.strategy = requested == Strategy::Auto ? Strategy::Aten : requested;
    if (requested == Strategy::Auto)
      for (const auto& c : kVerifiedCuda)
        if (matches(c, dev, s) && cuda_strategy_problem(c.strategy, dev, s).empty()) {
          plan.strategy = c.strategy;
          break;
        }
    return plan;
  }
  plan.strategy = requested == Strategy::Auto ? Strategy::Tiled : requested;
  if (plan.strategy != Strategy::Tiled) return plan;
  // CPU tiles. A database tile of 512 KiB stays in L2 while every query block meets it; a few queries (a
  // memory-bound scan) take 16 MiB tiles, which amortise the per-call overhead. Query blocks of 256 keep
  // the BLAS from re-packing a tile too often.
  plan.query_block = 256;
  plan.tile_bytes = s.Q <= 8 ? (int64_t(16) << 20) : (int64_t(512) << 10);
  plan.scan_isa = scan_isa_for(dev.cpu);
  const bool half = is16(s.dtype) && s.metric != Metric::KL;  // kl multiplies log(d) in fp32/fp64
  const bool scannable = s.dtype != at::kDouble && s.metric != Metric::KL;
  // AMX multiplies bf16 tiles fast enough that MKL's GEMM overtakes the scan from 16 queries on (measured on
  // a Sapphire Rapids kind: 17 vs 23 ms at D = 512, 3.3 vs 6.0 ms at D = 128, N = 200,000); fp16 has no AMX
  // path in MKL there, and other kinds keep the scan
  // ... except where the AMX scan runs: bf16 rows, D a multiple of 32, from 4 queries on. Its tile unit's
  // rate does not depend on Q, so it reads at memory speed up to 16 queries; fewer queries scan faster with
  // AVX512-BF16 (interleaved timings, N = 200,000, ms AMX / AVX512-BF16 or MKL: Q = 1 7.6 / 6.7 at D = 512,
  // Q = 4 7.5 / 9.1 at D = 512 and 2.0 / 2.0 at D = 128, Q = 16 9.3 / 16.2 and 2.3 / 3.7)
  const bool amx_scan = dev.cpu == CpuKind::Amx && s.dtype == at::kBFloat16 && s.D % 32 == 0 && s.Q >= 4;
  const bool amx_gemm = dev.cpu == CpuKind::Amx && dev.mkl_gemm16 && s.dtype == at::kBFloat16 && s.Q >= 16 &&
                        !(amx_scan && s.Q <= kScanMaxQueries);
  // With only AVX2, BLAS's fp32 GEMM overtakes the scan from 9 queries on wide rows (emulated on a Sapphire
  // Rapids kind, N = 200,000, D = 512: Q = 12 1.03x vs 0.98x naive, Q = 16 1.04x vs 0.95x); at D = 128 the
  // two are level there and the scan wins below
  const bool avx2_gemm = dev.cpu == CpuKind::Avx2 && s.dtype == at::kFloat && s.Q > 8 && s.D >= 256;
  if (scannable && s.Q <= kScanMaxQueries && !amx_gemm && !avx2_gemm) {
    plan.gemm = TileGemm::Scan;
  } else if (half) {
    // Native 16-bit dot products: MKL's GEMM with AMX (Intel); oneDNN's through ATen elsewhere (MKL takes
    // a slow path on non-Intel CPUs). Without them, widening the tile in cache and an fp32 GEMM wins.
    if (dev.cpu == CpuKind::Amx && dev.mkl_gemm16) plan.gemm = TileGemm::Mkl16;
    else if (dev.cpu == CpuKind::Avx512Bf16 && s.dtype == at::kBFloat16) plan.gemm = TileGemm::Aten16;
    else plan.gemm = TileGemm::Widen;
  }
  if (dev.tile_gemm_override > 0) {
    const TileGemm forced = TileGemm(dev.tile_gemm_override - 1);
    const bool runs = forced == TileGemm::Blas ? !half
                      : forced == TileGemm::Scan ? scannable
                      : forced == TileGemm::Mkl16 ? half && dev.mkl_gemm16
                                                   : half;
    if (runs) plan.gemm = forced;
  }
  // the scan multiplies bf16 natively only when the rows are bf16
  if (plan.scan_isa == ScanIsa::Avx512Bf16 && s.dtype != at::kBFloat16) plan.scan_isa = ScanIsa::Avx512;
  if (plan.gemm == TileGemm::Scan && amx_scan) plan.scan_isa = ScanIsa::Amx;
  // a scan of more than 8 queries keeps its scores (queries x tile rows) nearer L2
  if (plan.gemm == TileGemm::Scan && s.Q > 8) plan.tile_bytes = int64_t(2) << 20;
  // a widened tile is twice its 16-bit size and must stay in L2 next to the scores
  if (plan.gemm == TileGemm::Widen) plan.tile_bytes = int64_t(256) << 10;
  // oneDNN's calls cost more than BLAS's: many queries meet tiles of 2048 rows (the best of 512 KiB to
  // 16 MiB at D = 128 and 512, Q = 256 and 1024), few queries 8 MiB tiles
  if (plan.gemm == TileGemm::Aten16) plan.tile_bytes = s.Q >= 64 ? 2048 * std::max<int64_t>(s.D, 1) * 2 : int64_t(8) << 20;
  if (dev.tile_kib_override > 0) plan.tile_bytes = dev.tile_kib_override << 10;
  return plan;
}

ScanIsa scan_isa_for(CpuKind cpu) {
  switch (cpu) {
    case CpuKind::Avx2: return ScanIsa::Avx2;
    case CpuKind::Amx:
    case CpuKind::Avx512Bf16: return ScanIsa::Avx512Bf16;
    case CpuKind::Avx512: return ScanIsa::Avx512;
    default: return ScanIsa::Portable;
  }
}

ScanIsa cpu_scan_isa() {
  static const ScanIsa isa = scan_isa_for(device_facts(at::Device(at::kCPU)).cpu);
  return isa;
}

CodesPlan plan_codes_search(const DeviceFacts& dev, int64_t Q, int64_t D, int64_t bytes_per_row, bool binary) {
  CodesPlan plan;
  const ScanIsa isa = scan_isa_for(dev.cpu);
  plan.isa = isa == ScanIsa::Avx512Bf16 ? ScanIsa::Avx512 : isa;  // decoded tiles are fp32
#if defined(__x86_64__) || defined(_M_X64)
  plan.vpopcnt = binary && plan.isa == ScanIsa::Avx512 && __builtin_cpu_supports("avx512vpopcntdq");
  // VNNI (or AMX) makes oneDNN's int8 GEMM exact and ~4x an fp32 GEMM; an AVX2 kind (or its emulation)
  // never takes it (codes_int8_cpu.cpp probes exactness too)
  plan.int8_gemm = dev.cpu != CpuKind::Avx2 && dev.cpu != CpuKind::Baseline &&
                   (__builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") || dev.cpu == CpuKind::Amx);
#endif
  // int8: up to kScanMaxQueries queries scan the codes, converting them in registers (memory-bound: the
  // codes are read once, a quarter of the float rows' bytes); more multiply tiles with a GEMM: int8 tiles
  // of 256 KiB, or decoded fp32 tiles, in L2 next to the scores.
  plan.gemm = !binary && Q > kScanMaxQueries;
  plan.query_block = binary ? std::max<int64_t>(Q, 1) : (plan.gemm ? 256 : kScanMaxQueries);
  // a decoded fp32 tile meets BLAS like the float search's tiles (512 KiB)
  const int64_t tile_bytes = binary ? (int64_t(1) << 20)
                             : (plan.gemm && !plan.int8_gemm) ? (int64_t(512) << 10) : (int64_t(256) << 10);
  const int64_t row_bytes = binary || (plan.gemm && plan.int8_gemm) || !plan.gemm
                                ? std::max<int64_t>(bytes_per_row, 1) : std::max<int64_t>(D, 1) * 4;
  plan.tile_rows = std::clamp<int64_t>(tile_bytes / row_bytes / 16 * 16, 64, 65536);
  return plan;
}

}  // namespace xmodal
