"""The DFlash draft: Qwen3-style layers that fill a block of masked slots in one forward.

Layout (parameter names are the exported checkpoint names, as vLLM's
``DFlashQwen3ForCausalLM.load_weights`` reads them once it prefixes ``model.``)::

    fc                 Linear(n * H_t -> H)   projects the concatenated target-layer features
    hidden_norm        RMSNorm(H)             context = hidden_norm(fc(target_hidden))
    layers.i.self_attn q_proj/k_proj/v_proj/o_proj, q_norm/k_norm (per head, RMSNorm(head_dim))
    layers.i           input_layernorm, post_attention_layernorm, mlp (SwiGLU)
    norm               final RMSNorm
    embed_tokens, lm_head   frozen copies of the TARGET's (not exported: vLLM shares the
                            target's when the checkpoint has none, ``_maybe_share_*``)

A block is ``[anchor token, mask_token_id x (B - 1)]`` at positions ``p, p+1, ..., p+B-1``
where ``p`` is the anchor's position. In every layer the block's queries attend to

- the CONTEXT: keys/values ``k_norm(k_proj(context))`` / ``v_proj(context)`` (that layer's
  projections, RoPE at the context positions) of every position strictly before the anchor,
  in the anchor's document; the context is not propagated through layers (as in vLLM's
  ``precompute_and_store_context_kv``);
- its OWN block, non-causally (every slot sees every slot of its block).

Block slot ``k >= 1`` predicts the token at position ``p + k`` (vLLM samples exactly these
``B - 1`` slots). Many blocks (anchors) are trained at once; blocks never see each other.

With ``markov_rank > 0`` the same backbone is a DSpark draft (``markov.py``): every slot ``k``,
the anchor's included, predicts position ``p + k + 1`` (vLLM's ``sample_from_anchor``) and its
logits get the Markov bias of the token at ``p + k`` (see :meth:`DFlashDraftModel.slot_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.markov import DSparkConfidenceHead, MarkovHead
from draftcache.trainer.layers import RMSNorm, Rotary, SwiGLUMLP, apply_rotary
from draftcache.trainer.layers import document_layout

__all__ = ["ATTENTION_CHUNK_ELEMENTS", "DFlashDraftModel", "DFlashBlocks", "build_dflash_blocks", "dflash_context_mask"]


@dataclass
class DFlashBlocks:
    """Where the blocks of one batch sit, derived from the anchors (see :func:`build_dflash_blocks`).

    Attributes:
        input_ids: ``[B, A, Bk]`` anchor token then ``mask_token_id``.
        position_ids: ``[B, A, Bk]`` anchor position (in its document) + ``k``.
        context_mask: ``[B, A, S]`` bool, context slot ``s`` visible to block ``a``.
        anchor_valid: ``[B, A]`` bool, False for padding anchors.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    context_mask: torch.Tensor
    anchor_valid: torch.Tensor


def dflash_context_mask(
    anchor_positions: torch.Tensor,
    anchor_valid: torch.Tensor,
    doc_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, A, S]`` bool: slot ``s`` is context of the block anchored at ``anchor_positions[b, a]``.

    True iff ``s < anchor`` (strictly before: the anchor's own target features are not
    known when serving, the anchor being the token the target just emitted), ``s`` lies in
    the anchor's document, ``s`` is a real token, and the anchor is valid.
    """
    batch, seq = doc_ids.shape
    slots = torch.arange(seq, device=doc_ids.device)
    anchor_doc = doc_ids.gather(1, anchor_positions)  # [B, A]
    mask = (slots[None, None, :] < anchor_positions[:, :, None]) & (doc_ids[:, None, :] == anchor_doc[:, :, None])
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    return mask & anchor_valid[:, :, None]


def build_dflash_blocks(
    input_ids: torch.Tensor,
    anchor_positions: torch.Tensor,
    anchor_valid: torch.Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    seq_lens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> DFlashBlocks:
    """Block inputs for anchors at slots ``anchor_positions [B, A]`` of ``input_ids [B, S]``.

    ``seq_lens [B, D]`` packs several documents per row (positions restart at 0 in each);
    without it each row is one document.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    if seq_lens is None:
        doc_ids = torch.zeros(batch, seq, dtype=torch.int64, device=device)
        positions = torch.arange(seq, device=device).expand(batch, seq)
    else:
        doc_ids, positions, _ = document_layout(seq_lens.to(device), seq)
    anchor_positions = anchor_positions.to(device=device, dtype=torch.int64)
    anchor_valid = anchor_valid.to(device=device, dtype=torch.bool)
    offsets = torch.arange(block_size, device=device)
    ids = torch.full((*anchor_positions.shape, block_size), mask_token_id, dtype=input_ids.dtype, device=device)
    ids[:, :, 0] = input_ids.gather(1, anchor_positions)
    block_positions = positions.gather(1, anchor_positions)[:, :, None] + offsets  # [B, A, Bk]
    return DFlashBlocks(
        input_ids=ids,
        position_ids=block_positions,
        context_mask=dflash_context_mask(anchor_positions, anchor_valid, doc_ids, attention_mask),
        anchor_valid=anchor_valid,
    )


