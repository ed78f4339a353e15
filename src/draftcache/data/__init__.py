"""Chat data for draftcache: conversations -> token ids + loss masks, and the draft vocabulary.

Record formats (one record = one conversation; extra fields are ignored):

* ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}, ...]}``
* OpenAI:   ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``

Roles ``human``/``user`` -> user, ``gpt``/``assistant``/``chatgpt``/``bard``/``bing`` ->
assistant, ``system`` -> system (case-insensitive). Records come from ``.jsonl``, ``.json``,
``.parquet`` files, a directory of them, a ``save_to_disk`` folder or a hub dataset name
(:func:`load_conversations`).

A bad record is skipped and counted by reason (:class:`SkipCounts`), or with ``strict=True``
raises :class:`BadRecordError` naming ``file:line``. Reasons (stable strings):

=======================  =========================================================================
``invalid_json``         the line is not valid UTF-8 JSON
``not_an_object``        the record is not a JSON object
``no_messages``          no ``conversations`` / ``messages`` list
``ambiguous_format``     both ``conversations`` and ``messages``
``empty_conversation``   the message list is empty
``malformed_message``    a message lacks a role or a text
``unknown_role``         a role outside the table above (``tool``, ``function``, ...)
``non_text_content``     a text that is not a string (list of parts, object, null)
``empty_content``        a text that is empty or whitespace (the whole record is skipped)
``no_assistant_turn``    nothing to supervise
``template_error``       the chat template raised on the conversation (at tokenization)
``no_supervised_tokens`` no assistant token left after truncation to ``seq_length``
=======================  =========================================================================

:class:`ChatTokenizer` renders a conversation with the tokenizer's own chat template and marks
the assistant tokens (content plus end-of-turn token) in ``loss_mask``; :func:`tokenize_all`
applies it to a whole set and counts the last two reasons.
"""

from draftcache.data.chat import ChatTemplateError, ChatTokenizer, TokenizedSample, tokenize_all
from draftcache.data.loading import DATA_EXTENSIONS, ConversationSet, DataFileError, load_conversations
from draftcache.data.records import (
    SKIP_REASONS,
    BadRecordError,
    Conversation,
    NoConversationsError,
    SkipCounts,
)
from draftcache.data.vocab import DraftVocab, build_draft_vocab, count_supervised_tokens, full_vocab

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
    "TokenizedSample",
    "build_draft_vocab",
    "count_supervised_tokens",
    "full_vocab",
    "load_conversations",
    "tokenize_all",
]
