"""DFlash training objective: anchor sampling, block labels, position-decayed cross-entropy.

Supervision is the TARGET's argmax, not the data token: ``target_argmax[t]`` is the target's
greedy choice for position ``t + 1`` given ``x_{<=t}``. Greedy verification accepts a draft
token exactly when it equals that argmax, so the argmax is what acceptance rewards (a data
token the target would not have produced can never be accepted at temperature 0).

For an anchor at slot ``p`` the block slot ``k >= 1`` predicts position ``p + k`` and its
label is ``target_argmax[p + k - 1]``; the slot counts iff ``p + k`` is in the anchor's
document and ``loss_mask[p + k]`` is set. Slot ``k`` weighs ``exp(-(k - 1) / decay)``
(NeMo's recipe: ``decay = 7``): a later slot only matters if every earlier one was accepted.
The loss is the weighted mean over counted slots.

DSpark (``markov_rank > 0``, vLLM's ``sample_from_anchor`` layout) shifts this by one: slot
``k >= 0`` predicts position ``p + k + 1`` (label ``target_argmax[p + k]``), weighs
``exp(-k / decay)``, and its logits get the Markov bias of the token at ``p + k``, teacher-forced:
the anchor for slot 0, the previous slot's label after (the data token where that label is not
counted). With ``confidence_weight > 0`` and a confidence head, a binary cross-entropy trains the
head towards whether the slot's argmax equals its label (greedy acceptance given an accepted
prefix). With ``target_logits`` (online: the co-located target's logits) and ``distribution_weight = w > 0``
the per-slot loss is ``(1 - w) * CE(label) + w * soft-CE(softmax(target_logits[q - 1]))`` for the
slot predicting position ``q`` (the distribution term; DeepSpec and NeMo weigh an L1 distance to the
target distribution 0.9 against 0.1 CE). From a ``hidden`` cache the target's logits are
``target_lm_head(target_final_hidden[q - 1])`` instead. Either way they are taken, softmaxed and
scored one chunk of slots at a time: the ``[N, V]`` target distribution is never built whole.
In general: slot ``k`` predicts offset ``j = k + 1 - first_draft_slot`` from the anchor.

Anchors are drawn uniformly without replacement among supervised slots (``loss_mask[p]``,
in-document position ``>= 1`` so the context is never empty, and at least one slot left in
the document), up to ``num_anchors`` per row (NeMo: 512).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draftcache.trainer.dflash.model import ATTENTION_CHUNK_ELEMENTS, DFlashDraftModel, build_dflash_blocks
from draftcache.trainer.layers import document_layout
from draftcache.trainer.vocab_loss import LOGITS_CHUNK_ELEMENTS, chunked_cross_entropy, chunked_soft_cross_entropy

__all__ = [
    "DFLASH_LOSS_DECAY",
    "DFlashLossOutput",
    "dflash_block_labels",
    "dflash_loss",
    "dflash_position_weights",
    "markov_prev_tokens",
    "sample_anchors",
    "target_distribution",
]

DFLASH_LOSS_DECAY = 7.0


def _layout(batch: int, seq: int, seq_lens: torch.Tensor | None, device: torch.device):
    if seq_lens is None:
        seq_lens = torch.full((batch, 1), seq, dtype=torch.int64, device=device)
    return document_layout(seq_lens.to(device), seq)


def dflash_position_weights(block_size: int, decay: float = DFLASH_LOSS_DECAY, first_slot: int = 1) -> torch.Tensor:
    """``[Bk]`` float32: ``exp(-(j - 1) / decay)`` for the slot predicting offset ``j = k + 1 - first_slot``
    (DFlash, ``first_slot = 1``: ``0`` for the anchor slot)."""
    j = torch.arange(block_size, dtype=torch.float32) + 1 - first_slot
    return torch.where(j >= 1, torch.exp(-(j - 1) / decay), torch.zeros_like(j))


def sample_anchors(
    loss_mask: torch.Tensor,
    *,
    num_anchors: int,
    seq_lens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` anchor slots per row, sorted: ``positions [B, A]`` int64, ``valid [B, A]`` bool.

    ``A = min(num_anchors, most candidates in any row)`` (at least 1); rows with fewer
    candidates are padded with slot 0 and ``valid = False``.
    """
    batch, seq = loss_mask.shape
    device = loss_mask.device
    _, positions, remaining = _layout(batch, seq, seq_lens, device)
    candidate = loss_mask.bool() & (positions >= 1) & (remaining >= 1)
    if attention_mask is not None:
        candidate = candidate & attention_mask.bool()
    count = int(candidate.sum(-1).max().item()) if batch else 0
    width = max(1, min(int(num_anchors), count))
    scores = torch.rand(batch, seq, generator=generator, device="cpu").to(device)
    scores = scores.masked_fill(~candidate, -1.0)
    top, slots = scores.topk(width, dim=-1)
    valid = top >= 0
    slots = torch.where(valid, slots, torch.full_like(slots, seq))  # padding sorts last
    slots, order = slots.sort(-1)
    valid = valid.gather(1, order)
    return torch.where(valid, slots, torch.zeros_like(slots)), valid


