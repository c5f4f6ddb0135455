"""Gradients through topk_search's values (the indices are constants): against autograd through the
plain-PyTorch reference, gradcheck in float64, the op checks, edge cases and a model that learns through it."""
import pytest
import torch

import xmodal
from xmodal import reference
from xmodal.ops import SEARCH_METRICS

from search_helpers import make_inputs

ALL_METRICS = list(SEARCH_METRICS)
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _leaves(q, n, d, metric, dtype, device, seed=0):
    queries, database = make_inputs(q, n, d, metric, dtype, device, seed=seed)
    return queries.clone().requires_grad_(), database.clone().requires_grad_()


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gradients_match_the_reference(device, metric, dtype):
    queries, database = _leaves(6, 300, 12, metric, dtype, device, seed=1)
    values, indices = xmodal.topk_search(queries, database, 7, metric)
    weights = torch.randn(values.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (values.double() * weights.to(device)).sum().backward()
    # the reference: the same selected pairs, differentiated by autograd in float64
    q64 = queries.detach().double().requires_grad_()
    x64 = database.detach().double().requires_grad_()
    (reference.selected_values(q64, x64, indices, metric) * weights.to(device)).sum().backward()
    tol = GRAD_TOL[dtype]
    assert queries.grad.dtype == dtype and database.grad.dtype == dtype
    torch.testing.assert_close(queries.grad.double(), q64.grad, rtol=tol, atol=tol * q64.grad.abs().max().item())
    torch.testing.assert_close(database.grad.double(), x64.grad, rtol=tol, atol=tol * x64.grad.abs().max().item())


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_gradcheck(device, metric):
    queries, database = _leaves(3, 30, 5, metric, torch.float64, device, seed=3)
    mask = torch.arange(30, device=device) % 3 != 0
    assert torch.autograd.gradcheck(lambda q, x: xmodal.topk_search(q, x, 4, metric)[0], (queries, database))
    # a mask, and k > candidates (padding passes no gradient)
    def padded(q, x):
        values, indices = xmodal.topk_search(q, x, 25, metric, mask=mask)
        return torch.where(indices >= 0, values, 0)  # finite differences of the +-inf padding are NaN

    assert torch.autograd.gradcheck(padded, (queries, database))
    # a single 1-D query
    assert torch.autograd.gradcheck(lambda q, x: xmodal.topk_search(q, x, 3, metric)[0], (queries[0].detach().requires_grad_(), database))


@pytest.mark.parametrize("metric", ["cosine", "l2", "kl"])
def test_opcheck(device, metric):
    queries, database = _leaves(4, 50, 8, metric, torch.float32, device, seed=4)
    torch.library.opcheck(torch.ops.xmodal.topk_search.default, (queries, database, 5, metric, None))
    values, indices = torch.ops.xmodal.topk_search(queries.detach(), database.detach(), 60, metric)  # padded
    grad = torch.randn_like(values)
    for need in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.xmodal.topk_search_backward.default,
                              (grad, values, indices, queries.detach(), database.detach(), metric, need))


def test_only_the_inputs_that_need_it_get_gradients(device):
    queries, database = make_inputs(4, 100, 8, "ip", torch.float32, device)
    queries.requires_grad_()
    values, indices = xmodal.topk_search(queries, database, 3, "ip")
    values.sum().backward()
    assert database.grad is None
    torch.testing.assert_close(queries.grad, database[indices].sum(1))
    assert not indices.requires_grad


def test_no_graph_without_a_gradient_to_compute(device):
    queries, database = make_inputs(4, 100, 8, "ip", torch.float32, device)
    values, _ = xmodal.topk_search(queries, database, 3, "ip")
    assert values.grad_fn is None and not values.requires_grad
    queries.requires_grad_()
    with torch.no_grad():
        values, _ = xmodal.topk_search(queries, database, 3, "ip")
    assert values.grad_fn is None and not values.requires_grad
    values, indices = xmodal.topk_search(queries, database, 3, "ip")
    assert values.requires_grad and values.grad_fn is not None and not indices.requires_grad


def test_non_finite_values_pass_no_gradient(device):
    # a NaN row that is selected (k = N) and KL's +inf (d_i = 0 < q_i) leave every gradient finite
    queries, database = _leaves(2, 20, 4, "l2", torch.float32, device, seed=5)
    with torch.no_grad():
        database[3] = float("nan")
    values, _ = xmodal.topk_search(queries, database, 20, "l2")
    values.nan_to_num(0).sum().backward()
    assert torch.isfinite(queries.grad).all() and torch.isfinite(database.grad[torch.arange(20) != 3]).all()
    q = torch.tensor([[0.5, 0.5, 0.0]], device=device, requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]], device=device, requires_grad=True)
    values, indices = xmodal.topk_search(q, x, 2, "kl")
    assert values[0, 1].item() == float("inf")
    values.nan_to_num(0, posinf=0).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()


def test_a_model_learns_through_the_search():
    """Hard-negative training: a linear map learns to send each query near its own row, with the loss on
    the search's top-k values (the hardest negatives) and the positive's score."""
    g = torch.Generator().manual_seed(0)
    database = torch.nn.functional.normalize(torch.randn(256, 16, generator=g), dim=1)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    queries = database @ rotation.T + 0.05 * torch.randn(256, 16, generator=g)  # each query: its row, rotated
    model = torch.nn.Linear(16, 16, bias=False)
    torch.nn.init.eye_(model.weight)
    target = torch.arange(256)

    def recall_at_1():
        with torch.no_grad():
            return (xmodal.topk_search(model(queries), database, 1, "cosine")[1][:, 0] == target).float().mean().item()

    before = recall_at_1()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        q = model(queries)
        values, indices = xmodal.topk_search(q, database, 5, "cosine")
        positive = torch.nn.functional.cosine_similarity(q, database[target], dim=1)
        negatives = values.masked_fill(indices == target[:, None], -1.0)  # drop the positive if retrieved
        loss = torch.relu(0.2 + negatives - positive[:, None]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert before < 0.2 and recall_at_1() > 0.95, (before, recall_at_1())
