"""Shared fixtures: tiny models and a tiny ShapesWorld, built once per session."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tessera.data.shapes import ShapesConfig, generate_shapes


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ShapesWorld (120 train images) shared by the tests that read data."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(ShapesConfig(seed=0, num_train=120, num_val=10, num_test=20, num_test_comp=20), root,
                    progress=False)
    return root


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo process group of spawned test processes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config: pytest.Config) -> None:
    # Tests use tiny tensors: one thread per process avoids OpenMP spin contention, and
    # pytest-xdist (-n 2) then keeps both cores busy with two test processes.
    torch.set_num_threads(1)
