// Dot products of one fp32 vector with rows picked by index: what a graph walk computes at every step (the
// neighbours of one node are scattered over the rows, so the contiguous scans of cpu_scan.h do not apply).
#pragma once
#include "search/cpu_scan.h"

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace xmodal {

// out[j] = q · x[rows[j] * ld .. + D) for j < n, accumulated in fp32; x: float or c10::BFloat16. Four rows at
// a time with AVX-512 or AVX2 (the instructions of `isa`; AVX512-BF16 and AMX use the AVX-512 path, as one
// fp32 query gains nothing from native bf16 products), else portable code.
template <typename T>
void gather_dots(ScanIsa isa, const float* q, const T* x, int64_t ld, const int32_t* rows, int64_t n, int64_t D,
                 float* out);

}  // namespace xmodal
