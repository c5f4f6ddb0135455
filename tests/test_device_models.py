"""Lane-level models of the CUDA kernels' index arithmetic (tests/device_models/), run without a GPU: each
script asserts that its model reproduces what the kernel must compute."""
import runpy
from pathlib import Path

import pytest

MODELS = sorted((Path(__file__).parent / "device_models").glob("*.py"))


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_device_model(path):
    runpy.run_path(str(path), run_name="__main__")


def test_models_exist():
    assert {p.stem for p in MODELS} == {"mma_filter_layout", "warp_transpose_sum"}
