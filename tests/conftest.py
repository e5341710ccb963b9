"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes
    # each forward ~100x slower; restore the caller's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
