"""Fixtures for tests/precompute. Every test here runs on the CPU; the CLI ones start real
subprocesses (``python -m draftcache.precompute``), the rest call the library in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from .helpers import target_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread per test module (set before its module-scoped fixtures build caches):
    the suite shares two busy cores (see helpers.SUBPROCESS_ENV), and equal thread counts keep
    in-process fp32 results equal to the subprocesses'."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def config_only_target(tmp_path_factory) -> Path:
    """The default target's config and tokenizer WITHOUT weights: a run that gets as far as loading
    the model fails, so a flag error reported with it was found before any model loaded."""
    directory = tmp_path_factory.mktemp("config_only_target")
    for path in Path(target_dir()).iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture(scope="module")
def reference_target():
    """The default target in fp32 on the CPU, wrapped for the online EAGLE-3 path."""
    from draftcache.targets import HFEagle3TargetModel
    from draftcache.targets.loading import load_target_model

    return HFEagle3TargetModel(load_target_model(target_dir(), device=torch.device("cpu")))
