"""What the service tests share: an in-process app behind FastAPI's TestClient, random rows, and the
requests most tests make."""
import numpy as np
import torch
from fastapi.testclient import TestClient

from xmodal.serve import create_app

KEY = "test-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def client(folder, **kwargs):
    kwargs.setdefault("load_in_background", False)
    return TestClient(create_app(str(folder), **kwargs))


def rows(n, dim=8, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).numpy()


def add(c, name, ids, vectors, payloads=None, headers=None):
    body = {"ids": list(map(int, ids)), "vectors": np.asarray(vectors).tolist()}
    if payloads is not None:
        body["payloads"] = payloads
    return c.post(f"/collections/{name}/vectors", json=body, headers=headers)


def detail(response):
    return response.json()["detail"]
