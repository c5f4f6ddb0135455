#include "common/settings.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace xmodal {
namespace {
std::atomic<int64_t> g_max_tile_rows{0};
std::atomic<int64_t> g_cpu_tile_gemm{0};
std::atomic<int64_t> g_cpu_tile_kib{0};
}  // namespace

int64_t max_tile_rows() {
  const int64_t v = g_max_tile_rows.load(std::memory_order_relaxed);
  return v > 0 ? v : INT64_MAX;
}

int64_t cpu_tile_kib_override() { return g_cpu_tile_kib.load(std::memory_order_relaxed); }

int64_t cpu_tile_gemm_override() { return g_cpu_tile_gemm.load(std::memory_order_relaxed); }

std::map<std::string, int64_t> get_settings() {
  return {{"cuda_max_tile_rows", g_max_tile_rows.load()}, {"cpu_tile_gemm", g_cpu_tile_gemm.load()},
          {"cpu_tile_kib", g_cpu_tile_kib.load()}};
}

void set_setting(const std::string& name, int64_t value) {
  if (name == "cuda_max_tile_rows") {
    TORCH_CHECK(value >= 0, "cuda_max_tile_rows must be >= 0 (0 = no cap), got ", value);
    g_max_tile_rows.store(value);
    return;
  }
  if (name == "cpu_tile_gemm") {
    TORCH_CHECK(value >= 0 && value <= 5, "cpu_tile_gemm must be 0 (auto) to 5, got ", value);
    g_cpu_tile_gemm.store(value);
    return;
  }
  if (name == "cpu_tile_kib") {
    TORCH_CHECK(value >= 0 && value <= (int64_t(1) << 22), "cpu_tile_kib must be 0 (auto) to 4194304, got ", value);
    g_cpu_tile_kib.store(value);
    return;
  }
  TORCH_CHECK(false, "unknown setting '", name, "'");
}

}  // namespace xmodal
