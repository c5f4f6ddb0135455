"""Benchmarks of xmodal's ops against the plain-PyTorch code they replace (and faiss), behind ``xmodal bench``
and the pytest-benchmark suites in ``benchmarks/``: one harness (:mod:`.harness`: timing, the machine,
results, reports), the search benchmark (:mod:`.search`), the bilinear one (:mod:`.bilinear`) and the
compressed-search one (:mod:`.compress`, with its data sets in :mod:`.compress_data` and its methods in
:mod:`.compress_methods`)."""
from . import bilinear, compress, compress_data, compress_methods, harness, search
from .bilinear import (BilinearCase, BilinearResult, activation_bytes, bilinear_grid, make_problem, peak_extra_bytes,
                       run_bilinear_case, step)
from .compress import CompressCase, CompressResult, compress_targets, run_compress_case
from .compress_data import clustered_data, model_data
from .harness import (Result, check_repeats, cuda_missing, environment, format_markdown, format_text, publish,
                      time_call, time_interleaved, write_ratio_chart)
from .search import (STRATEGIES, SearchCase, SearchResult, cpu_targets, cuda_targets, faiss_index, make_data,
                     naive_search, run_search_case, search_grid, variant_call)

__all__ = [
    "bilinear", "compress", "compress_data", "compress_methods", "harness", "search", "main",
    "BilinearCase", "BilinearResult", "activation_bytes", "bilinear_grid", "make_problem", "peak_extra_bytes",
    "run_bilinear_case", "step",
    "CompressCase", "CompressResult", "clustered_data", "compress_targets", "model_data", "run_compress_case",
    "Result", "check_repeats", "cuda_missing", "environment", "format_markdown", "format_text", "publish", "time_call",
    "time_interleaved", "write_ratio_chart",
    "STRATEGIES", "SearchCase", "SearchResult", "cpu_targets", "cuda_targets", "faiss_index", "make_data",
    "naive_search", "run_search_case", "search_grid", "variant_call",
]


def main(args) -> int:
    """``xmodal bench <op>``: runs the benchmark ``args.op`` names ("search", "bilinear" or "compress"); 2 when
    a CUDA device is asked for and none is visible."""
    if cuda_missing(args.device):
        return 2
    return {"search": search.main, "bilinear": bilinear.main, "compress": compress.main}[args.op](args)
