"""One chat record -> one normalised :class:`Conversation`, or a named reason to skip it.

Two record shapes are accepted (extra fields are ignored):

* ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
* OpenAI:   ``{"messages": [{"role": "user", "content": "..."}, ...]}``

A message may use either key pair (``from``/``value`` or ``role``/``content``) in either field.
Roles map case-insensitively to ``system``/``user``/``assistant`` (:data:`ROLE_ALIASES`); any
other role (``tool``, ``function``, ...) is a bad record.

Turns before the first user turn are dropped (a leading system message is kept), as SpecForge
does: split ShareGPT records often start in the middle of a reply. The count is kept on the
conversation (``dropped_turns``) so loaders can report it.

A prompts-only input (``prompts=True``, for evaluation) keeps records without an assistant turn;
:meth:`Conversation.prompt_messages` is then what a model is asked.

Bad records are never fatal and never silent: the loader counts them by reason in
:class:`SkipCounts`, or raises :class:`BadRecordError` at the first one in strict mode. The
reasons are stable strings (they end up in manifests and logs), listed in :data:`SKIP_REASONS`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ROLE_ALIASES",
    "SKIP_REASONS",
    "BadRecordError",
    "Conversation",
    "NoConversationsError",
    "SkipCounts",
    "SkippedRecord",
    "normalize_record",
]

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}

SKIP_REASONS: dict[str, str] = {
    "invalid_json": "the line is not valid UTF-8 JSON",
    "not_an_object": "the record is not a JSON object",
    "no_messages": "the record has no 'conversations' or 'messages' list",
    "ambiguous_format": "the record has both a 'conversations' and a 'messages' list",
    "empty_conversation": "the message list is empty",
    "malformed_message": "a message is not an object with a role ('from'/'role') and a text ('value'/'content')",
    "unknown_role": "a message role is not one of " + ", ".join(sorted(ROLE_ALIASES)),
    "non_text_content": "a message text is not a string (a list, an object or null)",
    "empty_content": "a message text is empty or only whitespace",
    "no_assistant_turn": "the conversation has no assistant message after its first user message",
    "no_user_turn": "the conversation has no user message to prompt with",
    "template_error": "the chat template refused the conversation (e.g. roles that do not alternate)",
    "no_supervised_tokens": "no assistant token is left after truncation to seq_length",
}


class BadRecordError(ValueError):
    """A bad record met in strict mode. ``source`` is ``file:line`` or ``hub:name[split]#index``."""

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason
        self.detail = detail
        explanation = detail or SKIP_REASONS.get(reason, reason)
        super().__init__(
            f"{source}: bad record ({reason}): {explanation}. "
            "Fix: drop the record or run without --strict (bad records are then skipped and counted)."
        )


class NoConversationsError(ValueError):
    """Nothing valid is left: every record was skipped (the message carries the skip summary)."""


@dataclass(frozen=True)
class Conversation:
    """A normalised chat: ``messages`` are ``{"role", "content"}`` dicts with role in
    ``system``/``user``/``assistant`` and non-empty string content, starting with an optional
    system message and then a user message; ``source`` names where the record came from
    (``/path/data.jsonl:12`` or ``hub:name[train]#7``); ``dropped_turns`` counts the turns before
    the first user turn that normalisation removed."""

    messages: list[dict[str, str]]
    source: str
    dropped_turns: int = 0

    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt: the messages before the first assistant turn, up to the last user turn among
        them (render it with ``add_generation_prompt=True``); empty without a user turn."""
        first = next((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), len(self.messages))
        last_user = max((i for i in range(first) if self.messages[i]["role"] == "user"), default=-1)
        return self.messages[: last_user + 1]


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out of the data: where it is, the reason (a key of :data:`SKIP_REASONS`) and
    what exactly is wrong."""

    source: str
    reason: str
    detail: str

    def error(self) -> BadRecordError:
        """The strict-mode error for this record."""
        return BadRecordError(self.source, self.reason, self.detail)


