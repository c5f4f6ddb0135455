// graph_search's CPU kernel (its schema and contract: csrc/xmodal.cpp), for the extension module to bind
// beside the op: a one-query search called through pybind11 instead of the dispatcher takes ~2.7 us less per
// call (7.5 against 10.2 us for a whole walk at ef 1 over 2,000 rows), and GraphIndex searches one query at a
// time in tens of microseconds.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace xmodal {

std::tuple<at::Tensor, at::Tensor> graph_search_cpu(const at::Tensor& queries, const at::Tensor& vectors,
                                                    const at::Tensor& norms, const at::Tensor& graph, int64_t entry,
                                                    int64_t k, int64_t ef, c10::string_view metric,
                                                    const std::optional<at::Tensor>& mask,
                                                    const std::optional<at::Tensor>& ids);

}  // namespace xmodal
