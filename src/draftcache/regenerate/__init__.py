"""``draftcache regenerate``: replace a chat corpus's assistant turns with the target's own replies.

Drafts accept more when trained on what their target would say: ShareGPT's replies were written
by other models. The output is ordinary chat JSONL for ``precompute-eagle3 --input-data``.

* :mod:`~draftcache.regenerate.config`  the settings (:class:`RegenerateConfig`)
* :mod:`~draftcache.regenerate.turns`   turn-by-turn regeneration of a batch of conversations
* :mod:`~draftcache.regenerate.engines` vLLM (offline ``LLM``) and HF ``generate`` engines
* :mod:`~draftcache.regenerate.output`  the appended JSONL and the progress file that makes it resumable
* :mod:`~draftcache.regenerate.run`     the run loop (:func:`regenerate`)

Submodules load on first use: the CLI imports the config without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RegenerateConfig", "RegenerateConfigError", "RegenerateSummary", "ResumeError", "regenerate"]

_LAZY = {
    "RegenerateConfig": "draftcache.regenerate.config",
    "RegenerateConfigError": "draftcache.regenerate.config",
    "RegenerateSummary": "draftcache.regenerate.run",
    "regenerate": "draftcache.regenerate.run",
    "ResumeError": "draftcache.regenerate.output",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'draftcache.regenerate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
