"""The SmolLM2 chat template copied into the default suite (``tests/data/real_chat_templates.py``) is
the one the real model ships: compared with the converted model's ``chat_template.jinja``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "real_chat_templates.py"


def test_copied_smollm2_template_is_the_models_file(smollm2_dir):
    spec = importlib.util.spec_from_file_location("draftcache_real_chat_templates", TEMPLATES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    assert (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8") == module.SMOLLM2
