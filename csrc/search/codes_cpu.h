// The row kernels of compressed search (codes_cpu.cpp), shared by the flat ops and the IVF list scan.
#pragma once
#include "search/cpu_scan.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace xmodal {

// out[i * n + j] = queries[i] · rows[j] for Q float queries [Q, D] and n int8 rows [n, D] (contiguous), the
// codes converted to fp32 in registers.
void int8_dots(ScanIsa isa, const float* queries, int64_t Q, int64_t D, const int8_t* rows, int64_t n, float* out);

// The optional terms of int8 keys, key = (dot + query_bias[q]) * row_scale[n] + row_bias[n], checked (float32,
// [Q] / [N] / [N], on the CPU) and held contiguous.
struct Int8Terms {
  Int8Terms(const std::optional<at::Tensor>& query_bias, const std::optional<at::Tensor>& row_scale,
            const std::optional<at::Tensor>& row_bias, int64_t Q, int64_t N);
  // keys [qn, nt] of rows n0 .. n0 + nt in place; `query_bias`: the qn queries' biases (nullptr: none)
  void apply(float* keys, int64_t qn, int64_t nt, const float* query_bias, int64_t n0) const;
  at::Tensor qb, rs, rb;
  const float *query_bias = nullptr, *row_scale = nullptr, *row_bias = nullptr;
};

// out[j] = minus the Hamming distance between the query's and row j's `words` 64-bit words (`vpopcnt`: the
// CPU has AVX-512 VPOPCNTDQ).
void hamming_keys(bool vpopcnt, const uint64_t* query, const uint64_t* rows, int64_t n, int64_t words, float* out);

}  // namespace xmodal
