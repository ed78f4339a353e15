"""Training-time test (TTT): the EAGLE-3 multi-step draft loss.

Inputs follow the shift contract of ``docs/DESIGN.md``: slot ``t`` carries the unshifted aux
feature ``h_t``, the next token ``input_ids[t] = x_{t+1}``, and the target's distribution at
position ``t + 1`` (``target_probs[t]``, masked by ``position_mask[t]``).

Step ``k`` (0-based) simulates the draft's ``k``-th chained prediction from slot ``t``:

* tokens, ``loss_mask``, ``target_probs`` and ``position_mask`` are shifted left by ``k`` in
  total (zero-filled), so step ``k`` at slot ``t`` reads ``x_{t+1+k}`` and is scored against
  the target's distribution at position ``t + 1 + k`` (``target_probs`` is read as the view
  ``target_probs[:, k:]`` over slots ``[0, T - k)``: its zero-filled tail would supervise nothing);
* the hidden input is the previous step's output at the *same* slot ``t`` (not shifted): slot
  ``t``'s chain keeps its own state, exactly as SpecForge / NeMo / the EAGLE-3 reference feed
  ``hidden_states`` from one step to the next without moving it. It is what vLLM feeds back: the
  pre-norm output, or ``norm(out)`` under ``norm_output`` (EAGLE-3.1), see
  :attr:`~draftcache.trainer.eagle3.model.Eagle3Output.hidden_states`;
* RoPE positions are ``position_ids + k`` (the k-th drafted token sits k places further on);
* the query at slot ``t`` attends to the step-0 keys of slots ``<= t`` (causal, inside its
  document when packed, never a padding key) plus the keys that steps ``1..k`` produced at
  slot ``t`` itself: one "diagonal" key per step. See :class:`~draftcache.trainer.eagle3.model.Eagle3KVCache`.

P-EAGLE (``config.parallel_drafting``): every slot ``t`` is an anchor and step ``k >= 1`` is its
mask slot at depth ``k``, as vLLM serves it: the token is ``mask_token_id`` and the hidden input is
``combine_hidden_states(mask_hidden)`` (no output of an earlier step is fed back), at position
``t + k``, attending the anchor's context (slots ``<= t``) and the anchor's mask slots of depth
``<= k`` (the same diagonal keys), scored against ``target_probs`` at ``t + k`` (anchor + depth).

Per-step loss is the soft cross-entropy ``-(position_mask * target_probs * log_softmax(logits)).sum(-1)``
averaged over the step's valid positions (``position_mask.sum()``, at least 1), NeMo's choice.
SpecForge instead divides by all ``B*T`` slots, which makes the loss scale with the padding
fraction and shrink for later steps; averaging over valid positions keeps every step's loss a
per-token quantity. The total is ``sum_k w^k L_k / sum_k w^k`` with ``w = step_weight``.

Per-step accuracy counts over the step's *supervised* slots (``loss_mask`` after the shift, and
``k < doc_remaining`` in packed rows), as SpecForge does: a slot whose target argmax lies outside
the draft vocabulary is a miss, because the draft cannot propose that token. The accuracy over
``position_mask`` slots only (target argmax inside the draft vocabulary) is kept as
``acc_in_draft_vocab``; it ignores those slots and so overstates what serving will accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from draftcache.targets.supervision import compute_target_distribution, shift_left_with_zero
from draftcache.trainer.eagle3.model import (
    Eagle3DraftModel,
    Eagle3KVCache,
    build_attention_mask,
    document_layout,
)
from draftcache.trainer.vocab_loss import LOGITS_CHUNK_ELEMENTS, chunked_soft_cross_entropy

__all__ = ["TTTOutput", "ttt_forward", "simulated_acceptance_length"]


@dataclass
class TTTOutput:
    """Result of :func:`ttt_forward`.

    Attributes:
        loss: scalar, weighted mean of the per-step losses (what to backpropagate).
        losses: ``[K]`` per-step mean loss over that step's valid positions.
        loss_sums: ``[K]`` per-step summed loss (divide the all-reduced sums by ``valid``).
        correct: ``[K]`` int64 count of valid positions where the draft argmax equals the
            target argmax over the draft vocabulary (the draft's token is the target's).
        valid: ``[K]`` int64 count of valid positions (``position_mask`` after the shift: supervised
            and the target argmax in the draft vocabulary); the loss averages over these.
        supervised: ``[K]`` int64 count of supervised positions (``loss_mask`` after the shift,
            gated by ``doc_remaining``), whatever the target argmax; ``valid <= supervised``.
        logits: per-step ``[B, T, Vd]`` draft logits when ``return_logits`` was set.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    loss_sums: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    supervised: torch.Tensor
    logits: list[torch.Tensor] | None = None

    @property
    def accuracies(self) -> torch.Tensor:
        """``[K]`` per-step accuracy over supervised positions (``correct / supervised``): a target
        outside the draft vocabulary counts as a miss. 0 where a step supervised nothing."""
        return self.correct.float() / self.supervised.clamp(min=1).float()

    @property
    def acc_in_draft_vocab(self) -> torch.Tensor:
        """``[K]`` accuracy over positions whose target is in the draft vocabulary only
        (``correct / valid``); an upper bound of :attr:`accuracies`."""
        return self.correct.float() / self.valid.clamp(min=1).float()


