import pytest
import torch

import xmodal


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available() and xmodal.build_info()["cuda"]
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and CUDA kernels"))