def dflash_block_labels(
    target_argmax: torch.Tensor,
    loss_mask: torch.Tensor,
    anchor_positions: torch.Tensor,
    anchor_valid: torch.Tensor,
    *,
    block_size: int,
    seq_lens: torch.Tensor | None = None,
    first_slot: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels [B, A, Bk]`` int64 and ``label_mask [B, A, Bk]`` bool; slot ``k`` predicts position
    ``p + k + 1 - first_slot`` (DFlash, ``first_slot = 1``: slot 0 never counts; DSpark: 0)."""
    batch, seq = target_argmax.shape
    device = target_argmax.device
    _, _, remaining = _layout(batch, seq, seq_lens, device)
    j = torch.arange(block_size, device=device) + 1 - first_slot  # offset each slot predicts
    predicted = anchor_positions[:, :, None] + j  # [B, A, Bk] slot each block position predicts
    in_doc = (j >= 1) & (j <= remaining.gather(1, anchor_positions)[:, :, None])
    clamped = predicted.clamp(max=seq - 1)
    label_slots = (predicted - 1).clamp(min=0, max=seq - 1)
    labels = target_argmax.gather(1, label_slots.flatten(1)).view_as(predicted)
    supervised = loss_mask.bool().gather(1, clamped.flatten(1)).view_as(predicted)
    return labels, in_doc & supervised & anchor_valid[:, :, None]


@dataclass
class DFlashLossOutput:
    """Loss and block metrics of one batch.

    Attributes:
        loss: scalar, weighted mean cross-entropy over counted slots.
        correct: ``[Bk]`` counted slots whose draft argmax equals the label, per block position.
        counted: ``[Bk]`` counted slots per block position (DFlash: slot 0 is always 0).
        accept_length_sum: sum over valid anchors of ``1 + leading correct slots`` (greedy
            acceptance simulated on the training blocks; stops at the first wrong or uncounted slot).
        num_blocks: valid anchors.
    """

    loss: torch.Tensor
    correct: torch.Tensor
    counted: torch.Tensor
    accept_length_sum: float
    num_blocks: int


def dflash_loss(
    model: DFlashDraftModel,
    *,
    target_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    target_argmax: torch.Tensor,
    loss_mask: torch.Tensor,
    anchor_positions: torch.Tensor,
    anchor_valid: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    decay: float = DFLASH_LOSS_DECAY,
    confidence_weight: float = 0.0,
    target_logits: torch.Tensor | None = None,
    target_final_hidden: torch.Tensor | None = None,
    target_lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distribution_weight: float = 0.0,
    attention_chunk_elements: int = ATTENTION_CHUNK_ELEMENTS,
    logits_chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> DFlashLossOutput:
    """Forward the draft on the given anchors' blocks and score them against the target's argmax.

    Args:
        target_hidden: ``[B, S, n*H_t]`` concatenated target features (unshifted).
        input_ids / target_argmax / loss_mask: ``[B, S]``; ``target_argmax[t]`` predicts ``t + 1``.
        anchor_positions / anchor_valid: ``[B, A]`` from :func:`sample_anchors`.
        seq_lens: ``[B, D]`` document lengths of packed rows, or None (one document per row).
        confidence_weight: DSpark with a confidence head: weight of its binary cross-entropy.
        target_logits / distribution_weight: ``[B, S, V]`` the target's logits (``[t]`` predicts
            ``t + 1``, unshifted as ``target_argmax``) and the weight ``w`` of the distribution term.
        target_final_hidden / target_lm_head: instead of ``target_logits`` (a ``hidden`` cache):
            ``[B, S, H_t]`` the target's final hidden states, aligned as ``target_argmax``, and
            ``[..., H_t] -> [..., V]`` fp32 logits (``CacheReader.logits_from_final_hidden``),
            applied to one chunk of counted slots at a time.
        attention_chunk_elements / logits_chunk_elements: memory budgets of the attention's
            anchor chunks and of the vocabulary projection's row chunks (results do not depend
            on them): the ``[N, V]`` fp32 logits are never alive at once.
    """
    config = model.config
    batch, seq = input_ids.shape
    _, positions, _ = _layout(batch, seq, seq_lens, input_ids.device)
    blocks = build_dflash_blocks(input_ids, anchor_positions, anchor_valid, block_size=config.block_size,
                                 mask_token_id=config.mask_token_id, seq_lens=seq_lens,
                                 attention_mask=attention_mask)
    hidden = model(target_hidden, positions, blocks, attention_chunk_elements=attention_chunk_elements)  # [B, A, Bk, H]
    first = config.first_draft_slot
    labels, label_mask = dflash_block_labels(target_argmax, loss_mask, anchor_positions, anchor_valid,
                                             block_size=config.block_size, seq_lens=seq_lens, first_slot=first)
    weights = dflash_position_weights(config.block_size, decay, first).to(hidden.device)
    slot_weights = weights.expand_as(label_mask)[label_mask]  # [N]
    rows, project = hidden[label_mask], model.compute_logits
    if config.is_dspark:
        prev = markov_prev_tokens(input_ids, labels, label_mask, anchor_positions)  # [B, A, Bk]
        rows, project = model.markov_rows(hidden, prev)[label_mask], model.compute_markov_logits
    # [N] over counted slots only, the [N, V] logits in row chunks
    ce, predicted = chunked_cross_entropy(rows, project, labels[label_mask],
                                          vocab_size=model.config.vocab_size, chunk_elements=logits_chunk_elements)
    if distribution_weight > 0:
        to_probs = target_distribution(target_logits=target_logits, target_final_hidden=target_final_hidden,
                                       target_lm_head=target_lm_head)
        label_slots = (anchor_positions[:, :, None] + torch.arange(config.block_size, device=hidden.device)
                       - first).clamp(min=0, max=seq - 1)  # t = q - 1 for the slot predicting q
        flat_slots = torch.arange(batch, device=hidden.device)[:, None, None] * seq + label_slots  # [B, A, Bk]
        soft, _ = chunked_soft_cross_entropy(rows[None], project, flat_slots[label_mask][None],
                                             vocab_size=config.vocab_size, to_probs=to_probs,
                                             chunk_elements=logits_chunk_elements)
        ce = (1 - distribution_weight) * ce + distribution_weight * soft[0]
    total = slot_weights.sum()
    loss = (ce * slot_weights).sum() / total.clamp(min=torch.finfo(total.dtype).tiny)
    hit = torch.zeros_like(label_mask)
    hit[label_mask] = predicted == labels[label_mask]
    if model.confidence_head is not None and confidence_weight > 0 and rows.shape[0]:
        h = config.hidden_size
        logit = model.confidence_head(rows[:, :h], rows[:, h:])  # [N]
        bce = F.binary_cross_entropy_with_logits(logit, hit[label_mask].float())
        loss = loss + confidence_weight * bce
    with torch.no_grad():
        correct = hit.sum((0, 1))
        counted = label_mask.sum((0, 1))
        leading = torch.cumprod(hit[..., first:].long(), dim=-1).sum(-1)  # [B, A]
        accept = float((1 + leading)[anchor_valid].sum().item())
    return DFlashLossOutput(
        loss=loss,
        correct=correct,
        counted=counted.to(correct.dtype),
        accept_length_sum=accept,
        num_blocks=int(anchor_valid.sum().item()),
    )


def target_distribution(
    *,
    target_logits: torch.Tensor | None = None,
    target_final_hidden: torch.Tensor | None = None,
    target_lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The distribution term's ``to_probs`` (:func:`~draftcache.trainer.vocab_loss.chunked_soft_cross_entropy`):
    flat slots ``b * S + t`` ``[..., n]`` -> ``[..., n, V]`` fp32 ``softmax`` of the target's logits at
    those slots, read from ``target_logits [B, S, V]`` or computed as ``target_lm_head(target_final_hidden
    [B, S, H_t])`` for those slots only."""
    if (target_logits is None) == (target_final_hidden is None):
        raise ValueError("distribution_weight > 0 needs exactly one of the target's logits (online training) and "
                         "its final hidden states (a --supervision hidden cache)")
    if target_final_hidden is not None and target_lm_head is None:
        raise ValueError("target_final_hidden needs target_lm_head (the cache's lm_head) to give the target's logits")
    if target_logits is not None:
        flat = target_logits.reshape(-1, target_logits.shape[-1])  # [B*S, V], a view
        return lambda slots: torch.softmax(flat[slots].float(), dim=-1)
    flat = target_final_hidden.reshape(-1, target_final_hidden.shape[-1])  # [B*S, H_t]
    return lambda slots: torch.softmax(target_lm_head(flat[slots]).float(), dim=-1)


def markov_prev_tokens(input_ids: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor,
                       anchor_positions: torch.Tensor) -> torch.Tensor:
    """DSpark's teacher-forced Markov input ``[B, A, Bk]`` (``sample_from_anchor`` layout): the token
    at ``p + k`` for slot ``k`` -- the anchor ``input_ids[p]`` for slot 0, else the previous slot's
    label (the target's greedy token, what an accepted prefix holds), or the data token at ``p + k``
    where that label is not counted (the slot is then usually not counted either)."""
    batch, seq = input_ids.shape
    k = torch.arange(labels.shape[-1], device=labels.device)
    data = input_ids.gather(1, (anchor_positions[:, :, None] + k).clamp(max=seq - 1).flatten(1)).view_as(labels)
    prev_label = torch.cat([data[..., :1], labels[..., :-1]], dim=-1)
    prev_counted = torch.cat([torch.zeros_like(label_mask[..., :1]), label_mask[..., :-1]], dim=-1)
    return torch.where(prev_counted, prev_label, data)
