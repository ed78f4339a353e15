"""Conversation -> ``input_ids [S]`` and ``loss_mask [S]`` with the tokenizer's own chat template.

The loss mask is 1 on the tokens the assistant writes: each assistant message's text plus the
end-of-turn token the template closes it with (``<|im_end|>``, ``<|eot_id|>``, ...), never the
role header before it nor the turn separator after it. Two ways to find them, picked from the
template text:

* ``"generation_tags"``: the template marks assistant output with ``{% generation %}`` ...
  ``{% endgeneration %}``; ``transformers``' ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` returns the mask (what NeMo AutoModel uses).
* ``"prefix_spans"``: any other template. For assistant message ``i`` the span is
  ``[len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))`` in
  the characters of the whole rendering, with trailing whitespace (the turn separator) cut off.
  This is exact only if each partial rendering is a prefix of the next and of the whole; that is
  checked on every conversation and a conversation that breaks it raises
  :class:`ChatTemplateError` instead of producing a wrong mask. The full text is tokenized once
  (``add_special_tokens=False``: templates write their own BOS) and a token is supervised when
  its character span overlaps an assistant span, so a token straddling a boundary counts as
  assistant output (the same rule ``transformers`` applies to generation blocks).

Both ways need a fast (Rust) tokenizer for character offsets. Samples are truncated to
``seq_length`` tokens after masking.

Template problems, per record or per run: :class:`ChatTokenizer` renders a synthetic chat (one
user turn, one assistant turn) when it is built; a template that fails it is a run-level
:class:`ChatTemplateError` naming ``--chat-template``. After that, a template that refuses one
conversation (``raise_exception(...)``, any Jinja error, or the prefix check) makes that
conversation a ``template_error`` skip; :func:`tokenize_all` raises the run-level error only
when the template refused every conversation it was given.

:func:`tokenize_all` can spread the rendering over worker processes (``num_workers``): a spawned
pool (no fork of a process that may hold torch or CUDA state), one :class:`ChatTokenizer` per
worker built once by the pool initializer, conversations sent in ordered chunks. Results are
consumed in input order, so the samples, their order and the skip counts equal a one-process
run's exactly. This module imports torch only where a sample is built, so workers start without it.
"""

from __future__ import annotations

import multiprocessing
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Union

import jinja2
import numpy as np
from tqdm.auto import tqdm

from draftcache.data.records import BadRecordError, Conversation, NoConversationsError, SkipCounts
from draftcache.data.templates import ChatTemplateError, template_sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "ChatTemplateError",
    "ChatTokenizer",
    "TokenizedSample",
    "tokenize_all",
]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Show a progress bar by default from this many conversations (or samples asked for) on.
_PROGRESS_MIN = 1000

# Conversations per task sent to a tokenization worker, and tasks in flight per worker.
_CHUNK = 16
_INFLIGHT_PER_WORKER = 2

# The start-up probe: the smallest chat every usable template must render.
_PROBE = Conversation([{"role": "user", "content": "Hello!"},
                       {"role": "assistant", "content": "Hi! How can I help?"}], "<start-up probe: user, assistant>")

_FIX = "pass a template that works with --chat-template (the path of a Jinja file, or the template text)"

# What encoding one conversation gives: (input_ids [S], loss_mask [S]) int64 arrays, or the reason
# the template refused it.
_Outcome = Union[tuple[np.ndarray, np.ndarray], str]


