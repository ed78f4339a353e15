"""Fixtures for the data tests (tokenizer builders live in ``data_chat_tokenizers``)."""

import pytest

from data_chat_tokenizers import build_chat_tokenizer


@pytest.fixture
def make_tokenizer():
    """``make_tokenizer(chat_template)`` -> a fresh tiny fast tokenizer with that template."""
    return build_chat_tokenizer
