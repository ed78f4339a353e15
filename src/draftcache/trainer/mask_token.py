"""Which token id a draft feeds at its masked slots (``mask_token_id``): DFlash's block slots after
the anchor, P-EAGLE's parallel slots after the bonus token.

Every masked slot's input is the target's (frozen) embedding row of that id, in training and in
vLLM. The row must therefore carry a signal: HF builds the embedding with
``padding_idx = pad_token_id``, so the pad row is exactly zero; a zero input makes every masked
slot's query zero after ``input_layernorm`` (uniform attention whatever the context, no gradient
to ``q_proj``/``k_proj``, identical slots), and the draft then ignores its anchor and context.

The rule, as the peers choose (NeMo AutoModel refuses a pad fallback, speculators an unset id,
z-lab and ModelOpt use a reserved row, SpecForge tries the tokenizer's mask token and unused rows
before pad), first match wins:

1. ``--mask-token-id`` when given; refused when its row is (near) zero;
2. the tokenizer's own ``mask_token`` when its row is usable;
3. the lowest special / added-special token id that is never a SUPERVISED token of the data
   and whose row is usable;
4. the lowest ordinary token id that is never a supervised token, row usable.

"Never a supervised token" reads the ``[V]`` supervised-token counts (the cache manifest's
``token_counts``; one ``bincount`` online), never the data itself: the draft embeds only its
anchors, and anchors are supervised tokens (served: tokens the target generated), so a token
absent from them never reaches the draft's embedding except as the mask.

A row is usable when its mean square exceeds the target's ``rms_norm_eps``: the draft's
``input_layernorm`` then brings it to at least ``1/sqrt(2)`` of unit RMS (an exactly zero row,
or an untrained near-zero one, stays at or near zero).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

__all__ = ["MaskTokenChoice", "choose_mask_token", "embedding_row_mean_square", "tokenizer_special_ids"]

RULES = ("given", "tokenizer_mask_token", "unused_special_token", "unused_token")


@dataclass(frozen=True)
class MaskTokenChoice:
    """The chosen mask token and why (recorded in the checkpoint and the export's ``config.json``).

    Attributes:
        token_id: the id fed at masked slots.
        token: its string in the tokenizer (None when no tokenizer was available).
        rule: one of ``RULES``: which step of the module's rule chose it.
        row_rms: RMS of the target's embedding row of ``token_id``.
        why: one sentence for people.
    """

    token_id: int
    token: str | None
    rule: str
    row_rms: float
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def embedding_row_mean_square(embeddings: torch.Tensor) -> torch.Tensor:
    """``embeddings [V, H]`` -> ``[V]`` float32 mean square of every row."""
    return embeddings.detach().float().pow(2).mean(-1)


def tokenizer_special_ids(tokenizer) -> list[int]:
    """Sorted ids of the tokenizer's special tokens: ``all_special_ids`` plus every added token
    marked special (reserved tokens such as Llama-3's ``<|reserved_special_token_N|>``)."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return sorted(ids)


def choose_mask_token(
    *,
    embeddings: torch.Tensor,
    supervised_counts: torch.Tensor,
    rms_norm_eps: float,
    special_ids: Iterable[int] = (),
    tokenizer_mask_id: int | None = None,
    given: int | None = None,
    token_name=None,
) -> MaskTokenChoice:
    """The mask token by the module's rule.

    Args:
        embeddings: ``[V, H]`` the target's input embedding table (the draft's frozen copy).
        supervised_counts: ``[V]`` how often each id is a supervised token of the training data.
        rms_norm_eps: the target's (= the draft's) RMSNorm epsilon: rows with mean square at or
            below it are unusable.
        special_ids: the tokenizer's special ids (:func:`tokenizer_special_ids`).
        tokenizer_mask_id: the tokenizer's ``mask_token_id`` (None when it has none).
        given: ``--mask-token-id``.
        token_name: ``id -> str`` for the record (e.g. ``tokenizer.convert_ids_to_tokens``).

    Raises:
        ValueError: ``given`` is out of range or its row is unusable (the message names
            ``--mask-token-id``), or no token qualifies.
    """
    vocab = int(embeddings.shape[0])
    if supervised_counts.numel() != vocab:
        raise ValueError(f"supervised token counts cover {supervised_counts.numel()} ids but the target embedding "
                         f"has {vocab} rows")
    mean_square = embedding_row_mean_square(embeddings)  # [V]
    usable = mean_square > rms_norm_eps  # [V]
    unused = supervised_counts.flatten() == 0  # [V]

    def choice(token_id: int, rule: str, why: str) -> MaskTokenChoice:
        name = token_name(token_id) if token_name is not None else None
        return MaskTokenChoice(token_id=int(token_id), token=None if name is None else str(name), rule=rule,
                               row_rms=float(mean_square[token_id].sqrt()), why=why)

    if given is not None:
        if not 0 <= int(given) < vocab:
            raise ValueError(f"--mask-token-id {given} is not a token id of the target (vocabulary [0, {vocab}))")
        if not bool(usable[given]):
            raise ValueError(
                f"--mask-token-id {given}: the target's embedding row of that token is zero or nearly so (RMS "
                f"{float(mean_square[given].sqrt()):.3g}; a pad row built with padding_idx is exactly zero), so every "
                "masked slot would feed the draft a zero vector and it would ignore its anchor and context; pass a "
                "token whose row is non-zero (an unused special or reserved token), or drop --mask-token-id to let "
                "the trainer choose one")
        used = int(supervised_counts.flatten()[given])
        return choice(given, "given", "--mask-token-id" + (f" (occurs {used} times as a supervised token)" if used
                                                           else ""))
    if tokenizer_mask_id is not None and 0 <= int(tokenizer_mask_id) < vocab and bool(usable[tokenizer_mask_id]):
        return choice(tokenizer_mask_id, "tokenizer_mask_token", "the tokenizer's mask token")
    for token_id in sorted({int(i) for i in special_ids if 0 <= int(i) < vocab}):
        if bool(unused[token_id] & usable[token_id]):
            return choice(token_id, "unused_special_token",
                          "the lowest special token id that is never a supervised token and whose embedding row is "
                          "non-zero")
    candidates = torch.nonzero(unused & usable).flatten()
    if candidates.numel():
        return choice(int(candidates[0]), "unused_token",
                      "no special token qualified: the lowest token id that is never a supervised token and whose "
                      "embedding row is non-zero")
    raise ValueError("no token can mark the masked slots: every token with a non-zero embedding row occurs as a "
                     "supervised token of the data; pass --mask-token-id with a rarely used token")
