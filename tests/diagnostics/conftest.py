"""The doctor's fixtures, shared by its test files: the trained model trains once a session."""

from __future__ import annotations

import copy

import pytest
import torch

import lab
from lab.adapters import save_adapter
from lab.surgery import add_lora


@pytest.fixture(scope="session")
def task():
    return lab.get_task("rotate")


@pytest.fixture(scope="session")
def healthy(task):
    """A trained all-linear adapter (rank 4, alpha 8): the acceptance check's healthy model."""
    torch.manual_seed(0)
    model = lab.load_base_model("cpu")
    add_lora(model, targets="all-linear", rank=4, alpha=8)
    lab.train(model, task, steps=150, lr=2e-2, progress=False, measure_memory=False)
    return model


@pytest.fixture
def sick(healthy):
    """A copy of the healthy model to break."""
    return copy.deepcopy(healthy)


@pytest.fixture(scope="session")
def adapter_file(healthy, tmp_path_factory):
    return save_adapter(healthy, tmp_path_factory.mktemp("adapter") / "healthy.safetensors")
