// Tuning settings: process-wide values with documented defaults, set from Python through
// xmodal.settings (python/xmodal/settings.py documents each) and read where they are used. Nothing here is
// read from the environment.
#pragma once
#include <cstdint>
#include <map>
#include <string>

namespace xmodal {

// CUDA search: the most database rows per tile (0 = no cap). Tests use a small cap so small problems span
// many tiles; users have no reason to set it.
int64_t max_tile_rows();

// CPU search: how tiles are scored: 0 = as the planner decides for this CPU, else 1 + a TileGemm
// (search/planner.h: 1 blas, 2 mkl16, 3 widen, 4 aten16, 5 scan) where it can run. For CPUs the planner
// misjudges, and for benchmarks that compare them.
int64_t cpu_tile_gemm_override();

// CPU search: KiB of database rows per tile (0 = as the planner decides).
int64_t cpu_tile_kib_override();

// CPU block cache (common/cpu_block_cache.h): the most MiB of free blocks it keeps (0 turns it off).
int64_t cpu_cache_mb();

// CPU bilinear pooling: KiB of one outer-product tile, and the most batch rows in one tile.
int64_t bilinear_tile_kib();
int64_t bilinear_max_rows();

// CPU searches: microseconds of estimated one-thread work per thread (0: always every thread; parallel.h,
// threads_for_ns). Tests set 0 so that small problems run on several threads.
int64_t cpu_min_thread_us();

// Every setting's current value, by name; and a setter that checks the name and the value's range.
std::map<std::string, int64_t> get_settings();
void set_setting(const std::string& name, int64_t value);

}  // namespace xmodal
