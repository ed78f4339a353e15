"""The embedded default target model and chat dataset shipped inside the package.

``precompute-eagle3``, ``draftcache train`` and ``draftcache eval`` use these when no
``--target-model`` / ``--input-data`` is given, so every command runs offline on a CPU.

* ``DEFAULT_TARGET_DIR``: a Hugging Face model directory (``LlamaForCausalLM``, 8 decoder layers,
  hidden 64, vocab 1024, untied ``lm_head``, fp32 weights, eos ``<|im_end|>``) with a ChatML chat
  template whose ``{% generation %}`` blocks give an exact assistant mask.
* ``DEFAULT_DATA_PATH``: a JSONL file of OpenAI-style records ``{"messages": [{"role", "content"}]}``,
  generated procedurally and held out from the model's training data.

Both are produced by ``scripts/build_default_assets.py``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_TARGET_DIR", "DEFAULT_DATA_PATH", "DEFAULT_EVAL_DATA_PATH", "default_target_path", "default_data_path",
           "default_eval_data_path"]

_ASSETS_DIR = Path(__file__).resolve().parent / "assets"

DEFAULT_TARGET_DIR: Path = _ASSETS_DIR / "default_target"
DEFAULT_DATA_PATH: Path = _ASSETS_DIR / "default_data" / "chat.jsonl"
DEFAULT_EVAL_DATA_PATH: Path = _ASSETS_DIR / "default_data" / "eval.jsonl"  # held out, for draftcache eval

_REBUILD_HINT = (
    "the package was installed without its assets; reinstall draftcache, or rebuild them with "
    "`python scripts/build_default_assets.py` from the repository"
)


def default_target_path() -> str:
    """Return the embedded default target's directory, for ``from_pretrained(..., local_files_only=True)``.

    Raises:
        FileNotFoundError: when the directory or its ``config.json`` is missing.
    """
    if not (DEFAULT_TARGET_DIR / "config.json").is_file():
        raise FileNotFoundError(f"default target model not found at {DEFAULT_TARGET_DIR}: {_REBUILD_HINT}")
    return str(DEFAULT_TARGET_DIR)


def default_data_path() -> str:
    """Return the path of the embedded default chat dataset (JSONL).

    Raises:
        FileNotFoundError: when the file is missing.
    """
    if not DEFAULT_DATA_PATH.is_file():
        raise FileNotFoundError(f"default chat dataset not found at {DEFAULT_DATA_PATH}: {_REBUILD_HINT}")
    return str(DEFAULT_DATA_PATH)


def default_eval_data_path() -> str:
    """Return the held-out prompts ``draftcache eval`` uses by default (generated with another seed)."""
    if not DEFAULT_EVAL_DATA_PATH.is_file():
        raise FileNotFoundError(f"default eval data not found at {DEFAULT_EVAL_DATA_PATH}: {_REBUILD_HINT}")
    return str(DEFAULT_EVAL_DATA_PATH)
