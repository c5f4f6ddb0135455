#include "common/settings.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace xmodal {
namespace {

std::atomic<int64_t> g_cuda_max_tile_rows{0};
std::atomic<int64_t> g_cpu_tile_gemm{0};
std::atomic<int64_t> g_cpu_tile_kib{0};
std::atomic<int64_t> g_cpu_cache_mb{1024};
// 2 MiB tiles: 1 MiB showed MKL's per-call packing, 4 MiB was no faster and put the backward's peak memory
// above F.bilinear's (benchmarks/results, the bilinear CPU reports)
std::atomic<int64_t> g_bilinear_tile_kib{2048};
std::atomic<int64_t> g_bilinear_max_rows{256};
std::atomic<int64_t> g_cpu_min_thread_us{1000};

struct Setting {
  std::atomic<int64_t>* value;
  int64_t min, max;
};

// every setting: its value and the range a new value must be in
const std::map<std::string, Setting>& table() {
  static const std::map<std::string, Setting> settings = {
      {"cuda_max_tile_rows", {&g_cuda_max_tile_rows, 0, INT64_MAX}},
      {"cpu_tile_gemm", {&g_cpu_tile_gemm, 0, 5}},
      {"cpu_tile_kib", {&g_cpu_tile_kib, 0, int64_t(1) << 22}},
      {"cpu_cache_mb", {&g_cpu_cache_mb, 0, int64_t(1) << 24}},
      {"bilinear_tile_kib", {&g_bilinear_tile_kib, 4, int64_t(1) << 22}},
      {"bilinear_max_rows", {&g_bilinear_max_rows, 1, int64_t(1) << 30}},
      {"cpu_min_thread_us", {&g_cpu_min_thread_us, 0, int64_t(1) << 30}},
  };
  return settings;
}

int64_t read(const std::atomic<int64_t>& v) { return v.load(std::memory_order_relaxed); }

}  // namespace

int64_t max_tile_rows() {
  const int64_t v = read(g_cuda_max_tile_rows);
  return v > 0 ? v : INT64_MAX;
}
int64_t cpu_tile_gemm_override() { return read(g_cpu_tile_gemm); }
int64_t cpu_tile_kib_override() { return read(g_cpu_tile_kib); }
int64_t cpu_cache_mb() { return read(g_cpu_cache_mb); }
int64_t bilinear_tile_kib() { return read(g_bilinear_tile_kib); }
int64_t bilinear_max_rows() { return read(g_bilinear_max_rows); }
int64_t cpu_min_thread_us() { return read(g_cpu_min_thread_us); }

std::map<std::string, int64_t> get_settings() {
  std::map<std::string, int64_t> values;
  for (const auto& [name, s] : table()) values[name] = read(*s.value);
  return values;
}

void set_setting(const std::string& name, int64_t value) {
  const auto it = table().find(name);
  TORCH_CHECK(it != table().end(), "unknown setting '", name, "'");
  TORCH_CHECK(value >= it->second.min && value <= it->second.max, name, " must be in [", it->second.min, ", ",
              it->second.max, "], got ", value);
  it->second.value->store(value);
}

}  // namespace xmodal
