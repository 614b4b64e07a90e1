"""Shared fixtures: seeded runs, the GPU gate, and a tiny-model config factory."""

import random

import pytest
import torch

from qlora.config import RunConfig


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny():
    """RunConfig factory for the tiny test model on CPU: tiny(method="lora", lora_r=4, ...)."""

    def make(**kw):
        kw.setdefault("model", "tiny-llama")
        kw.setdefault("seq_len", 32)
        kw.setdefault("batch_size", 2)
        kw.setdefault("device", "cpu")
        return RunConfig(**kw)

    return make
