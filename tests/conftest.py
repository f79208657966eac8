"""Shared fixtures: tiny random-init models of every supported family, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("APQ_NO_PROGRESS", "1")
torch.set_num_threads(1)
if "PYTEST_XDIST_WORKER" in os.environ:  # one cache per worker: two workers never fill the same
    #                                      cache entry at once (a reader could see it replaced)
    _cache = os.environ.get("APQ_CACHE_DIR") or os.path.expanduser("~/.cache/apq-sdk")
    os.environ["APQ_CACHE_DIR"] = f"{_cache}-{os.environ['PYTEST_XDIST_WORKER']}"


def pytest_collection_modifyitems(config, items):
    """Every demo-model test is slow too: `pytest -m "not slow"` is the fast developer suite.

    With pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml) the tests of one module run on
    one worker (its module-scoped fixtures are built once), except the conformance suite, whose
    tests run in one group per target (each target's builds are cached per worker)."""
    for item in items:
        if item.get_closest_marker("demo") is not None:
            item.add_marker(pytest.mark.slow)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module.__name__.endswith("test_conformance") and "name" in params:
            group = f"conformance-{params['name']}"
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


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
