import pytest
import torch

import xmodal

HAS_CUDA = torch.cuda.is_available() and xmodal.build_info()["cuda"]

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and CUDA kernels")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_addoption(parser):
    parser.addoption("--screenshots", metavar="DIR", default=None,
                     help="where the search page's browser tests write their screenshots (default: a temporary folder)")