@dataclass
class SkipCounts:
    """Skipped records counted by reason, with the first source seen for each reason."""

    counts: Counter = field(default_factory=Counter)
    first_source: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, source: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {sorted(SKIP_REASONS)}")
        self.counts[reason] += 1
        self.first_source.setdefault(reason, source)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}`` sorted by reason, only reasons that occurred."""
        return {reason: self.counts[reason] for reason in sorted(self.counts)}

    def summary(self) -> str:
        """One line, e.g. ``skipped 3 records: invalid_json=2 (first at a.jsonl:4), unknown_role=1 (...)``."""
        if not self.total:
            return "skipped 0 records"
        parts = [f"{reason}={n} (first at {self.first_source[reason]})" for reason, n in self.as_dict().items()]
        noun = "record" if self.total == 1 else "records"
        return f"skipped {self.total} {noun}: " + ", ".join(parts)


class _Skip(Exception):
    """Internal control flow: a record is bad for ``reason``; ``detail`` says which field/value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _messages_field(record: dict[str, Any]) -> list[Any]:
    conversations = record.get("conversations")
    messages = record.get("messages")
    # Arrow-backed rows (parquet, hub) carry every column, so an absent field reads as None.
    if conversations is not None and messages is not None:
        raise _Skip("ambiguous_format", "the record has both 'conversations' and 'messages'; keep one")
    value = conversations if conversations is not None else messages
    if value is None:
        raise _Skip("no_messages", f"no 'conversations' or 'messages' field (keys: {sorted(record)[:8]})")
    if not isinstance(value, list):
        raise _Skip("no_messages", f"the message field is a {type(value).__name__}, not a list")
    return value


def _normalize_message(index: int, message: Any) -> dict[str, str]:
    if not isinstance(message, dict):
        raise _Skip("malformed_message", f"message {index} is a {type(message).__name__}, not an object")
    # Arrow-backed rows may carry both key pairs with one of them null.
    role = message["from"] if message.get("from") is not None else message.get("role")
    if role is None or ("value" not in message and "content" not in message):
        raise _Skip("malformed_message", f"message {index} needs 'from'/'role' and 'value'/'content' (keys: {sorted(message)})")
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        raise _Skip("unknown_role", f"message {index} has role {role!r}; known roles: {', '.join(sorted(ROLE_ALIASES))}")
    content = message["value"] if message.get("value") is not None else message.get("content")
    if not isinstance(content, str):
        raise _Skip("non_text_content", f"message {index} text is {type(content).__name__}, not a string")
    if not content.strip():
        raise _Skip("empty_content", f"message {index} ({role}) has empty text")
    return {"role": ROLE_ALIASES[role.lower()], "content": content}


def _drop_leading_turns(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Drop the turns between an optional leading system message and the first user message;
    (kept messages, number dropped). Without a user message only the system message is kept."""
    start = 1 if messages[0]["role"] == "system" else 0
    first_user = next((i for i in range(start, len(messages)) if messages[i]["role"] == "user"), len(messages))
    return messages[:start] + messages[first_user:], first_user - start


def normalize_record(record: Any, source: str, *, prompts: bool = False) -> Conversation | SkippedRecord:
    """Normalise one parsed record, or say why it is skipped (see :data:`SKIP_REASONS`).

    Empty or whitespace-only text in any message skips the whole record: an empty assistant turn
    would only teach "end the turn now", and an empty user turn is a data error. Turns before the
    first user turn are dropped (see the module docstring). A training record then needs an
    assistant turn (``no_assistant_turn``); with ``prompts=True`` a record needs only a user turn
    (``no_user_turn``).
    """
    try:
        if not isinstance(record, dict):
            raise _Skip("not_an_object", f"the record is a {type(record).__name__}, not a JSON object")
        raw = _messages_field(record)
        if not raw:
            raise _Skip("empty_conversation", "the message list is empty")
        messages = [_normalize_message(i, m) for i, m in enumerate(raw)]
        kept, dropped = _drop_leading_turns(messages)
        roles = ", ".join(m["role"] for m in messages[:12]) + (", ..." if len(messages) > 12 else "")
        if prompts and not any(m["role"] == "user" for m in kept):
            raise _Skip("no_user_turn", f"no user message (roles: {roles})")
        if not prompts and not any(m["role"] == "assistant" for m in kept):
            where = " after the first user message" if any(m["role"] == "assistant" for m in messages) else ""
            raise _Skip("no_assistant_turn", f"no assistant message{where} (roles: {roles})")
    except _Skip as skip:
        return SkippedRecord(source, skip.reason, skip.detail)
    return Conversation(messages=kept, source=source, dropped_turns=dropped)
