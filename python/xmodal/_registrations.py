"""Fake-tensor (and, as ops gain backward passes, autograd) registrations for every xmodal op: one place.

Imported by ``xmodal/__init__.py`` right after the compiled extension defines the ops.
"""
import torch


@torch.library.register_fake("xmodal::topk_search")
def _topk_search_fake(queries, database, k, metric="cosine", mask=None, *, tf32=False, strategy="auto"):
    torch._check(queries.dim() in (1, 2), lambda: f"queries must be 1-D [D] or 2-D [Q, D], got shape {tuple(queries.shape)}")
    torch._check(database.dim() == 2, lambda: f"database must be 2-D [N, D], got shape {tuple(database.shape)}")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    shape = (k,) if queries.dim() == 1 else (queries.shape[0], k)
    values = queries.new_empty(shape)
    indices = queries.new_empty(shape, dtype=torch.int64)
    return values, indices


@torch.library.register_fake("xmodal::topk_search_backward")
def _topk_search_backward_fake(grad_values, values, indices, queries, database, metric, output_mask):
    grad_q = torch.empty_like(queries, memory_format=torch.contiguous_format) if output_mask[0] else queries.new_empty((0,))
    grad_x = torch.empty_like(database, memory_format=torch.contiguous_format) if output_mask[1] else database.new_empty((0,))
    return grad_q, grad_x


# topk_search's autograd formula is registered in C++ (csrc/search/topk_backward.cpp): a Python one cost ~5 us
# per call.


def _sum_leading(t):
    """Sum over every dimension but the last (the gradient of a bias broadcast over them)."""
    return t.flatten(0, -2).sum(0) if t.dim() > 1 else t


# --- bilinear ---------------------------------------------------------------------------------------------


@torch.library.register_fake("xmodal::bilinear")
def _bilinear_fake(input1, input2, weight, bias=None):
    torch._check(weight.dim() == 3, lambda: f"weight must be 3-D [out_features, in1_features, in2_features], got shape {tuple(weight.shape)}")
    return input1.new_empty((*input1.shape[:-1], weight.shape[0]))


@torch.library.register_fake("xmodal::bilinear_backward")
def _bilinear_backward_fake(grad, input1, input2, weight, output_mask):
    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty((0,))

    return grad_like(input1, output_mask[0]), grad_like(input2, output_mask[1]), grad_like(weight, output_mask[2])


def _bilinear_setup_context(ctx, inputs, output):
    input1, input2, weight, bias = inputs
    ctx.save_for_backward(input1, input2, weight)
    ctx.has_bias = bias is not None


def _bilinear_backward(ctx, grad):
    input1, input2, weight = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    g1 = g2 = gw = gb = None
    if any(mask):
        g1, g2, gw = torch.ops.xmodal.bilinear_backward(grad, input1, input2, weight, mask)
        g1, g2, gw = (g if needed else None for g, needed in zip((g1, g2, gw), mask))
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = _sum_leading(grad)
    return g1, g2, gw, gb


torch.library.register_autograd("xmodal::bilinear", _bilinear_backward, setup_context=_bilinear_setup_context)


# --- factorized (MFB) pooling -----------------------------------------------------------------------------


