"""Shared test setup: no code path may reach a model hub; the tiny SD model; one torch thread for the tiny models;
a Hugging Face cache to lay Hub ids out in. (Real processes, and interrupting them: tests/_launch.py.)"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker, and every process a test starts (the
# variable is inherited), gets its share of the cores: torch's default of one thread per core in every worker makes
# the threads of the workers thrash.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(items):
    """The most expensive test files first, so that the workers of scripts/test.sh (one file at a time each,
    `--dist loadfile --no-loadscope-reorder`) end together: the longest-first rule, with a file's cost estimated as
    HEAVY_COST per test marked heavy (real processes, whole pipelines) plus 1 per other test. xdist's own order
    (most tests first) put the few-test, slowest files (FSDP, per-family resumes, preemption) last, and one worker
    ran them alone at the end. The order within a file is kept (its module fixtures are shared in that order)."""
    cost: dict = {}
    for item in items:
        cost[item.path] = cost.get(item.path, 0) + (HEAVY_COST if item.get_closest_marker("heavy") else 1)
    items.sort(key=lambda item: -cost[item.path])  # stable: a file's tests stay in order


HEAVY_COST = 40  # a heavy test costs tens of seconds, most others well under one


@pytest.fixture(autouse=True)
def _hf_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models are far faster single-threaded, and 2 busy cores make torch's thread pool thrash. A module
    that wants it: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD-1.x preset (diffusers' get_dummy_components sizes), built once per test module."""
    from spin_diffusion import presets

    return presets.build_preset("tiny", seed=0)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub (and diffusers, datasets through it) reads, offline; fill it
    with tests/_hub_cache.add_to_cache."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
