"""Chat data for draftcache: conversations -> token ids + loss masks, and the draft vocabulary.

Record formats (one record = one conversation; extra fields are ignored):

* ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}, ...]}``
* OpenAI:   ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``

Roles ``human``/``user`` -> user, ``gpt``/``assistant``/``chatgpt``/``bard``/``bing`` ->
assistant, ``system`` -> system (case-insensitive). Turns before the first user turn are dropped
(a leading system message is kept) and counted. Records come from ``.jsonl``, ``.json``,
``.parquet`` files, a directory of them, a ``save_to_disk`` folder or a hub dataset name
(:func:`load_conversations`), read lazily.

A bad record is skipped and counted by reason (:class:`SkipCounts`), or with ``strict=True``
raises :class:`BadRecordError` naming ``file:line``. Reasons (stable strings):

=======================  =========================================================================
``invalid_json``         the line is not valid UTF-8 JSON (or the truncated tail of a JSON array)
``not_an_object``        the record is not a JSON object
``no_messages``          no ``conversations`` / ``messages`` list
``ambiguous_format``     both ``conversations`` and ``messages``
``empty_conversation``   the message list is empty
``malformed_message``    a message lacks a role or a text
``unknown_role``         a role outside the table above (``tool``, ``function``, ...)
``non_text_content``     a text that is not a string (list of parts, object, null)
``empty_content``        a text that is empty or whitespace (the whole record is skipped)
``no_assistant_turn``    nothing to supervise after the first user turn
``no_user_turn``         prompts-only input: nothing to prompt with
``template_error``       the chat template refused the conversation (at tokenization)
``no_supervised_tokens`` no assistant token left after truncation to ``seq_length``
=======================  =========================================================================

:class:`ChatTokenizer` renders a conversation with the tokenizer's own chat template (or a
``--chat-template`` one, :func:`set_chat_template`) and marks the assistant tokens (content plus
end-of-turn token) in ``loss_mask``; :func:`tokenize_all` applies it to a whole set, optionally in
worker processes, until enough samples survive, and counts the last two reasons.

Submodules load on first use, so ``draftcache.data.templates`` (used by configuration checks) does
not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DATA_EXTENSIONS",
    "SKIP_REASONS",
    "BadRecordError",
    "ChatTemplateError",
    "ChatTokenizer",
    "Conversation",
    "ConversationSet",
    "DataFileError",
    "DraftVocab",
    "NoConversationsError",
    "SkipCounts",
    "SkippedRecord",
    "TokenizedSample",
    "TokenStore",
    "TokenStoreWriter",
    "build_draft_vocab",
    "chat_template_problem",
    "count_supervised_tokens",
    "full_vocab",
    "select_draft_vocab",
    "special_token_ids",
    "supervised_token_counts",
    "load_conversations",
    "read_chat_template",
    "set_chat_template",
    "tokenize_all",
    "sample_lengths",
    "share_token_counts",
]

_LAZY = {
    "ChatTokenizer": "draftcache.data.chat",
    "TokenizedSample": "draftcache.data.chat",
    "tokenize_all": "draftcache.data.chat",
    "TokenStore": "draftcache.data.token_store",
    "TokenStoreWriter": "draftcache.data.token_store",
    "sample_lengths": "draftcache.data.token_store",
    "share_token_counts": "draftcache.data.token_store",
    "DATA_EXTENSIONS": "draftcache.data.loading",
    "ConversationSet": "draftcache.data.loading",
    "DataFileError": "draftcache.data.loading",
    "load_conversations": "draftcache.data.loading",
    "SKIP_REASONS": "draftcache.data.records",
    "BadRecordError": "draftcache.data.records",
    "Conversation": "draftcache.data.records",
    "NoConversationsError": "draftcache.data.records",
    "SkipCounts": "draftcache.data.records",
    "SkippedRecord": "draftcache.data.records",
    "ChatTemplateError": "draftcache.data.templates",
    "chat_template_problem": "draftcache.data.templates",
    "read_chat_template": "draftcache.data.templates",
    "set_chat_template": "draftcache.data.templates",
    "DraftVocab": "draftcache.data.vocab",
    "build_draft_vocab": "draftcache.data.vocab",
    "count_supervised_tokens": "draftcache.data.vocab",
    "full_vocab": "draftcache.data.vocab",
    "select_draft_vocab": "draftcache.data.vocab",
    "special_token_ids": "draftcache.data.vocab",
    "supervised_token_counts": "draftcache.data.vocab",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'draftcache.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