@dataclass(frozen=True)
class TokenizedSample:
    """One tokenized conversation.

    Attributes:
        input_ids: ``[S]`` int64 token ids, ``S <= seq_length``, BOS included when the template writes it.
        loss_mask: ``[S]`` int64, 1 on assistant tokens. Position-aligned (unshifted): ``loss_mask[t]``
            says whether token ``t`` is assistant output.
        source: where the conversation came from (``file:line`` or ``hub:name[split]#index``).
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    source: str

    @property
    def num_supervised(self) -> int:
        return int(self.loss_mask.sum())

    @classmethod
    def from_arrays(cls, input_ids: np.ndarray, loss_mask: np.ndarray, source: str) -> "TokenizedSample":
        """From ``[S]`` int64 arrays (copied)."""
        import torch  # here, not at module level: tokenization workers never load torch

        return cls(torch.from_numpy(np.array(input_ids, dtype=np.int64)),   # [S]
                   torch.from_numpy(np.array(loss_mask, dtype=np.int64)),   # [S]
                   source)


class ChatTokenizer:
    """Tokenize conversations with ``tokenizer``'s chat template (or ``chat_template``: a Jinja
    string or the name of one of the tokenizer's templates) into samples of at most
    ``seq_length`` tokens (None: no truncation).

    Building one renders a synthetic two-turn chat; a template that fails it raises
    :class:`ChatTemplateError` (a run-level error: no conversation could be encoded).
    """

    def __init__(self, tokenizer: Any, seq_length: int | None, *, chat_template: str | None = None) -> None:
        if seq_length is not None and (isinstance(seq_length, bool) or not isinstance(seq_length, int)
                                       or seq_length < 2):
            raise ValueError(f"seq_length must be an integer >= 2 (or None); got {seq_length!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer; the loss mask needs character offsets. "
                "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        try:
            template = tokenizer.get_chat_template(chat_template)
        except ValueError as exc:
            raise ChatTemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no usable chat "
                f"template ({exc}); {_FIX}"
            ) from None
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.chat_template: str = template
        self.mask_method = "generation_tags" if _GENERATION_TAG.search(template) else "prefix_spans"
        self._probe()

    def identity(self) -> dict[str, Any]:
        """What decides the tokens and masks, for a cache manifest."""
        return {
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
            "seq_length": self.seq_length,
            "mask_method": self.mask_method,
            "chat_template_sha256": template_sha256(self.chat_template),
        }

    def encode(self, conversation: Conversation) -> TokenizedSample:
        """Tokenize one conversation, truncated to ``seq_length``.

        Raises ``jinja2.TemplateError`` when the template refuses the conversation and
        :class:`ChatTemplateError` when the ``prefix_spans`` check fails.
        """
        ids, mask = self._encode_arrays(conversation)
        return TokenizedSample.from_arrays(ids[: self.seq_length], mask[: self.seq_length], conversation.source)

    def encode_prompt(self, conversation: Conversation) -> list[int]:
        """Token ids of ``conversation.prompt_messages()`` rendered with the generation prompt (not
        truncated): what a model is asked to continue. Raises ``ValueError`` without a user turn
        and ``jinja2.TemplateError`` when the template refuses the prompt."""
        messages = conversation.prompt_messages()
        if not messages:
            raise ValueError(f"{conversation.source}: no user turn to prompt with")
        out = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=True,
                                                 return_dict=True, add_generation_prompt=True)
        return list(out["input_ids"])

    def _probe(self) -> None:
        try:
            _, mask = self._encode_arrays(_PROBE)
            prompt = self.encode_prompt(_PROBE)
        except (ChatTemplateError, jinja2.TemplateError) as exc:
            raise ChatTemplateError(f"the chat template fails on a plain chat (one user turn, one assistant turn): "
                                    f"{exc}; {_FIX}") from None
        if not mask[1:].any() or not prompt:
            raise ChatTemplateError(f"the chat template marks no assistant token in a plain chat (one user turn, one "
                                    f"assistant turn; {self.mask_method} masking); {_FIX}")

    def _encode_arrays(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """Untruncated ``(input_ids [T], loss_mask [T])`` int64."""
        messages = conversation.messages
        if self.mask_method == "generation_tags":
            out = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            )
            return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(out["assistant_masks"], dtype=np.int64)
        try:
            return self._encode_prefix_spans(messages, conversation.source)
        except ChatTemplateError:
            # Templates that print today's date (strftime_now) differ between two renderings
            # made across midnight; a real prefix problem fails again.
            return self._encode_prefix_spans(messages, conversation.source)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not messages:
            # apply_chat_template refuses an empty list; the header before a leading assistant
            # turn (a Conversation built by hand: loaders drop such turns) comes from the template.
            from transformers.utils.chat_template_utils import render_jinja_template

            return render_jinja_template(
                conversations=[[]], chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map,
            )[0][0]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_prefix_spans(self, messages: list[dict[str, str]], source: str) -> tuple[np.ndarray, np.ndarray]:
        full = self._render(messages, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            upto = self._render(messages[: i + 1], add_generation_prompt=False)
            if not upto.startswith(before) or not full.startswith(upto):
                longer, shorter = (upto, before) if not upto.startswith(before) else (full, upto)
                at = next((k for k, (a, b) in enumerate(zip(longer, shorter)) if a != b), min(len(longer), len(shorter)))
                raise ChatTemplateError(
                    f"{source}: the chat template is not prefix-stable at message {i} (assistant): rendering "
                    f"messages[:{i}] with the generation prompt, messages[:{i + 1}] and the whole conversation do not "
                    f"extend each other (first difference at character {at}: {shorter[at:at + 40]!r} vs "
                    f"{longer[at:at + 40]!r}), so the assistant tokens cannot be located exactly. Use a template that "
                    "renders each turn the same whatever follows it, or marks assistant output with "
                    "{% generation %} ... {% endgeneration %} (pass it with --chat-template)"
                )
            start, end = len(before), len(upto.rstrip())
            spans.append((start, max(start, end)))
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)  # [T]
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [T, 2] char [start, end)
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)  # [n_assistant, 2]
        # token t overlaps span j: start_t < end_j and end_t > start_j
        overlap = (offsets[:, None, 0] < bounds[None, :, 1]) & (offsets[:, None, 1] > bounds[None, :, 0])  # [T, n]
        return ids, overlap.any(axis=1).astype(np.int64)


def _attempt(chat: ChatTokenizer, conversation: Conversation) -> _Outcome:
    """Encode one conversation (truncated), or say why the template refused it."""
    try:
        ids, mask = chat._encode_arrays(conversation)
    except ChatTemplateError as exc:
        return str(exc).removeprefix(f"{conversation.source}: ")
    except jinja2.TemplateError as exc:
        return f"the chat template raised: {exc}"
    return ids[: chat.seq_length], mask[: chat.seq_length]


class _Tally:
    """Consumes encodings in input order: keeps samples, counts (or in strict mode raises on) the
    refused ones, and knows when ``limit`` samples are kept."""

    def __init__(self, chat: ChatTokenizer, skipped: SkipCounts, strict: bool, limit: int | None, bar,
                 into: Any = None) -> None:
        self.chat, self.skipped, self.strict, self.limit, self.bar = chat, skipped, strict, limit, bar
        self.samples: Any = [] if into is None else into  # a list, or anything with append() and len()
        self.attempted = 0
        self.template_errors = 0
        self.first_template_error: tuple[str, str] | None = None

    @property
    def wanted(self) -> int | None:
        """Samples still needed (None: all)."""
        return None if self.limit is None else self.limit - len(self.samples)

    def add(self, conversation: Conversation, outcome: _Outcome) -> bool:
        """Take one conversation's encoding; True once ``limit`` samples are kept."""
        self.attempted += 1
        if isinstance(outcome, str):
            reason, detail = "template_error", outcome
            self.template_errors += 1
            if self.first_template_error is None:
                self.first_template_error = (conversation.source, detail)
        else:
            ids, mask = outcome
            # after the EAGLE shift position 0 is never a target: a sample needs a 1 in loss_mask[1:]
            if mask[1:].any():
                self.samples.append(TokenizedSample.from_arrays(ids, mask, conversation.source))
                self.bar.update(1)
                return self.wanted == 0
            reason = "no_supervised_tokens"
            detail = (f"no assistant token within the first {self.chat.seq_length} tokens; raise --seq-length or "
                      "shorten the prompt") if self.chat.seq_length is not None else "no assistant token after position 0"
        if self.strict:
            raise BadRecordError(conversation.source, reason, detail)
        self.skipped.add(reason, conversation.source)
        return False


