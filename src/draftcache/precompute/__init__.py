"""``precompute-eagle3``: run a frozen target once over a chat corpus and write the cache.

``precompute_from_config(PrecomputeConfig(...))`` loads everything the config names and runs;
``run_precompute`` takes already-built components (tests, custom loaders). Heavy modules are
imported on first use, so the command line validates its flags before torch loads.
"""

from __future__ import annotations

from typing import Any

from draftcache.precompute.config import ConfigError, PrecomputeConfig

__all__ = [
    "ConfigError",
    "PrecomputeConfig",
    "PrecomputeError",
    "PrecomputeSummary",
    "check_output_dir",
    "precompute_from_config",
    "run_precompute",
    "tokenize_conversations",
]

_LAZY = {
    "PrecomputeError": "draftcache.precompute.output_dir",
    "PrecomputeSummary": "draftcache.precompute.summary",
    "check_output_dir": "draftcache.precompute.output_dir",
    "run_precompute": "draftcache.precompute.pipeline",
    "tokenize_conversations": "draftcache.precompute.pipeline",
    "precompute_from_config": "draftcache.precompute.main",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'draftcache.precompute' has no attribute {name!r}")
