"""Turn by turn: replace each assistant turn of a conversation with the target's own reply.

For a batch of conversations, round ``k`` asks the engine for every conversation's ``k``-th
assistant turn at once. The prompt is the conversation so far *with the replies already
regenerated* (system and user turns kept verbatim), rendered with the chat template and its
generation prompt, so later turns see the target's own history. System and user turns after the
last assistant turn are kept as they are.

A conversation is cut short at the turn where it cannot go on, keeping what came before its last
usable reply:

``template_error``   the chat template refused the prompt (a bad record: ``--strict`` raises)
``prompt_too_long``  prompt + ``max_new_tokens`` exceed the model length
``empty_reply``      the target ended its turn at once (an empty assistant turn is a bad record
                     for precompute)

With no assistant turn left the conversation is skipped with that reason. A reply that hits
``max_new_tokens`` is kept as written and counted as truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import jinja2

from draftcache.data import BadRecordError, Conversation
from draftcache.regenerate.engines import Engine

__all__ = ["CUT_REASONS", "Regenerated", "TurnRegenerator", "end_of_turn_ids"]

CUT_REASONS: dict[str, str] = {
    "template_error": "the chat template refused the conversation so far",
    "prompt_too_long": "the prompt plus --max-new-tokens exceed the model length (--max-model-len)",
    "empty_reply": "the target ended its turn without writing anything",
}

_PROBE_REPLY = "draftcache end-of-turn probe"


def end_of_turn_ids(tokenizer: Any, chat_template: str, generation_config: Any = None) -> list[int]:
    """The ids that end a reply: the eos ids of ``generation_config`` and the tokenizer, plus the
    special token the template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ...),
    found by rendering a probe reply.

    Raises ``ValueError`` when none is found (the engine could not tell where a reply ends).
    """
    ids: set[int] = set()
    for value in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"},
                                          {"role": "assistant", "content": _PROBE_REPLY}],
                                         chat_template=chat_template, tokenize=False)
    at = text.find(_PROBE_REPLY)
    if at >= 0:
        after = tokenizer(text[at + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        if after and after[0] in special:
            ids.add(int(after[0]))
    if not ids:
        raise ValueError("cannot tell where a reply ends: the target has no eos_token_id (generation_config.json, "
                         "tokenizer) and its chat template closes an assistant turn with no special token; set "
                         "eos_token_id in the target's generation_config.json")
    return sorted(ids)


@dataclass
class Regenerated:
    """One conversation after regeneration.

    ``messages`` are ``{"role", "content"}`` dicts (None when skipped); ``truncated_turns`` counts
    replies that hit ``max_new_tokens``; ``cut`` is the reason (a key of :data:`CUT_REASONS`) the
    conversation ends early, ``detail`` what exactly happened; ``generated_tokens`` counts reply
    tokens (end-of-turn ids excluded).
    """

    id: int
    source: str
    messages: list[dict[str, str]] | None
    truncated_turns: int = 0
    generated_tokens: int = 0
    cut: str | None = None
    detail: str = ""

    @property
    def skipped(self) -> bool:
        return self.messages is None


@dataclass
class _State:
    id: int
    conversation: Conversation
    out: list[dict[str, str]] = field(default_factory=list)
    pos: int = 0            # next message of the original conversation to read
    turn: int = 0           # assistant turns regenerated so far
    truncated: int = 0
    tokens: int = 0
    cut: str | None = None
    detail: str = ""
    done: bool = False

    def stop(self, reason: str, detail: str) -> None:
        self.cut, self.detail, self.done = reason, detail, True
        last = max((i for i, m in enumerate(self.out) if m["role"] == "assistant"), default=-1)
        self.out = self.out[: last + 1]  # an unanswered user turn after the cut teaches nothing

    def result(self) -> Regenerated:
        kept = self.out if any(m["role"] == "assistant" for m in self.out) else None
        return Regenerated(self.id, self.conversation.source, kept, self.truncated, self.tokens, self.cut, self.detail)


class TurnRegenerator:
    """Regenerate batches of conversations with ``engine``.

    ``chat_template`` is the template text (``ChatTokenizer(...).chat_template``); prompts longer
    than ``max_model_len - max_new_tokens`` tokens end their conversation (``prompt_too_long``).
    ``seed`` and each conversation's id and turn give the seed of its sampling.
    """

    def __init__(self, tokenizer: Any, chat_template: str, engine: Engine, *, max_new_tokens: int,
                 max_model_len: int, seed: int = 0, strict: bool = False) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.engine = engine
        self.max_prompt_tokens = max_model_len - max_new_tokens
        self.seed = seed
        self.strict = strict

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """``messages`` rendered with the generation prompt, as token ids (the template writes BOS)."""
        out = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=True,
                                                 return_dict=True, add_generation_prompt=True)
        return list(out["input_ids"])

    def run(self, batch: Sequence[tuple[int, Conversation]]) -> list[Regenerated]:
        """Regenerate every assistant turn of each ``(id, conversation)``; results in input order."""
        states = [_State(i, c) for i, c in batch]
        while True:
            pending = [(s, p) for s in states if not s.done for p in [self._next_prompt(s)] if p is not None]
            if not pending:
                return [s.result() for s in states]
            seeds = [(self.seed * 1_000_003 + s.id * 1_009 + s.turn) % (1 << 31) for s, _ in pending]
            replies = self.engine.generate([p for _, p in pending], seeds)
            for (state, _), reply in zip(pending, replies):
                text = self.tokenizer.decode(reply.token_ids, skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
                if not text.strip():
                    state.stop("empty_reply", f"assistant turn {state.turn + 1}: the target ended its turn at once")
                    continue
                state.out.append({"role": "assistant", "content": text})
                state.pos += 1
                state.turn += 1
                state.tokens += len(reply.token_ids)
                state.truncated += not reply.stopped

    def _next_prompt(self, state: _State) -> list[int] | None:
        """Copy the system/user turns up to the next assistant turn; that turn's prompt ids, or None
        when the conversation is finished (or cut here)."""
        messages = state.conversation.messages
        while state.pos < len(messages) and messages[state.pos]["role"] != "assistant":
            state.out.append(dict(messages[state.pos]))
            state.pos += 1
        if state.pos >= len(messages):
            state.done = True
            return None
        try:
            prompt = self.prompt_ids(state.out)
        except jinja2.TemplateError as exc:
            detail = f"assistant turn {state.turn + 1}: the chat template raised: {exc}"
            if self.strict:
                raise BadRecordError(state.conversation.source, "template_error", detail) from None
            state.stop("template_error", detail)
            return None
        if len(prompt) > self.max_prompt_tokens:
            state.stop("prompt_too_long", f"assistant turn {state.turn + 1}: the prompt has {len(prompt)} tokens, "
                       f"more than {self.max_prompt_tokens} (--max-model-len minus --max-new-tokens)")
            return None
        return prompt