def tokenize_all(
    conversations: Iterable[Conversation],
    chat_tokenizer: ChatTokenizer,
    skipped: SkipCounts,
    strict: bool = False,
    *,
    progress: bool | None = None,
    limit: int | None = None,
    num_workers: int = 0,
    into: Any = None,
) -> list[TokenizedSample]:
    """Tokenize conversations in order until ``limit`` samples are kept (all when None).

    The kept samples are appended to ``into`` (e.g. a ``TokenStoreWriter``, so that host memory
    does not grow with the dataset), which is returned; a new list when None.

    Conversations the template refuses (``template_error``) or that keep no supervised target
    after truncation (``no_supervised_tokens``) are counted in ``skipped``, or with ``strict``
    the first raises :class:`BadRecordError`. A sample needs a 1 in ``loss_mask[1:]``: after the
    EAGLE shift position 0 is never a target.

    ``conversations`` is read lazily and never past the conversation that completes ``limit``
    samples (a lazy ``ConversationSet`` then counts exactly the records before it). With
    ``num_workers > 0`` the rendering runs in that many spawned processes (see the module
    docstring); the result equals the one-process one, errors included. ``progress=None`` shows
    a bar from 1000 conversations (or ``limit``) on.

    Raises :class:`ChatTemplateError` (naming ``--chat-template``) when the template refused
    every conversation, and :class:`NoConversationsError` when records were read and none survived.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}")
    try:
        known = len(conversations)  # type: ignore[arg-type]
    except TypeError:  # a generator or a lazily read set
        known = None
    expected = min(x for x in (known, limit) if x is not None) if (known, limit) != (None, None) else None
    show = (expected is None or expected >= _PROGRESS_MIN) if progress is None else progress
    with tqdm(total=expected, desc="tokenizing", unit="sample", disable=not show) as bar:
        tally = _Tally(chat_tokenizer, skipped, strict, limit, bar, into)
        stream = iter(conversations)
        if num_workers == 0:
            for conversation in stream:
                if tally.add(conversation, _attempt(chat_tokenizer, conversation)):
                    break
        else:
            _tokenize_in_pool(stream, chat_tokenizer, tally, num_workers)
    if not len(tally.samples):
        if tally.attempted and tally.template_errors == tally.attempted:
            source, detail = tally.first_template_error
            raise ChatTemplateError(f"the chat template refused every conversation ({tally.attempted}; the first, at "
                                    f"{source}: {detail}); {_FIX}")
        if tally.attempted:
            raise NoConversationsError(f"no conversation survived tokenization ({skipped.summary()})")
        if skipped.total:  # every record was refused while reading (a lazily read input)
            raise NoConversationsError(
                f"no valid conversation ({skipped.summary()}); each record needs a 'conversations' (ShareGPT) or "
                "'messages' (OpenAI) list with an assistant turn after a user turn"
            )
    return tally.samples


# ---- worker processes ------------------------------------------------------------------------

_WORKER: ChatTokenizer | None = None


def _init_worker(tokenizer: Any, seq_length: int | None, chat_template: str) -> None:
    global _WORKER
    _WORKER = ChatTokenizer(tokenizer, seq_length, chat_template=chat_template)


def _encode_chunk(conversations: list[Conversation]) -> list[_Outcome]:
    assert _WORKER is not None, "the pool initializer did not run"
    return [_attempt(_WORKER, c) for c in conversations]


def _tokenize_in_pool(stream: Iterator[Conversation], chat: ChatTokenizer, tally: _Tally, num_workers: int) -> None:
    """Feed ``stream`` to a spawned pool in chunks and consume the results in order.

    Never more conversations are in flight than samples are still wanted, so no conversation is
    read that a one-process run would not read. An error raised while reading (a strict-mode bad
    record, an unreadable file) is raised after the conversations read before it, as in order.
    """
    pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(chat.tokenizer, chat.seq_length, chat.chat_template))
    inflight: deque[tuple[list[Conversation], Future]] = deque()
    queued = 0
    exhausted = False
    error: Exception | None = None
    try:
        while True:
            while not exhausted and error is None and len(inflight) < _INFLIGHT_PER_WORKER * num_workers:
                wanted = tally.wanted
                size = _CHUNK if wanted is None else min(_CHUNK, wanted - queued)
                if size <= 0:
                    break
                chunk: list[Conversation] = []
                try:
                    for conversation in islice(stream, size):
                        chunk.append(conversation)
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the records read before it
                    error = exc
                exhausted = error is None and len(chunk) < size
                if chunk:
                    inflight.append((chunk, pool.submit(_encode_chunk, chunk)))
                    queued += len(chunk)
            if not inflight:
                break
            chunk, future = inflight.popleft()
            queued -= len(chunk)
            for conversation, outcome in zip(chunk, future.result()):
                if tally.add(conversation, outcome):
                    return  # nothing else is in flight: at most `wanted` conversations were
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error
