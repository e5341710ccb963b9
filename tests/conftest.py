"""Shared test settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The CLI runs the tests start get one OpenMP thread per process: `make test` runs two test processes side
# by side (pytest-xdist), and two runs of two threads each on 2 cores spin against each other. A run that
# sets cluster.threads still gets what it asks for.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files with the longest runs (fixtures included), longest first: `make test` hands whole files to its two
# xdist processes in collection order (--no-loadscope-reorder), so starting these first lets the short files
# fill in around them and both processes finish together. Any file not named here runs after them.
LONGEST_FIRST = (
    "test_sanity.py",
    "test_slurm.py",
    "test_scale.py",
    "test_reproduce.py",
    "test_e2e.py",
    "test_tasks_e2e.py",
    "test_sweeps.py",
    "test_zero3_rollouts.py",
    "test_rewards_adversarial.py",
    "test_gpu_check.py",
    "test_bench.py",
    "test_evaluate.py",
    "test_config.py",
    "test_faults_rundir.py",
    "test_model_families.py",
    "test_bench_sampler.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order is kept


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes
    # each forward ~100x slower; restore the caller's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