# scores per attention chunk (fp32: 256 MiB; the softmax and its gradient need a few such buffers)
ATTENTION_CHUNK_ELEMENTS = 1 << 26


def _block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_k: torch.Tensor,
                     context_v: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """Blocks' queries over (context) + (own block), one softmax over both, non-causal.

    ``q, k, v [B, h, a, Bk, d]`` (a chunk of ``a`` anchors), ``context_k/v [B, h, S, d]``,
    ``context_mask [B, a, S]`` -> ``[B, h, a, Bk, d]``. One fused SDPA call over the keys
    ``[context ; the chunk's blocks]`` with a boolean mask (context before each anchor, its own
    block only): the kernel never stores the ``[B, h, a*Bk, S]`` scores (measured on CPU: 2-3x
    less memory and time than the explicit einsum + fp32 softmax it replaced)."""
    batch, heads, anchors, block, dim = q.shape
    slots = anchors * block
    keys = torch.cat([context_k, k.reshape(batch, heads, slots, dim)], dim=2)  # [B, h, S + a*Bk, d]
    values = torch.cat([context_v, v.reshape(batch, heads, slots, dim)], dim=2)
    owner = torch.arange(slots, device=q.device) // block
    own = (owner[:, None] == owner[None, :]).expand(batch, slots, slots)  # [B, a*Bk, a*Bk]
    mask = torch.cat([context_mask.repeat_interleave(block, dim=1), own], dim=-1)  # [B, a*Bk, S + a*Bk]
    out = F.scaled_dot_product_attention(q.reshape(batch, heads, slots, dim), keys, values,
                                         attn_mask=mask[:, None])
    return out.view(batch, heads, anchors, block, dim)


