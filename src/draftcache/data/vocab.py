"""Draft vocabulary: the ``Vd`` most frequent supervised target tokens, and the d2t/t2d maps.

``target_id = draft_id + d2t[draft_id]`` (what SGLang and vLLM read from a checkpoint's ``d2t``),
``t2d[target_id]`` is True when the target token has a draft id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["DraftVocab", "count_supervised_tokens", "supervised_token_counts", "build_draft_vocab", "full_vocab",
           "special_token_ids", "select_draft_vocab"]


@dataclass(frozen=True)
class DraftVocab:
    """A draft vocabulary over a target vocabulary of size ``V``.

    Attributes:
        selected_token_ids: ``[Vd]`` int64, target ids sorted ascending; draft id ``i`` is
            ``selected_token_ids[i]``.
        d2t: ``[Vd]`` int64 offsets, ``selected_token_ids[i] - i``.
        t2d: ``[V]`` bool membership mask over the target vocabulary.
    """

    selected_token_ids: torch.Tensor
    d2t: torch.Tensor
    t2d: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.selected_token_ids.numel())

    @property
    def target_vocab_size(self) -> int:
        return int(self.t2d.numel())

    @classmethod
    def from_selected(cls, selected_token_ids: Iterable[int] | torch.Tensor, target_vocab_size: int) -> "DraftVocab":
        """Build the maps from explicit target ids (sorted and checked for range and duplicates)."""
        ids = torch.as_tensor(list(selected_token_ids) if not torch.is_tensor(selected_token_ids) else selected_token_ids,
                              dtype=torch.int64).flatten()
        ids, _ = torch.sort(ids)
        if ids.numel() == 0:
            raise ValueError("draft vocabulary is empty: pass at least one token id")
        if int(ids[0]) < 0 or int(ids[-1]) >= target_vocab_size:
            raise ValueError(
                f"draft vocabulary ids must lie in [0, {target_vocab_size}); got min {int(ids[0])}, max {int(ids[-1])}"
            )
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise ValueError("draft vocabulary has duplicate token ids; pass each id once")
        d2t = ids - torch.arange(ids.numel(), dtype=torch.int64)
        t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
        t2d[ids] = True
        return cls(selected_token_ids=ids, d2t=d2t, t2d=t2d)


def count_supervised_tokens(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Add the ids of supervised tokens (``loss_mask == 1``) to ``counts [V] int64`` and return it."""
    if counts is None:
        counts = torch.zeros(vocab_size, dtype=torch.int64)
    ids = torch.as_tensor(input_ids).flatten()[torch.as_tensor(loss_mask).flatten().bool()]
    counts += torch.bincount(ids.to(torch.int64), minlength=vocab_size)[:vocab_size]
    return counts


def supervised_token_counts(input_ids: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor],
                            vocab_size: int) -> torch.Tensor:
    """``[V]`` int64 counts of the supervised ids over many samples: one ``bincount`` over their
    concatenated supervised ids (a V-sized bincount per sample costs minutes per million samples
    at V = 128k). Equal to ``count_supervised_tokens`` applied sample by sample."""
    if not input_ids:
        return torch.zeros(vocab_size, dtype=torch.int64)
    ids = torch.cat([torch.as_tensor(i).flatten().to(torch.int64) for i in input_ids])  # [N]
    mask = torch.cat([torch.as_tensor(m).flatten().bool() for m in loss_masks])  # [N]
    return torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size].to(torch.int64)


def special_token_ids(tokenizer) -> list[int]:
    """The tokenizer's bos / eos / pad / unk ids (those it has, each once, in that order): the
    tokens every draft vocabulary of N tokens keeps (recorded in the cache manifest)."""
    ids: list[int] = []
    for name in ("bos", "eos", "pad", "unk"):
        tok = getattr(tokenizer, f"{name}_token_id", None)
        if tok is not None and int(tok) not in ids:
            ids.append(int(tok))
    return ids


def select_draft_vocab(counts: torch.Tensor, draft_vocab_size: int | None,
                       special_token_ids: Iterable[int] = ()) -> DraftVocab:
    """THE draft vocabulary for ``--draft-vocab-size`` (None: the full target vocabulary), the same
    at precompute, for an online source and when a ``hidden`` cache picks its vocabulary at
    training time: ``build_draft_vocab(counts, N, special_token_ids)``."""
    if draft_vocab_size is None:
        return full_vocab(int(counts.numel()))
    return build_draft_vocab(counts, draft_vocab_size, special_token_ids)


def build_draft_vocab(
    counts: torch.Tensor, draft_vocab_size: int, special_token_ids: Iterable[int] = ()
) -> DraftVocab:
    """Keep ``draft_vocab_size`` ids: special tokens first, then the most frequent supervised ids
    (ties broken by the lower id), then unused ids from 0 upward when the corpus has too few
    distinct tokens. The result is sorted ascending.
    """
    vocab_size = int(counts.numel())
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(
            f"draft_vocab_size must be in [1, {vocab_size}] (the target vocabulary); got {draft_vocab_size}"
        )
    chosen: list[int] = []
    seen: set[int] = set()
    for tok in special_token_ids:
        if tok is not None and 0 <= int(tok) < vocab_size and int(tok) not in seen and len(chosen) < draft_vocab_size:
            chosen.append(int(tok))
            seen.add(int(tok))
    # stable sort on -count keeps ascending id order among equal counts
    order = torch.sort(-counts.to(torch.int64), stable=True).indices
    nonzero = int((counts > 0).sum())
    for tok in order[:nonzero].tolist():
        if len(chosen) >= draft_vocab_size:
            break
        if tok not in seen:
            chosen.append(tok)
            seen.add(tok)
    tok = 0
    while len(chosen) < draft_vocab_size:
        if tok not in seen:
            chosen.append(tok)
            seen.add(tok)
        tok += 1
    return DraftVocab.from_selected(chosen, vocab_size)


def full_vocab(vocab_size: int) -> DraftVocab:
    """The identity draft vocabulary (``--draft-vocab-size`` not given)."""
    return DraftVocab.from_selected(torch.arange(vocab_size), vocab_size)
