// THE one place for op schemas. Each backend registers its kernels beside them with TORCH_LIBRARY_IMPL
// (csrc/search/, csrc/bilinear/: *_cpu.cpp, *_cuda.cu); fake tensors and autograd are registered in Python
// (python/xmodal/_registrations.py), except topk_search's autograd (csrc/search/topk_backward.cpp: a Python
// formula costs ~5 us per call).
#include "common/cpu_block_cache.h"
#include "common/parallel.h"
#include "common/settings.h"
#include "graph/graph_search.h"
#include "search/planner.h"
#include "search/search_cpu.h"
#include "search/topk_common.h"

#include <torch/extension.h>
#include <torch/library.h>

#include <optional>

TORCH_LIBRARY(xmodal, m) {
  // Batched top-k similarity search; see xmodal.topk_search for the semantics. tf32: let float32 GEMMs on
  // the GPU use TF32 tensor cores (faster, ~1e-3 relative error in scores); ignored elsewhere. strategy:
  // "auto" (search/planner.h decides) or a strategy to force.
  m.def("topk_search(Tensor queries, Tensor database, int k, str metric=\"cosine\", Tensor? mask=None, *,"
        " bool tf32=False, str strategy=\"auto\") -> (Tensor values, Tensor indices)");
  // Gradients of topk_search's values for queries and database (empty where output_mask is False); the
  // indices are constants, so this gathers the selected rows and scatters their gradients back.
  m.def("topk_search_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor queries, Tensor database,"
        " str metric, bool[2] output_mask) -> (Tensor grad_queries, Tensor grad_database)");
  // Exact top-k over the inverted lists each query probes (IVF search). Rows of `vectors` are grouped by list:
  // list_offsets [nlist + 1] puts list l at rows [list_offsets[l], list_offsets[l + 1]) (lists back to back),
  // list_offsets [nlist, 2] at rows [list_offsets[l][0], list_offsets[l][1]) (gaps allowed). probes
  // [Q, nprobe] list ids (-1: none). Returns values and row positions in `vectors`. Float rows: metric ip,
  // l2 or sqeuclidean. Compressed rows rank as the flat ops do: int8 codes with float32 queries and metric
  // "ip" give topk_int8's keys (query_bias, row_scale, row_bias, row_group as there); packed bits (uint8)
  // with uint8 queries and metric "hamming" give Hamming distances (int32, smallest first). A C++ kernel on
  // the CPU, a plain-PyTorch one on every other device (_fallback_kernels.py).
  m.def("ivf_scan(Tensor queries, Tensor vectors, Tensor list_offsets, Tensor probes, int k, str metric=\"ip\","
        " Tensor? mask=None, *, Tensor? query_bias=None, Tensor? row_scale=None, Tensor? row_bias=None,"
        " Tensor? row_group=None)"
        " -> (Tensor values, Tensor indices)");
  // Top-k over int8 codes (scalar quantisation): key[q, n] = (queries[q] · codes[n] + query_bias[q]) *
  // row_scale[n] + row_bias[n] (absent terms: 0 / 1 / 0), k largest keys first (float32, padded with -inf
  // and index -1; ties to the smaller index). With row_group (uint8 [N], values < G), query_bias is [Q, G]
  // and row n adds query_bias[q, row_group[n]] (codes that are residuals from G centres). queries float32
  // [Q, D] (the codec's scale folded in), codes int8 [N, D]. With candidates (int64 [Q, W], row indices or
  // -1) each query ranks only its own candidate rows (a repeat once): the rescoring of binary codes. The index
  // turns keys into metric values (index/codecs.py).
  m.def("topk_int8(Tensor queries, Tensor codes, int k, Tensor? query_bias=None, Tensor? row_scale=None,"
        " Tensor? row_bias=None, Tensor? mask=None, *, Tensor? row_group=None, Tensor? candidates=None)"
        " -> (Tensor keys, Tensor indices)");
  // Top-k by Hamming distance over packed bits: queries uint8 [Q, B], codes uint8 [N, B] (B a multiple of 8),
  // the k smallest distances first (int32, padded with INT32_MAX and index -1; ties to the smaller index).
  m.def("topk_hamming(Tensor queries, Tensor codes, int k, Tensor? mask=None) -> (Tensor distances, Tensor indices)");
  // candidate_dots: out[i, j] = queries[i] · rows[candidates[i, j]] in float32, each query against its own
  // candidate rows (the exact rescoring of a shortlist; -1 candidates give -inf). queries float32 [Q, D], rows
  // float32 or bfloat16 [N, D] with unit stride in a row, candidates int64 [Q, W]. CPU only.
  m.def("candidate_dots(Tensor queries, Tensor rows, Tensor candidates) -> Tensor");
  // Proximity graph (csrc/graph/, CPU only; xmodal.GraphIndex holds the tensors). vectors float32/bfloat16
  // [N, D], norms their squared norms float32 [N], graph int32 [N, R]: row p's out-neighbours, -1 after the last.
  // graph_search: the k best rows for each float32 query by a best-first walk from `entry` keeping the ef best
  // (ef >= k); metric "ip" (largest dot first), "cosine" (unit rows; values divided by the query's norm) or
  // "l2" (smallest squared distance first); rows outside `mask` are walked through but never answered.
  // Values and row indices, padded with -inf/+inf and -1; queries must be finite.
  // ids (int64, at least N): answer ids[row] instead of row (an index's one-query searches map nothing after).
  m.def("graph_search(Tensor queries, Tensor vectors, Tensor norms, Tensor graph, int entry, int k, int ef,"
        " str metric=\"ip\", Tensor? mask=None, Tensor? ids=None) -> (Tensor values, Tensor indices)");
  // Links rows [start, N) into the graph (rows before start are linked already; `entry`, where walks start,
  // is skipped), in parallel; build_ef: the walk's breadth; alpha >= 1: how many longer edges pruning keeps.
  m.def("graph_insert(Tensor vectors, Tensor norms, Tensor(a!) graph, int start, int entry, int build_ef,"
        " float alpha) -> ()");
  // Cross-modal links: neighbours int64 [S, K] holds, for each of S sample queries, the rows nearest it (best
  // first, -1 padded); the first of each and the others gain edges to one another where lists have room.
  m.def("graph_project(Tensor vectors, Tensor norms, Tensor(a!) graph, Tensor neighbours, int hubs, float alpha) -> ()");
  // The graph of the rows where keep (bool [N]) is True, renumbered in order, repaired around the others.
  m.def("graph_repair(Tensor vectors, Tensor norms, Tensor graph, Tensor keep, float alpha) -> Tensor");
  // Bilinear pooling, torch.nn.functional.bilinear semantics; see xmodal.bilinear.
  m.def("bilinear(Tensor input1, Tensor input2, Tensor weight, Tensor? bias=None) -> Tensor");
  // Gradients for input1, input2, weight (empty where output_mask is False); the bias gradient is grad's sum.
  m.def("bilinear_backward(Tensor grad, Tensor input1, Tensor input2, Tensor weight, bool[3] output_mask)"
        " -> (Tensor grad_input1, Tensor grad_input2, Tensor grad_weight)");
  // The fused pass of factorized (MFB) pooling after the projections; see xmodal.factorized_bilinear.
  m.def("factorized_bilinear(Tensor proj_x, Tensor proj_y, Tensor? bias_x, Tensor? bias_y, int factor, bool normalize)"
        " -> Tensor");
  m.def("factorized_bilinear_backward(Tensor grad, Tensor proj_x, Tensor proj_y, Tensor? bias_x, Tensor? bias_y,"
        " int factor, bool normalize) -> (Tensor grad_proj_x, Tensor grad_proj_y)");
  // input [..., in] @ weight [out, in]^T (F.linear without bias), whose weight gradient comes from the CPU
  // block cache (common/cpu_block_cache.h) so a training step does not fault in fresh pages for it: the
  // projections of factorized pooling.
  m.def("cached_linear(Tensor input, Tensor weight) -> Tensor");
  // cached_linear's weight gradient: grad [..., out], input [..., in] -> [out, in], summed over the leading
  // dimensions; on the CPU its block comes from the block cache (common/cpu_block_cache.h).
  m.def("cached_linear_weight_grad(Tensor grad, Tensor input) -> Tensor");
  // factorized_bilinear(proj_a, cached_linear(b, weight_b), bias_a, bias_b, factor, normalize) whose backward
  // recomputes b's projection instead of keeping it: the graph keeps proj_a only (pooling is symmetric in its
  // sides).
  m.def("factorized_bilinear_recompute(Tensor proj_a, Tensor b, Tensor weight_b, Tensor? bias_a, Tensor? bias_b,"
        " int factor, bool normalize) -> Tensor");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef XMODAL_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(XMODAL_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
#endif
  d["torch_version"] = std::string(XMODAL_TORCH_VERSION);
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xmodal compiled ops (registered as torch.ops.xmodal.*)";
  m.def("build_info", &build_info, "How this extension was built: CUDA kernels, their architectures, torch version");
  m.def("empty_cpu_cache", &xmodal::release_cpu_cache, "Free the CPU block cache's blocks; returns the bytes freed");
  m.def("cpu_cache_bytes", &xmodal::cpu_cache_bytes, "Bytes held by the CPU block cache's free blocks");
  m.def("metrics", [] {
    pybind11::list out;
    for (const xmodal::MetricInfo& info : xmodal::kMetrics) out.append(pybind11::make_tuple(info.name, info.larger_is_better));
    return out;
  }, "The metric table: (name, larger_is_better) for every metric");
  // `with AtenOnThisThread():` holds ATen's and MKL's parallel work started by this thread to it alone while
  // xmodal's ops keep their threads (common/parallel.h); the indexes wrap their searches in it.
  struct HeldAten {
    std::optional<xmodal::AtenOnThisThread> guard;
  };
  pybind11::class_<HeldAten>(m, "AtenOnThisThread")
      .def(pybind11::init<>())
      .def("__enter__", [](HeldAten& held) {
        TORCH_CHECK(!held.guard, "AtenOnThisThread is already entered; use one per with-block");
        held.guard.emplace();
      })
      .def("__exit__", [](HeldAten& held, const pybind11::args&) { held.guard.reset(); });
  m.def("graph_search", &xmodal::graph_search_cpu, "torch.ops.xmodal.graph_search's CPU kernel without the dispatcher "
        "(graph/graph_search.h): GraphIndex's searches", pybind11::arg("queries"), pybind11::arg("vectors"),
        pybind11::arg("norms"), pybind11::arg("graph"), pybind11::arg("entry"), pybind11::arg("k"), pybind11::arg("ef"),
        pybind11::arg("metric"), pybind11::arg("mask"), pybind11::arg("ids"));
  m.def("ivf_search", &xmodal::ivf_search_cpu, "One IVF search on the CPU (search/search_cpu.h): IVFIndex's "
        "searches of float rows and int8 codes", pybind11::arg("queries"), pybind11::arg("centroids"),
        pybind11::arg("nprobe"), pybind11::arg("probes"), pybind11::arg("list_ranges"), pybind11::arg("rows"),
        pybind11::arg("groups"), pybind11::arg("row_terms"), pybind11::arg("scale"), pybind11::arg("bases"),
        pybind11::arg("k"), pybind11::arg("metric"), pybind11::arg("mask"));
  m.def("xmodal_threads", &xmodal::xmodal_threads, "The threads xmodal's parallel CPU work may use on this thread");
  m.def("get_settings", &xmodal::get_settings, "Every tuning setting's current value, by name");
  m.def("set_setting", &xmodal::set_setting, "Set one tuning setting (checked)");
  // The search planner: what strategy="auto" does for a search on `device` (this process's CPU / GPU facts).
  m.def("search_plan", [](const at::Tensor& queries, const at::Tensor& database, int64_t k, const std::string& metric,
                          const std::optional<at::Tensor>& mask, const std::string& strategy) {
    const xmodal::SearchArgs args = xmodal::validate_search_args(queries, database, k, metric, mask);
    return xmodal::plan_search(xmodal::device_facts(database.device()), xmodal::search_shape(args),
                               xmodal::parse_strategy(strategy)).describe();
  });
  // The planner as a pure function of explicit facts (for tests and for `xmodal info` on other machines).
  m.def("plan_for", [](bool cuda, int cc_major, const std::string& cpu_kind, bool mkl_gemm16, at::ScalarType dtype,
                       const std::string& metric, int64_t Q, int64_t N, int64_t D, int64_t k,
                       bool aligned_rows, const std::string& strategy) {
    xmodal::DeviceFacts dev;
    dev.cuda = cuda;
    dev.cc_major = cc_major;
    dev.cpu = xmodal::parse_cpu_kind(cpu_kind);
    dev.mkl_gemm16 = mkl_gemm16;
    xmodal::SearchShape s;
    s.dtype = dtype;
    s.metric = xmodal::parse_metric(metric);
    s.Q = Q, s.N = N, s.D = D, s.k = k, s.aligned_rows = aligned_rows;
    return xmodal::plan_search(dev, s, xmodal::parse_strategy(strategy)).describe();
  });
  m.def("device_facts", [](const std::string& device) {
    const xmodal::DeviceFacts f = xmodal::device_facts(at::Device(device));
    pybind11::dict d;
    d["cuda"] = f.cuda;
    d["compute_capability"] = std::to_string(f.cc_major) + "." + std::to_string(f.cc_minor);
    d["cpu_kind"] = std::string(xmodal::cpu_kind_name(f.cpu));
    d["mkl_gemm16"] = f.mkl_gemm16;
    return d;
  });
}