def simulated_acceptance_length(acc_per_step: Sequence[float] | torch.Tensor) -> float:
    """``1 + sum_k prod_{j<=k} acc_j``: expected tokens per verify step of a chain draft
    accepting step ``k`` with probability ``acc_k`` (the ``1`` is the target's bonus token)."""
    acc = torch.as_tensor(acc_per_step, dtype=torch.float64).flatten()
    if bool(((acc < 0) | (acc > 1)).any()):
        raise ValueError(f"per-step accuracies must lie in [0, 1], got {acc.tolist()}")
    return float(1.0 + torch.cumprod(acc, dim=0).sum())


def _check_shape(name: str, tensor: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if tensor is not None and tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")


def ttt_forward(
    model: Eagle3DraftModel,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    target_probs: torch.Tensor | None = None,
    position_mask: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
    ttt_steps: int = 7,
    step_weight: float = 0.8,
    return_logits: bool = False,
    logits_chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> TTTOutput:
    """Run ``ttt_steps`` chained draft steps over a batch and score each against the target.

    Args:
        model: the draft.
        input_ids: ``[B, T]`` shifted tokens (slot ``t`` holds ``x_{t+1}``).
        attention_mask: ``[B, T]`` unshifted, 1 = real token; 0 keys are never attended.
        loss_mask: ``[B, T]`` shifted 0/1 supervision mask.
        aux_hidden_states: ``[B, T, num_aux * H_t]`` unshifted target features.
        target_probs: ``[B, T, Vd]`` shifted target distribution over the draft vocabulary
            (cached path). Give exactly one of ``target_probs`` and ``logits``.
        position_mask: ``[B, T, 1]`` (or ``[B, T]``) bool, shifted; default ``loss_mask``.
            Pass the mask from ``compute_target_distribution`` with a reduced vocabulary.
        logits: ``[B, T, V]`` shifted full-vocab target logits (online path), projected with
            ``compute_target_distribution`` using the model's ``selected_token_ids`` and ``t2d``.
        position_ids: ``[B, T]`` step-0 RoPE positions; default ``arange(T)``, per document
            when ``seq_lens`` is given.
        seq_lens: ``[B, D]`` packed document lengths summing to ``T`` per row.
        doc_remaining: ``[B, T]`` tokens after ``t`` in its document; step ``k`` supervises
            slot ``t`` only if ``k < doc_remaining[t]``. Derived from ``seq_lens`` if omitted.
        ttt_steps: number of chained steps ``K`` (EAGLE-3: 7).
        step_weight: per-step loss weight base (``w^k``).
        return_logits: keep every step's logits in the output (memory: ``K*B*T*Vd``).
        logits_chunk_elements: logits per chunk of the loss (:mod:`draftcache.trainer.vocab_loss`);
            the ``[B, T, Vd]`` logits are never alive at once unless ``return_logits``.
    """
    if ttt_steps < 1:
        raise ValueError(f"ttt_steps must be >= 1, got {ttt_steps}")
    if step_weight <= 0:
        raise ValueError(f"step_weight must be > 0, got {step_weight}")
    if (target_probs is None) == (logits is None):
        raise ValueError("pass exactly one of target_probs (cached supervision) and logits (online supervision)")
    if logits is not None and position_mask is not None:
        raise ValueError("position_mask is computed from logits on the online path; do not pass both")
    cfg = model.config
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    _check_shape("attention_mask", attention_mask, (batch, seq))
    _check_shape("loss_mask", loss_mask, (batch, seq))
    _check_shape("aux_hidden_states", aux_hidden_states, (batch, seq, cfg.num_aux_layers * cfg.target_hidden_size))
    _check_shape("target_probs", target_probs, (batch, seq, cfg.draft_vocab_size))
    _check_shape("logits", logits, (batch, seq, cfg.target_vocab_size))
    _check_shape("position_ids", position_ids, (batch, seq))
    _check_shape("doc_remaining", doc_remaining, (batch, seq))
    if position_mask is not None:
        if position_mask.dim() == 2:
            position_mask = position_mask.unsqueeze(-1)
        _check_shape("position_mask", position_mask, (batch, seq, 1))
    device = input_ids.device

    if logits is not None:
        with torch.no_grad():
            target_probs, position_mask = compute_target_distribution(
                logits, loss_mask, model.selected_token_ids, model.t2d
            )
    elif position_mask is None:
        position_mask = loss_mask.bool().unsqueeze(-1)

    if seq_lens is not None:
        _, doc_positions, doc_left = document_layout(seq_lens.to(device), seq)
        if position_ids is None:
            position_ids = doc_positions
        if doc_remaining is None:
            doc_remaining = doc_left
    if position_ids is None:
        position_ids = torch.arange(seq, device=device).expand(batch, seq)
    mask = build_attention_mask(attention_mask, seq_len=seq, batch_size=batch, seq_lens=seq_lens, device=device)

    cache = Eagle3KVCache()
    hidden = model.combine_hidden_states(aux_hidden_states)  # [B, T, H]
    parallel = cfg.parallel_drafting
    ids, pmask, lmask = input_ids, position_mask.bool(), loss_mask.bool()
    step_losses, step_sums, step_correct, step_valid, step_supervised, kept = [], [], [], [], [], []
    for step in range(ttt_steps):
        if step > 0:
            pmask = shift_left_with_zero(pmask)
            lmask = shift_left_with_zero(lmask)
            if parallel:  # mask slot of depth ``step`` after every anchor
                ids = torch.full_like(input_ids, cfg.mask_token_id)
                hidden = model.mask_hidden_state().expand(batch, seq, -1)
            else:
                ids = shift_left_with_zero(ids)
        out = model.forward_step(ids, hidden, position_ids=position_ids + step, mask=mask, cache=cache,
                                 logits=return_logits)
        hidden = out.hidden_states  # chain: slot t keeps its own state

        valid, supervised = pmask, lmask  # [B, T, 1], [B, T]
        if doc_remaining is not None:
            in_doc = doc_remaining.to(device) > step  # [B, T]: slot t + step is still in t's document
            valid = valid & in_doc.unsqueeze(-1)
            supervised = supervised & in_doc
        # Target probs shifted by ``step`` are the view target_probs[:, step:] against slots [0, T - step):
        # the shifted-in zero tail supervises nothing, and no [B, T, Vd] copy is made or kept per step.
        rows = max(seq - step, 0)
        probs = target_probs[:, step:]  # [B, rows, Vd]
        # soft CE in at least fp32; the [B, rows, Vd] logits exist one chunk of slots at a time
        ce, predicted = chunked_soft_cross_entropy(out.normed_hidden_states[:, :rows], model.lm_head, probs, dim=1,
                                                   vocab_size=cfg.draft_vocab_size,
                                                   chunk_elements=logits_chunk_elements)
        weight = valid[:, :rows].squeeze(-1).to(ce.dtype)  # [B, rows]
        per_slot = ce * weight  # [B, rows]
        loss_sum = per_slot.sum()
        count = weight.sum()
        step_sums.append(loss_sum)
        step_losses.append(loss_sum / count.clamp(min=1))
        with torch.no_grad():
            hit = (predicted == probs.argmax(-1)) & valid[:, :rows].squeeze(-1)
            step_correct.append(hit.sum())
            step_valid.append(valid.sum())
            step_supervised.append(supervised.sum())
        if return_logits:
            kept.append(out.logits)

    losses = torch.stack(step_losses)
    weights = step_weight ** torch.arange(ttt_steps, dtype=losses.dtype, device=losses.device)
    return TTTOutput(
        loss=(weights * losses).sum() / weights.sum(),
        losses=losses,
        loss_sums=torch.stack(step_sums),
        correct=torch.stack(step_correct).to(torch.int64),
        valid=torch.stack(step_valid).to(torch.int64),
        supervised=torch.stack(step_supervised).to(torch.int64),
        logits=kept if return_logits else None,
    )
