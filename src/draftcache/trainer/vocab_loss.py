"""Cross-entropy over a large vocabulary without the full ``[N, V]`` logits alive at once.

Both draft families score hidden states through a vocabulary projection (DFlash: the target's
frozen lm_head over 128k ids; EAGLE-3: the draft's own lm_head over the draft vocabulary). Done
in one go, the fp32 logits, their softmax and their gradient are each ``N * V * 4`` bytes (3.9 GB
for 7,680 DFlash block slots at a 128,256 vocabulary). Here the rows are split into chunks along
``dim`` and every chunk runs under activation checkpointing: its logits exist only while that
chunk's loss is computed in the forward, and again while its gradient is computed in the backward
(one extra projection per chunk). Peak memory of the loss is then ``O(chunk * V)``, independent
of ``N``; results are those of the unchunked computation (same ops per row, fp32 loss). When all
rows fit in one chunk the loss runs plainly: it is within the budget already, and small runs skip
the recompute (and torch's checkpoint machinery, whose first use imports ``torch._dynamo``).

The soft cross-entropy's target distribution obeys the same budget when it is given as something
smaller than ``[N, V]`` probabilities (DFlash's distribution term: row indices into the target's
logits, or into its final hidden states that the cache's lm_head projects): ``to_probs`` turns each
chunk of it into that chunk's probabilities inside the chunk, so they too are alive one chunk at a
time (recomputed with the chunk in the backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["LOGITS_CHUNK_ELEMENTS", "chunked_cross_entropy", "chunked_soft_cross_entropy"]

# logits elements per chunk (fp32: 256 MiB); the gradient's softmax needs about three such buffers, four
# with a ``to_probs`` target (its probabilities; measured 1.08 GB at V 128,256)
LOGITS_CHUNK_ELEMENTS = 1 << 26

Project = Callable[[torch.Tensor], torch.Tensor]  # hidden [..., H] -> logits [..., V]
ToProbs = Callable[[torch.Tensor], torch.Tensor]  # a chunk of the target [..., X] -> its probabilities [..., V]


def _chunk_len(hidden: torch.Tensor, dim: int, vocab: int, chunk_elements: int) -> int:
    others = hidden[..., 0].numel() // max(1, hidden.shape[dim])  # rows per index along ``dim``
    return max(1, chunk_elements // max(1, vocab * others))


def _run_chunks(fn, hidden: torch.Tensor, target: torch.Tensor, dim: int, size: int):
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[dim] > size
    losses, argmaxes = [], []
    for h, t in zip(hidden.split(size, dim), target.split(size, dim)):
        loss, top = checkpoint(fn, h, t, use_reentrant=False) if recompute else fn(h, t)
        losses.append(loss)
        argmaxes.append(top)
    return torch.cat(losses, dim), torch.cat(argmaxes, dim)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    project: Project,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    dim: int = 0,
    chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``cross_entropy(project(hidden).float(), labels)`` and the logits' argmax.

    Args:
        hidden: ``[..., H]`` rows to score (with ``labels.shape == hidden.shape[:-1]``).
        project: ``[..., H] -> [..., V]`` (e.g. an lm_head; may hold trainable parameters).
        labels: ``[...]`` int64 class ids.
        vocab_size: ``V``, to size the chunks.
        dim: the dimension of ``hidden`` / ``labels`` to split into chunks.

    Returns:
        ``loss [...]`` float32 (reduction none) and ``argmax [...]`` int64 of the logits.
    """

    def one(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = project(h).float()  # [..., V] of this chunk only
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        return ce.view(y.shape), logits.detach().argmax(-1)

    return _run_chunks(one, hidden, labels, dim, _chunk_len(hidden, dim, vocab_size, chunk_elements))


def chunked_soft_cross_entropy(
    hidden: torch.Tensor,
    project: Project,
    target: torch.Tensor,
    *,
    vocab_size: int,
    to_probs: ToProbs | None = None,
    dim: int = 1,
    chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row soft cross-entropy ``-(p * log_softmax(project(hidden))).sum(-1)`` against the target
    distribution ``p``: ``target`` itself, or ``to_probs(target)`` taken one chunk at a time.

    The log-softmax runs in at least fp32 (``promote_types(logits dtype, float32)``).

    Args:
        hidden: ``[B, T, H]`` (any leading dims) rows to score.
        project: ``[..., H] -> [..., V]``.
        target: ``[B, T, V]`` target probabilities (a strided view is fine: chunks are views along
            ``dim``, nothing is copied whole); with ``to_probs``, ``[B, T, ...]`` whatever it maps
            to them (e.g. ``[B, T]`` row indices into the target's logits).
        vocab_size: ``V``, to size the chunks.
        to_probs: a chunk of ``target`` ``[.., t, ..]`` -> its probabilities ``[.., t, .., V]``, run
            per chunk without gradients and outside autocast (the target's math, not the draft's
            mixed precision), so the ``[B, T, V]`` probabilities are never alive at once.
        dim: the dimension to split into chunks (default the sequence dim of ``[B, T, ...]``).

    Returns:
        ``loss [B, T]`` in at least fp32 and ``argmax [B, T]`` int64 of the logits.
    """

    def one(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = t
        if to_probs is not None:
            with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
                p = to_probs(t)  # [..., V] of this chunk only
        logits = project(h)  # [..., V] of this chunk only
        wide = torch.promote_types(logits.dtype, torch.float32)
        log_probs = F.log_softmax(logits.to(wide), dim=-1)
        return -(p.to(wide) * log_probs).sum(-1), logits.detach().argmax(-1)

    return _run_chunks(one, hidden, target, dim, _chunk_len(hidden, dim, vocab_size, chunk_elements))
