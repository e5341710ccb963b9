"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch

# The CLI runs the tests start get one OpenMP thread per process: `make test` runs two test processes side
# by side (pytest-xdist), and two runs of two threads each on 2 cores spin against each other. A run that
# sets cluster.threads still gets what it asks for.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes
    # each forward ~100x slower; restore the caller's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
