"""Which chat template renders the conversations: the tokenizer's own, or a ``--chat-template`` value.

A ``--chat-template`` value is either the path of a file holding a Jinja chat template (``.jinja``,
``.txt``, anything UTF-8) or the template text itself. An existing file wins; any other value
must look like Jinja (contain ``{{`` or ``{%``), otherwise it is a path that does not exist and
is refused. :func:`set_chat_template` puts the text on the tokenizer, so everything that reads
``tokenizer.chat_template`` afterwards (the tokenizer's own ``apply_chat_template``, the cache
manifest's ``tokenizer.chat_template_fingerprint``) sees the template actually used.

This module imports nothing heavy: configuration classes validate the flag with it before torch loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["ChatTemplateError", "chat_template_problem", "read_chat_template", "set_chat_template",
           "template_sha256"]

_JINJA_MARKERS = ("{{", "{%")


class ChatTemplateError(ValueError):
    """The chat template cannot be used (a template problem, not a data one); the message names
    ``--chat-template``, the flag that replaces it."""


def _is_file(value: str) -> bool:
    return os.path.isfile(os.path.expanduser(value))


def chat_template_problem(value: str | None) -> str | None:
    """What is wrong with a ``--chat-template`` value, or None (nothing is read: cheap enough for
    a config's ``problems()``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return "--chat-template must be a file path or the Jinja template text, got an empty value"
    if _is_file(value) or any(marker in value for marker in _JINJA_MARKERS):
        return None
    return (f"--chat-template {value!r}: no such file, and not template text either (template text contains "
            "'{{' or '{%'); pass the path of a Jinja file or the template itself")


def read_chat_template(value: str) -> str:
    """The template text a ``--chat-template`` value names: the contents of the file at ``value``,
    or ``value`` itself when it is not an existing file and contains ``{{`` or ``{%``.

    Raises :class:`ChatTemplateError` for any other value, an unreadable file or an empty one.
    """
    problem = chat_template_problem(value)
    if problem:
        raise ChatTemplateError(problem)
    if not _is_file(value):
        return value
    path = os.path.expanduser(value)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"--chat-template {value}: cannot read the file ({exc}); pass a UTF-8 Jinja "
                                "file or the template text itself") from None
    if not text.strip():
        raise ChatTemplateError(f"--chat-template {value}: the file is empty; pass a file holding a Jinja chat "
                                "template")
    return text


def set_chat_template(tokenizer: Any, value: str | None) -> None:
    """Make ``value`` (a ``--chat-template`` value; None keeps the tokenizer's own) the tokenizer's
    chat template, so renderings and fingerprints made from the tokenizer use it."""
    if value is not None:
        tokenizer.chat_template = read_chat_template(value)


def template_sha256(template: str | dict | None) -> str:
    """sha256 of a chat template as a tokenizer holds it (a named-templates dict as sorted JSON)."""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256((template or "").encode("utf-8")).hexdigest()