def _anchors_per_chunk(budget: int, rows: int, block: int, seq: int) -> int:
    """Largest ``a`` with ``rows * a*block * (seq + a*block) <= budget`` (0 if even one anchor exceeds it)."""
    # a*block = x solves x^2 + seq*x - budget/rows = 0
    x = (-seq + math.sqrt(seq * seq + 4 * budget / max(1, rows))) / 2
    return int(x // block)


class DFlashAttention(nn.Module):
    """Block queries over (context keys of this layer) + (own-block keys), non-causal."""

    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:-1], n, self.head_dim).transpose(-3, -2)  # [B, T, n*d] -> [B, n, T, d]

    def context_kv(self, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context [B, S, H]`` -> keys, values ``[B, h_kv, S, d]`` (keys normed and rotated)."""
        k = apply_rotary(self.k_norm(self._heads(self.k_proj(context), self.num_kv_heads)), cos, sin)
        return k, self._heads(self.v_proj(context), self.num_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context_k: torch.Tensor,
        context_v: torch.Tensor,
        context_mask: torch.Tensor,
        block_size: int,
        chunk_elements: int = ATTENTION_CHUNK_ELEMENTS,
    ) -> torch.Tensor:
        """``x [B, A*Bk, H]`` block slots; ``cos/sin [B, 1, A*Bk, d]``; ``context_mask [B, A, S]``.

        Anchors are processed in chunks of about ``chunk_elements`` scores, one fused SDPA call
        each, under activation checkpointing when there are several: a chunk's keys and mask exist
        only while it runs (again in the backward), so the layer keeps ``O(A*Bk*d + S*d)`` for
        autograd instead of ``O(A*Bk*S)`` per head. One chunk runs without checkpointing."""
        batch, slots, _ = x.shape
        blocks = slots // block_size
        groups = self.num_heads // self.num_kv_heads
        q = apply_rotary(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), cos, sin)  # [B, h, Q, d]
        k = apply_rotary(self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads)), cos, sin)  # [B, hkv, Q, d]
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            context_k, context_v = context_k.repeat_interleave(groups, 1), context_v.repeat_interleave(groups, 1)
        qb = q.view(batch, self.num_heads, blocks, block_size, self.head_dim)  # [B, h, A, Bk, d]
        kb = k.view(batch, self.num_heads, blocks, block_size, self.head_dim)
        vb = v.view(batch, self.num_heads, blocks, block_size, self.head_dim)
        seq = context_k.shape[2]
        # anchors per chunk: a chunk's [B, h, a*Bk, S + a*Bk] scores (what an unfused kernel would hold)
        # stay within ~chunk_elements; a*Bk extra keys per query are the cost of one call per chunk
        step = max(1, _anchors_per_chunk(chunk_elements, batch * self.num_heads, block_size, seq))
        recompute = torch.is_grad_enabled() and q.requires_grad and blocks > step  # one chunk: within budget
        outs = []
        for a in range(0, blocks, step):
            args = (qb[:, :, a : a + step], kb[:, :, a : a + step], vb[:, :, a : a + step], context_k, context_v,
                    context_mask[:, a : a + step])
            outs.append(checkpoint(_block_attention, *args, use_reentrant=False) if recompute
                        else _block_attention(*args))
        out = torch.cat(outs, dim=2)  # [B, h, A, Bk, d]
        out = out.reshape(batch, self.num_heads, slots, self.head_dim).transpose(1, 2).reshape(batch, slots, -1)
        return self.o_proj(out)


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__()
        self.self_attn = DFlashAttention(config)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, context_k, context_v, context_mask, block_size,
                chunk_elements: int = ATTENTION_CHUNK_ELEMENTS):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, context_k, context_v, context_mask, block_size,
                               chunk_elements)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraftModel(nn.Module):
    """DFlash draft; see the module docstring for the layout and the attention pattern."""

    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fc = nn.Linear(config.fc_input_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        # DSpark (markov_rank > 0): created after the loop above, they keep their own init
        self.markov_head = MarkovHead(config.vocab_size, config.markov_rank) if config.is_dspark else None
        self.confidence_head = (DSparkConfidenceHead(config.hidden_size + config.markov_rank)
                                if config.enable_confidence_head else None)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    # names the exported checkpoint leaves out: the engines use the target's own
    TARGET_SHARED = ("embed_tokens.weight", "lm_head.weight")

    def load_target_embeddings(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Copy the target's input embeddings ``[V, H]`` and lm_head ``[V, H]`` (frozen)."""
        for name, param, value in (("embed_tokens", self.embed_tokens.weight, embed_weight),
                                   ("lm_head", self.lm_head.weight, lm_head_weight)):
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"target {name} has shape {tuple(value.shape)}, the draft expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))

    @classmethod
    def from_target(cls, config: DFlashDraftConfig, target: nn.Module) -> "DFlashDraftModel":
        """A fresh draft carrying ``target``'s embeddings and lm_head (a HF causal LM)."""
        model = cls(config)
        model.load_target_embeddings(target.get_input_embeddings().weight.detach(),
                                     target.get_output_embeddings().weight.detach())
        return model

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors under their checkpoint names (no target-shared ones)."""
        return {k: v for k, v in self.state_dict().items() if k not in self.TARGET_SHARED}

    def context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """``target_hidden [B, S, n*H_t]`` -> ``hidden_norm(fc(.)) [B, S, H]``."""
        return self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))

    def forward(
        self,
        target_hidden: torch.Tensor,
        context_position_ids: torch.Tensor,
        blocks: DFlashBlocks,
        *,
        attention_chunk_elements: int = ATTENTION_CHUNK_ELEMENTS,
    ) -> torch.Tensor:
        """Hidden states ``[B, A, Bk, H]`` (after the final norm) of every block slot.

        Args:
            target_hidden: ``[B, S, n*H_t]`` concatenated target-layer outputs, unshifted.
            context_position_ids: ``[B, S]`` position of each context slot (in its document).
            blocks: the anchors' blocks from :func:`build_dflash_blocks`.
            attention_chunk_elements: scores per attention chunk (see :class:`DFlashAttention`).
        """
        batch, anchors, block_size = blocks.input_ids.shape
        dtype = self.fc.weight.dtype
        context = self.context(target_hidden)  # [B, S, H]
        ctx_cos, ctx_sin = self.rotary.cos_sin(context_position_ids, dtype)
        cos, sin = self.rotary.cos_sin(blocks.position_ids.reshape(batch, anchors * block_size), dtype)
        x = self.embed_tokens(blocks.input_ids.reshape(batch, anchors * block_size)).to(dtype)
        for layer in self.layers:
            context_k, context_v = layer.self_attn.context_kv(context, ctx_cos, ctx_sin)
            x = layer(x, cos, sin, context_k, context_v, blocks.context_mask, block_size, attention_chunk_elements)
        return self.norm(x).view(batch, anchors, block_size, -1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., V]`` with the target's lm_head."""
        return self.lm_head(hidden_states)

    def markov_rows(self, hidden_states: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """DSpark: ``[..., H]`` slot hidden states and ``[...]`` previous tokens -> ``[..., H + r]``
        rows ``[h ; markov_w1[prev]]`` that :meth:`compute_markov_logits` scores (so the vocabulary
        projection of both parts runs in the loss's row chunks)."""
        embed = self.markov_head.embed(prev_tokens).to(hidden_states.dtype)
        return torch.cat([hidden_states, embed], dim=-1)

    def compute_markov_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., H + r] -> [..., V]``: ``lm_head(h) + markov_w2(e)`` (vLLM's base logits + Markov bias)."""
        hidden = self.config.hidden_size
        return self.lm_head(rows[..., :hidden]) + self.markov_head.bias(rows[..., hidden:])

    def slot_logits(self, hidden_states: torch.Tensor, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of block slots ``[..., H]``: the lm_head's, plus (DSpark) the Markov bias of
        ``prev_tokens [...]``, the token at the position before each slot's predicted one."""
        if self.markov_head is None:
            return self.compute_logits(hidden_states)
        return self.compute_markov_logits(self.markov_rows(hidden_states, prev_tokens))