@torch.library.register_fake("xmodal::factorized_bilinear")
def _factorized_bilinear_fake(proj_x, proj_y, bias_x, bias_y, factor, normalize):
    torch._check(factor > 0, lambda: f"factor must be positive, got {factor}")
    lead = torch.broadcast_shapes(proj_x.shape[:-1], proj_y.shape[:-1])
    return proj_x.new_empty((*lead, proj_x.shape[-1] // factor))


@torch.library.register_fake("xmodal::factorized_bilinear_backward")
def _factorized_bilinear_backward_fake(grad, proj_x, proj_y, bias_x, bias_y, factor, normalize):
    return torch.empty_like(proj_x, memory_format=torch.contiguous_format), torch.empty_like(
        proj_y, memory_format=torch.contiguous_format
    )


def _factorized_setup_context(ctx, inputs, output):
    proj_x, proj_y, bias_x, bias_y, factor, normalize = inputs
    ctx.save_for_backward(proj_x, proj_y, bias_x, bias_y)
    ctx.factor, ctx.normalize = factor, normalize


def _factorized_backward(ctx, grad):
    proj_x, proj_y, bias_x, bias_y = ctx.saved_tensors
    gx, gy = torch.ops.xmodal.factorized_bilinear_backward(grad, proj_x, proj_y, bias_x, bias_y, ctx.factor, ctx.normalize)
    gbx = _sum_leading(gx) if bias_x is not None and ctx.needs_input_grad[2] else None
    gby = _sum_leading(gy) if bias_y is not None and ctx.needs_input_grad[3] else None
    return (gx if ctx.needs_input_grad[0] else None), (gy if ctx.needs_input_grad[1] else None), gbx, gby, None, None


torch.library.register_autograd("xmodal::factorized_bilinear", _factorized_backward, setup_context=_factorized_setup_context)


# --- projections (F.linear without bias) whose weight gradient comes from the CPU block cache ---------------


@torch.library.register_fake("xmodal::cached_linear")
def _cached_linear_fake(input, weight):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("xmodal::cached_linear_weight_grad")
def _cached_linear_weight_grad_fake(grad, input):
    return input.new_empty((grad.shape[-1], input.shape[-1]))


def _save_both(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _projection_grads(grad, input, weight, need_input, need_weight):
    """Gradients of ``input @ weight^T`` (for input, weight) given the gradient of its output."""
    g_input = torch.matmul(grad, weight) if need_input else None
    g_weight = torch.ops.xmodal.cached_linear_weight_grad(grad, input) if need_weight else None
    return g_input, g_weight


def _cached_linear_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    return _projection_grads(grad, input, weight, *ctx.needs_input_grad[:2])


def _cached_linear_weight_grad_backward(ctx, grad_w):
    # d/d(grad) of sum(grad^T input * grad_w) is input @ grad_w^T; d/d(input) is grad @ grad_w
    grad, input = ctx.saved_tensors
    g_grad = torch.matmul(input, grad_w.t()) if ctx.needs_input_grad[0] else None
    g_input = torch.matmul(grad, grad_w) if ctx.needs_input_grad[1] else None
    return g_grad, g_input


torch.library.register_autograd("xmodal::cached_linear", _cached_linear_backward, setup_context=_save_both)
torch.library.register_autograd("xmodal::cached_linear_weight_grad", _cached_linear_weight_grad_backward, setup_context=_save_both)


@torch.library.register_fake("xmodal::factorized_bilinear_recompute")
def _factorized_bilinear_recompute_fake(proj_a, b, weight_b, bias_a, bias_b, factor, normalize):
    torch._check(factor > 0, lambda: f"factor must be positive, got {factor}")
    lead = torch.broadcast_shapes(proj_a.shape[:-1], b.shape[:-1])
    return proj_a.new_empty((*lead, proj_a.shape[-1] // factor))


def _factorized_recompute_setup_context(ctx, inputs, output):
    proj_a, b, weight_b, bias_a, bias_b, factor, normalize = inputs
    ctx.save_for_backward(proj_a, b, weight_b, bias_a, bias_b)  # b and weight_b are inputs, not activations
    ctx.factor, ctx.normalize = factor, normalize


def _factorized_recompute_backward(ctx, grad):
    proj_a, b, weight_b, bias_a, bias_b = ctx.saved_tensors
    proj_b = torch.ops.xmodal.cached_linear(b, weight_b)  # recomputed rather than kept
    ga, gb = torch.ops.xmodal.factorized_bilinear_backward(grad, proj_a, proj_b, bias_a, bias_b, ctx.factor, ctx.normalize)
    need = ctx.needs_input_grad
    g_b, g_wb = _projection_grads(gb, b, weight_b, need[1], need[2])
    g_ba = _sum_leading(ga) if bias_a is not None and need[3] else None
    g_bb = _sum_leading(gb) if bias_b is not None and need[4] else None
    return (ga if need[0] else None), g_b, g_wb, g_ba, g_bb, None, None


torch.library.register_autograd(
    "xmodal::factorized_bilinear_recompute", _factorized_recompute_backward, setup_context=_factorized_recompute_setup_context
)


# --- IVF list scan ----------------------------------------------------------------------------------------


@torch.library.register_fake("xmodal::ivf_scan")
def _ivf_scan_fake(queries, vectors, list_offsets, probes, k, metric="ip", mask=None, *, query_bias=None,
                   row_scale=None, row_bias=None, row_group=None):
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    # float rows: values in their dtype; int8 codes: float32 keys; packed bits: int32 distances
    dtype = {torch.int8: torch.float32, torch.uint8: torch.int32}.get(vectors.dtype, vectors.dtype)
    shape = (queries.shape[0], k)
    return queries.new_empty(shape, dtype=dtype), queries.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("xmodal::candidate_dots")
def _candidate_dots_fake(queries, rows, candidates):
    torch._check(queries.dim() == 2 and candidates.dim() == 2, lambda: "queries and candidates must be 2-D")
    return queries.new_empty((queries.shape[0], candidates.shape[1]), dtype=torch.float32)


# --- compressed search ------------------------------------------------------------------------------------


@torch.library.register_fake("xmodal::topk_int8")
def _topk_int8_fake(queries, codes, k, query_bias=None, row_scale=None, row_bias=None, mask=None, *, row_group=None,
                    candidates=None):
    torch._check(queries.dim() == 2 and codes.dim() == 2, lambda: "queries and codes must be 2-D")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    return queries.new_empty((queries.shape[0], k)), queries.new_empty((queries.shape[0], k), dtype=torch.int64)


@torch.library.register_fake("xmodal::topk_hamming")
def _topk_hamming_fake(queries, codes, k, mask=None):
    torch._check(queries.dim() == 2 and codes.dim() == 2, lambda: "queries and codes must be 2-D")
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    shape = (queries.shape[0], k)
    return queries.new_empty(shape, dtype=torch.int32), queries.new_empty(shape, dtype=torch.int64)


# --- proximity graph --------------------------------------------------------------------------------------


@torch.library.register_fake("xmodal::graph_search")
def _graph_search_fake(queries, vectors, norms, graph, entry, k, ef, metric="ip", mask=None, ids=None):
    torch._check(k > 0, lambda: f"k must be positive, got {k}")
    shape = (queries.shape[0], k)
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake("xmodal::graph_insert")
def _graph_insert_fake(vectors, norms, graph, start, entry, build_ef, alpha):
    return None


@torch.library.register_fake("xmodal::graph_project")
def _graph_project_fake(vectors, norms, graph, neighbours, hubs, alpha):
    return None


@torch.library.register_fake("xmodal::graph_repair")
def _graph_repair_fake(vectors, norms, graph, keep, alpha):
    kept = torch.library.get_ctx().new_dynamic_size()
    return graph.new_empty((kept, graph.shape[1]))
