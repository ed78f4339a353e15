"""Fixtures for the trainer tests: a tiny long-context llama3-RoPE target and its draft config."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from draftcache.trainer.eagle3.model import Eagle3DraftConfig

from .helpers import tiny_target_config


@pytest.fixture(autouse=True)
def _single_thread():
    """These tensors are tiny: intra-op threads only contend with the other test runs on the
    shared cores (softmax of a [4, 12] tensor took 10 ms with the default pool under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def target_config() -> LlamaConfig:
    return tiny_target_config()


@pytest.fixture
def draft_config(target_config) -> Eagle3DraftConfig:
    return Eagle3DraftConfig.from_target_config(target_config, draft_vocab_size=64, aux_layer_ids=[1, 3, 4])
