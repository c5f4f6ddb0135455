// Dot products of a few queries with a block of database rows, in one pass over the rows: the CPU tiled
// search's "GEMM" when a handful of queries make the search a memory-bound scan. BLAS's GEMV streams fp32
// rows well below the memory bandwidth at small D, and no BLAS here multiplies 16-bit rows fast on CPUs
// without native 16-bit dot products; this converts each 16-bit row in registers and accumulates in fp32.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace xmodal {

// Which instructions the scan uses (chosen by the planner from the CPU's kind). Amx: bf16 rows multiplied by
// the AMX tile unit (D a multiple of 32, at most 16 queries), the rest as Avx512Bf16.
enum class ScanIsa { Amx, Avx512Bf16, Avx512, Avx2, Portable };

// out[i * rows + j] = queries[i, :] · rows[j, :] for i < Q, j < rows.size(0), in fp32. queries: fp32 [Q, D]
// contiguous (with Amx / Avx512Bf16 and bf16 rows, values that bf16 represents exactly: the caller's bf16 queries);
// rows: fp32, bf16 or fp16, unit stride within a row. `norms` given: also norms[j] = rows[j, :] · rows[j, :],
// in the same pass over the rows (l2 and cosine need them; a separate pass would read the rows twice).
void scan_dots(ScanIsa isa, const float* queries, int64_t Q, const at::Tensor& rows, float* out,
               float* norms = nullptr);

// out[j] = rows[j, :] · rows[j, :] in fp32, for fp32 or 16-bit rows (unit stride within a row). ATen's norm
// of a 16-bit tile in fp32 first copies the tile to fp32 (fresh pages for every tile).
void squared_norms(ScanIsa isa, const at::Tensor& rows, float* out);

}  // namespace xmodal
