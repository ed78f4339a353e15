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
  checked on every conversation and a template that breaks it raises :class:`ChatTemplateError`
  instead of producing a wrong mask. The full text is tokenized once (``add_special_tokens=False``:
  templates write their own BOS) and a token is supervised when its character span overlaps an
  assistant span, so a token straddling a boundary counts as assistant output (the same rule
  ``transformers`` applies to generation blocks).

Both ways need a fast (Rust) tokenizer for character offsets. Samples are truncated to
``seq_length`` tokens after masking.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import numpy as np
import torch
from tqdm.auto import tqdm

from draftcache.data.records import BadRecordError, Conversation, NoConversationsError, SkipCounts

__all__ = [
    "ChatTemplateError",
    "ChatTokenizer",
    "TokenizedSample",
    "tokenize_all",
]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Show a progress bar by default from this many conversations on.
_PROGRESS_MIN = 1000


class ChatTemplateError(ValueError):
    """The chat template cannot yield an exact assistant mask (a template problem, not a data one)."""


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


class ChatTokenizer:
    """Tokenize conversations with ``tokenizer``'s chat template (or ``chat_template``: a Jinja
    string or the name of one of the tokenizer's templates) into samples of at most ``seq_length``.
    """

    def __init__(self, tokenizer: Any, seq_length: int, *, chat_template: str | None = None) -> None:
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 2:
            raise ValueError(f"seq_length must be an integer >= 2; got {seq_length!r}")
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
                f"template ({exc}); pass one with chat_template=... or set tokenizer.chat_template"
            ) from None
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.chat_template: str = template
        self.mask_method = "generation_tags" if _GENERATION_TAG.search(template) else "prefix_spans"

    def identity(self) -> dict[str, Any]:
        """What decides the tokens and masks, for a cache manifest."""
        return {
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
            "seq_length": self.seq_length,
            "mask_method": self.mask_method,
            "chat_template_sha256": hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest(),
        }

    def encode(self, conversation: Conversation) -> TokenizedSample:
        """Tokenize one conversation, truncated to ``seq_length``.

        Raises ``jinja2.TemplateError`` when the template refuses the conversation and
        :class:`ChatTemplateError` when the ``prefix_spans`` check fails.
        """
        messages = conversation.messages
        if self.mask_method == "generation_tags":
            out = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids = np.asarray(out["input_ids"], dtype=np.int64)
            mask = np.asarray(out["assistant_masks"], dtype=np.int64)
        else:
            try:
                ids, mask = self._encode_prefix_spans(messages, conversation.source)
            except ChatTemplateError:
                # Templates that print today's date (strftime_now) differ between two renderings
                # made across midnight; a real prefix problem fails again.
                ids, mask = self._encode_prefix_spans(messages, conversation.source)
        return TokenizedSample(
            input_ids=torch.from_numpy(ids[: self.seq_length].copy()),  # [S] int64
            loss_mask=torch.from_numpy(mask[: self.seq_length].copy()),  # [S] int64
            source=conversation.source,
        )

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not messages:
            # apply_chat_template refuses an empty list; the header before a leading assistant
            # turn still comes from the template itself.
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
                    f"{longer[at:at + 40]!r}), so the assistant tokens cannot be located exactly. Use a chat template "
                    "that marks assistant output with {% generation %} ... {% endgeneration %} (chat_template=...)"
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


def tokenize_all(
    conversations: Sequence[Conversation],
    chat_tokenizer: ChatTokenizer,
    skipped: SkipCounts,
    strict: bool = False,
    *,
    progress: bool | None = None,
) -> list[TokenizedSample]:
    """Tokenize every conversation; count the ones the template refuses (``template_error``) or
    that keep no supervised target after truncation (``no_supervised_tokens``) in ``skipped``,
    or raise :class:`BadRecordError` at the first one when ``strict``.

    A sample needs a 1 in ``loss_mask[1:]``: after the EAGLE shift position 0 is never a target.
    ``progress=None`` shows a bar from 1000 conversations on. Raises
    :class:`NoConversationsError` when conversations were given and none survives.
    """
    show = len(conversations) >= _PROGRESS_MIN if progress is None else progress
    samples: list[TokenizedSample] = []
    for conversation in tqdm(conversations, desc="tokenizing", unit="conv", disable=not show):
        try:
            sample = chat_tokenizer.encode(conversation)
        except jinja2.TemplateError as exc:
            reason, detail = "template_error", f"the chat template raised: {exc}"
        else:
            if bool(sample.loss_mask[1:].any()):
                samples.append(sample)
                continue
            reason = "no_supervised_tokens"
            detail = (
                f"no assistant token within the first {chat_tokenizer.seq_length} tokens; "
                "raise --seq-length or shorten the prompt"
            )
        if strict:
            raise BadRecordError(conversation.source, reason, detail)
        skipped.add(reason, conversation.source)
    if conversations and not samples:
        raise NoConversationsError(f"no conversation survived tokenization ({skipped.summary()})")
    return samples
