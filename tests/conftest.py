"""Shared fixtures: tiny random-init models of every supported family, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("APQ_NO_PROGRESS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Every demo-model test is slow too: `pytest -m "not slow"` is the fast developer suite."""
    for item in items:
        if item.get_closest_marker("demo") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory, request):
    """An APQ_CACHE_DIR of the test module's own (`pytestmark = usefixtures("module_cache")`)."""
    mp = pytest.MonkeyPatch()
    name = request.module.__name__.rsplit(".", 1)[-1]
    mp.setenv("APQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / f"cache-{name}"))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    from apq_sdk.testing import make_tiny_model

    cache = {}

    def build(family: str = "llama"):
        if family not in cache:
            cache[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}") / "model", family)
        return cache[family]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")
