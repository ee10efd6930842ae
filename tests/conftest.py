"""Shared test set-up: offline hub, deterministic seeds, GPU marker handling."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _limit_threads_to_the_cpu_quota() -> None:
    """Under a cgroup quota smaller than the visible cores, use (and pass on) the quota."""
    from libmoe_core.train.cpus import available_cpus

    cpus = available_cpus()
    if cpus < (os.cpu_count() or 1) and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cpus)  # inherited by notebooks, lmms-eval, launchers
        torch.set_num_threads(cpus)


_limit_threads_to_the_cpu_quota()
