// The row kernels of compressed search (int8: codes_int8_kernels.cpp; binary: codes_hamming_cpu.cpp), shared
// by the flat ops (codes_int8_cpu.cpp, codes_hamming_cpu.cpp) and the IVF list scan.
#pragma once
#include "search/cpu_scan.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace xmodal {

// out[i * n + j] = queries[i] · rows[j] for Q float queries [Q, D] and n int8 rows [n, D] (contiguous), the
// codes converted to fp32 in registers.
void int8_dots(ScanIsa isa, const float* queries, int64_t Q, int64_t D, const int8_t* rows, int64_t n, float* out);

// Queries rounded to int16 for AVX2 CPUs, which have no dot product of bytes: each query's largest |value|
// maps to the largest integer that keeps a sum of D products with int8 codes inside int32 (32767 up to
// D = 512, 2^31 / (128 D) beyond), so keys differ from fp32 ones by ~2e-5 of the key range at D <= 512,
// more beyond (~2e-4 at D = 4096). ok is false when a query is not finite or cannot be scaled (the caller
// keeps the fp32 kernel for the whole call, so no two queries are scored differently).
struct Int16Queries {
  Int16Queries() = default;
  Int16Queries(const float* queries, int64_t Q, int64_t D);
  bool usable() const { return ok && !unit.empty(); }
  // these n queries (indices into this set), in that order
  Int16Queries rows(const int64_t* which, int64_t n) const;
  int64_t D = 0;
  std::vector<int16_t> values;  // [Q, D]
  std::vector<float> unit;      // each query's value of one int16 step
  bool ok = true;
};

// out[i * n + j] = query (q0 + i) · rows[j] for Q of the rounded queries, the codes widened to int16 in
// registers: one vpmaddwd per 16 products, where the fp32 route needs a convert and an FMA per 8.
void int8_dots_i16(const Int16Queries& queries, int64_t q0, int64_t Q, const int8_t* rows, int64_t n, float* out);

// The optional terms of int8 keys, key = (dot + bias) * row_scale[n] + row_bias[n], where bias is
// query_bias[q] ([Q]), or query_bias[q, row_group[n]] ([Q, G] with row_group uint8 [N], values < G: a bias per
// query and group of rows, e.g. the query's score against the centre a row's residual code is relative to).
// Checked (float32, on the CPU) and held contiguous.
struct Int8Terms {
  // `check_groups`: check every row_group value (off: the caller checks the rows it reads, as ivf_scan, whose
  // unused slots hold anything, does with check_group_range)
  Int8Terms(const std::optional<at::Tensor>& query_bias, const std::optional<at::Tensor>& row_scale,
            const std::optional<at::Tensor>& row_bias, const std::optional<at::Tensor>& row_group, int64_t Q,
            int64_t N, bool check_groups = true);
  // raise unless rows begin .. end have row_group values below G
  void check_group_range(int64_t begin, int64_t end) const;
  // query_bias values per query: 1, or G with row groups
  int64_t bias_width() const { return row_group ? groups : 1; }
  // keys [qn, nt] of rows n0 .. n0 + nt in place; `query_bias`: the qn queries' biases, bias_width() each
  // (nullptr: none)
  void apply(ScanIsa isa, float* keys, int64_t qn, int64_t nt, const float* query_bias, int64_t n0) const;
  at::Tensor qb, rs, rb, rg;
  const float *query_bias = nullptr, *row_scale = nullptr, *row_bias = nullptr;
  const uint8_t* row_group = nullptr;
  int64_t groups = 0;
};

// out[j] = minus the Hamming distance between the query's and row j's `words` 64-bit words (`vpopcnt`: the
// CPU has AVX-512 VPOPCNTDQ).
void hamming_keys(bool vpopcnt, const uint64_t* query, const uint64_t* rows, int64_t n, int64_t words, float* out);

}  // namespace xmodal
