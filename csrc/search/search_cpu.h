// CPU kernels of the search ops (schemas and contracts: csrc/xmodal.cpp) for C++ that composes them without
// the dispatcher, and the compositions the extension module binds for the indexes.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace xmodal {

std::tuple<at::Tensor, at::Tensor> topk_search_cpu(const at::Tensor& queries, const at::Tensor& database, int64_t k,
                                                   c10::string_view metric, const std::optional<at::Tensor>& mask,
                                                   bool tf32, c10::string_view strategy);

std::tuple<at::Tensor, at::Tensor> ivf_scan_cpu(const at::Tensor& queries, const at::Tensor& vectors,
                                               const at::Tensor& list_offsets, const at::Tensor& probes, int64_t k,
                                               const std::string& metric, const std::optional<at::Tensor>& mask,
                                               const std::optional<at::Tensor>& query_bias,
                                               const std::optional<at::Tensor>& row_scale,
                                               const std::optional<at::Tensor>& row_bias,
                                               const std::optional<at::Tensor>& row_group);

// One search of an IVF index (IVFIndex) on the CPU in one call: the nprobe nearest `centroids` (topk_search;
// "l2" for the l2 metrics, else "ip"), ivf_scan over the probed `list_ranges` ([nlist, 2] slots) and the
// `metric`'s values, as index/ivf.py and index/codecs.py compose them from Python: the same answers (square
// roots correctly rounded), without the per-call cost of a dozen small ops (about half of a one-query search
// at 1M rows). `rows`: float rows in the index's dtype, or int8 codes with their `groups` (uint8), `scale`
// and `bases` (a code decodes as bases[group] + scale * code; bases = centres + offset) and `row_terms`
// (1 / |row| for cosine, -|row|^2 for l2, absent for ip). queries: [Q, D], prepared as the index stores rows
// (unit rows for cosine); float32 against the centroids and codes, in the rows' dtype against rows. probes:
// the lists to scan ([Q, nprobe] list ids, -1 none) where the caller chose them (a memory-mapped index checks
// them before they are read), else found here. mask: one per slot. Returns values [Q, k] and slots [Q, k]
// (-1: none).
std::tuple<at::Tensor, at::Tensor> ivf_search_cpu(
    const at::Tensor& queries, const at::Tensor& centroids, int64_t nprobe, const std::optional<at::Tensor>& probes,
    const at::Tensor& list_ranges, const at::Tensor& rows, const std::optional<at::Tensor>& groups,
    const std::optional<at::Tensor>& row_terms, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bases, int64_t k, const std::string& metric,
    const std::optional<at::Tensor>& mask);

}  // namespace xmodal
