"""Fixtures for tests/targets (tiny models live in ``tiny_targets.py``)."""

from __future__ import annotations

import pytest
import torch
from tiny_targets import VOCAB


@pytest.fixture
def padded_inputs():
    """Two right-padded rows (row 1 has 3 pad slots), with a loss mask on the second half of each row."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, VOCAB - 4, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = 0
    loss_mask = torch.zeros(2, 10, dtype=torch.long)
    loss_mask[:, 4:] = 1
    loss_mask[1, 7:] = 0
    return input_ids, attention_mask, loss_mask
