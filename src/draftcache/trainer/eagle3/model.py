"""The EAGLE-3 draft model: Llama-style decoder layers fed by fused target features.

Layout (parameter names are the exported checkpoint names, no ``model.`` prefix)::

    embed_tokens  Embedding(V, H)              copy of the target's, frozen by default
    input_norm    RMSNorm(num_aux * H_t)       only with norm_before_fc: over the concatenated aux vector
    fc_norm.{i}   RMSNorm(H_t) per aux chunk   only with fc_norm (EAGLE-3.1)
    fc            Linear(num_aux * H_t -> H)   fuses the target's aux hidden states
    midlayer      cat(input_layernorm(embed), hidden_norm(h)) [2H] -> q/k/v -> o_proj [H]
                  + residual h; post_attention_layernorm; SwiGLU MLP; + residual
    layers.{i}    i = 1 .. num_hidden_layers - 1: standard pre-norm Llama layers reading H
    norm          final RMSNorm
    lm_head       Linear(H -> Vd)
    d2t [Vd] int64, t2d [V] bool                draft id -> target id offsets, target membership
    mask_hidden   [1, num_aux * H_t]            only with parallel_drafting (P-EAGLE): the learnt
                                               pre-``fc`` feature of every mask slot

``logits = lm_head(norm(h_out))``; the hidden state fed to the next draft step (training-time
test, see :mod:`draftcache.trainer.eagle3.ttt`) is the pre-norm ``h_out``, or ``norm(h_out)``
under ``norm_output`` (EAGLE-3.1), exactly as vLLM's ``llama_eagle3.py`` returns it.
``attention_bias`` gives q/k/v/o biases (vLLM: ``qkv_proj`` and ``o_proj`` bias).

Attention supports the EAGLE-3 draft-step cache (:class:`Eagle3KVCache`): the first step
attends causally over the sequence and caches its keys/values; every later step at slot ``t``
attends to those cached keys of slots ``<= t`` plus one "diagonal" key per later step, all
produced at slot ``t`` itself. This is how the engines' chain drafting sees the draft's own
earlier predictions, and what TTT simulates during training.

Two attention implementations give the same result: :func:`attend_sdpa` (the default) runs
``scaled_dot_product_attention`` and never materialises a ``T x T`` score tensor;
:func:`attend_eager` computes the scores explicitly and is kept as the reference
(``Eagle3DraftModel(config, attn_implementation="eager")``). ``benchmarks/ttt_memory.py``
measures both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftcache.data.vocab import DraftVocab
from draftcache.trainer.layers import (
    document_layout,
    SUPPORTED_ROPE_TYPES,
    RMSNorm,
    Rotary,
    SwiGLUMLP,
    rope_type,
    rotate_half,
    target_decoder_shape,
)

__all__ = [
    "VARIANT_FIELDS",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "Eagle3KVCache",
    "Eagle3DecodeCache",
    "Eagle3Output",
    "ATTENTION_IMPLEMENTATIONS",
    "SDPA_QUERY_CHUNK",
    "attend_eager",
    "attend_sdpa",
    "build_attention_mask",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Eagle3DraftConfig:
    """Shapes and settings of an EAGLE-3 draft (saved with every export).

    Attributes:
        hidden_size: draft width ``H`` (equal to the target's for the usual embedding copy).
        intermediate_size: SwiGLU inner width.
        num_attention_heads / num_key_value_heads / head_dim: attention geometry (GQA allowed).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta / rope_scaling: RoPE base and scaling dict (``None``, ``linear`` or
            ``llama3``); must equal the target's so serving positions mean the same thing.
        max_position_embeddings: the target's context length (never a smaller default:
            engines cap draft positions with it).
        target_hidden_size: ``H_t``, width of each aux hidden state.
        target_vocab_size: ``V``; draft_vocab_size: ``Vd <= V``.
        aux_layer_ids: target decoder layers whose *outputs* feed ``fc`` (HF
            ``hidden_states[i + 1]``); engines name the same tensors ``i + 1``.
        num_aux_layers: ``len(aux_layer_ids)``; ``fc`` input is ``num_aux_layers * H_t``.
        hidden_act: MLP activation (only ``silu``, SwiGLU).
        norm_before_residual: residual taken from ``hidden_norm(h)`` instead of ``h``
            (original EAGLE-3: False).
        norm_before_fc: one RMSNorm (``input_norm``) over the concatenated aux vector before ``fc``.
        fc_norm: one RMSNorm per aux chunk before ``fc`` (``fc_norm.{i}``; EAGLE-3.1).
        norm_output: the next draft step reads ``norm(h_out)`` instead of ``h_out`` (EAGLE-3.1).
        attention_bias: q/k/v/o projections carry biases.
        num_hidden_layers: decoder layers; layer 0 reads ``[embed | hidden]`` (2H), later ones
            the previous layer's output (H) with a standard pre-norm residual.
        parallel_drafting: P-EAGLE: one forward drafts K tokens; slots after the bonus token read
            ``(mask_token_id, mask_hidden)``.
        mask_token_id: the token fed at P-EAGLE mask slots (required with ``parallel_drafting``).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int
    target_hidden_size: int
    target_vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: list[int]
    num_aux_layers: int = 3
    hidden_act: str = "silu"
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    attention_bias: bool = False
    num_hidden_layers: int = 1
    parallel_drafting: bool = False
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_layer_ids", [int(i) for i in self.aux_layer_ids])
        object.__setattr__(self, "rope_scaling", dict(self.rope_scaling) if self.rope_scaling else None)
        problems: list[str] = []
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "max_position_embeddings", "target_hidden_size", "target_vocab_size",
                     "draft_vocab_size", "num_aux_layers", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not problems:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )
            if self.head_dim % 2:
                problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
            if self.draft_vocab_size > self.target_vocab_size:
                problems.append(
                    f"draft_vocab_size ({self.draft_vocab_size}) exceeds target_vocab_size "
                    f"({self.target_vocab_size})"
                )
            if len(self.aux_layer_ids) != self.num_aux_layers:
                problems.append(
                    f"aux_layer_ids {self.aux_layer_ids} has {len(self.aux_layer_ids)} ids but "
                    f"num_aux_layers is {self.num_aux_layers}"
                )
        if self.parallel_drafting and self.mask_token_id is None:
            problems.append("parallel_drafting needs mask_token_id (the token fed at mask slots)")
        if self.mask_token_id is not None and not (
                isinstance(self.mask_token_id, int) and 0 <= self.mask_token_id < self.target_vocab_size):
            problems.append(f"mask_token_id must be a token id in [0, {self.target_vocab_size}), got {self.mask_token_id!r}")
        if any(i < 0 for i in self.aux_layer_ids):
            problems.append(f"aux_layer_ids must be >= 0 (decoder-layer output ids), got {self.aux_layer_ids}")
        if self.rms_norm_eps <= 0:
            problems.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            problems.append(f"rope_theta must be > 0, got {self.rope_theta}")
        if rope_type(self.rope_scaling) not in SUPPORTED_ROPE_TYPES:
            problems.append(
                f"rope_scaling type {rope_type(self.rope_scaling)!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported; the draft MLP is SwiGLU ('silu')")
        if problems:
            raise ValueError("invalid Eagle3DraftConfig: " + "; ".join(problems))

    @classmethod
    def from_target_config(
        cls,
        hf_config: Any,
        *,
        draft_vocab_size: int,
        aux_layer_ids: Sequence[int],
        norm_before_residual: bool = False,
        **variant: Any,
    ) -> "Eagle3DraftConfig":
        """Draft config matching a HF target config (its ``text_config`` when it has one);
        ``hf_config`` may be a ``PretrainedConfig`` or its ``to_dict()`` form.

        Copies hidden/intermediate sizes, head counts, head_dim, eps, activation, RoPE
        (``rope_theta``/``rope_scaling`` or transformers 5.x ``rope_parameters``) and
        ``max_position_embeddings`` from the target, so the draft serves at the target's
        context length with the target's position encoding. ``variant`` sets the variant fields
        (``fc_norm``, ``norm_output``, ``norm_before_fc``, ``attention_bias``, ``num_hidden_layers``,
        ``parallel_drafting``, ``mask_token_id``).
        """
        text, shape = target_decoder_shape(hf_config, draft="EAGLE-3")
        num_layers = getattr(text, "num_hidden_layers", None)
        if num_layers is not None and any(int(i) >= int(num_layers) for i in aux_layer_ids):
            raise ValueError(
                f"aux_layer_ids {list(aux_layer_ids)} out of range for a target with {num_layers} decoder layers "
                "(ids name decoder-layer outputs, 0-based)"
            )
        return cls(
            **shape,
            target_vocab_size=int(text.vocab_size),
            draft_vocab_size=int(draft_vocab_size),
            aux_layer_ids=list(aux_layer_ids),
            num_aux_layers=len(aux_layer_ids),
            norm_before_residual=norm_before_residual,
            **variant,
        )

    @property
    def variant_fields(self) -> dict[str, Any]:
        """The fields that make EAGLE-3.1 / multi-layer / P-EAGLE drafts (defaults: the original EAGLE-3)."""
        return {name: getattr(self, name) for name in VARIANT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Eagle3DraftConfig":
        """Inverse of :meth:`to_dict`; unknown keys fail instead of being dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Eagle3DraftConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(data))


#: Eagle3DraftConfig fields beyond the original EAGLE-3 draft, named as vLLM's config.json keys
VARIANT_FIELDS = ("norm_before_fc", "fc_norm", "norm_output", "attention_bias", "num_hidden_layers",
                  "parallel_drafting", "mask_token_id")


# --------------------------------------------------------------------------------------------
# Masks and packed layout
# --------------------------------------------------------------------------------------------


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    *,
    seq_len: int,
    batch_size: int,
    seq_lens: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[B, 1, T, T]`` mask (True = may attend) for the first draft step.

    Query ``t`` may attend key ``s`` iff ``s <= t``, both lie in the same document (when
    ``seq_lens`` packs several per row), and key ``s`` is a real token
    (``attention_mask[s] == 1``). A query always sees its own slot, so padded queries get a
    finite (discarded) output instead of NaN; real queries are unaffected by that rule.
    """
    slots = torch.arange(seq_len, device=device)
    allowed = (slots[None, :] <= slots[:, None]).expand(batch_size, seq_len, seq_len)  # [B, T(q), T(k)]
    if seq_lens is not None:
        doc_ids, _, _ = document_layout(seq_lens.to(device), seq_len)
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if attention_mask is not None:
        real_key = attention_mask.to(device=device).bool()[:, None, :]  # [B, 1, T(k)]
        allowed = allowed & (real_key | torch.eye(seq_len, dtype=torch.bool, device=device))
    return allowed[:, None].contiguous()


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@dataclass
class Eagle3KVCache:
    """Keys/values of earlier draft steps over one sequence batch.

    ``block_k/block_v [B, H_kv, T, d]``: the first step's keys/values (attended causally).
    ``diag_k/diag_v``: one ``[B, H_kv, T, d]`` per later step; at slot ``t`` each holds the key
    that step produced at slot ``t`` (attended only by queries at slot ``t``).
    """

    block_k: torch.Tensor | None = None
    block_v: torch.Tensor | None = None
    diag_k: list[torch.Tensor] = field(default_factory=list)
    diag_v: list[torch.Tensor] = field(default_factory=list)
    later: list["Eagle3KVCache"] = field(default_factory=list)  # layers 1.. of a multi-layer draft

    @property
    def steps(self) -> int:
        return 0 if self.block_k is None else 1 + len(self.diag_k)

    def layer(self, index: int) -> "Eagle3KVCache":
        """This cache for layer 0, its own per-layer cache for layer ``index >= 1``."""
        while len(self.later) < index:
            self.later.append(Eagle3KVCache())
        return self if index == 0 else self.later[index - 1]


@dataclass
class Eagle3DecodeCache:
    """Plain append-only keys/values ``[B, H_kv, L, d]`` for chain drafting at inference time.

    Every drafted token is one more entry, at the next RoPE position, attended causally by later
    entries: the inference-time view of what TTT's diagonal keys simulate in training.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    later: list["Eagle3DecodeCache"] = field(default_factory=list)  # layers 1.. of a multi-layer draft

    def layer(self, index: int) -> "Eagle3DecodeCache":
        """This cache for layer 0, its own per-layer cache for layer ``index >= 1``."""
        while len(self.later) < index:
            self.later.append(Eagle3DecodeCache())
        return self if index == 0 else self.later[index - 1]

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.size(2))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, length: int) -> None:
        """Forget every entry from ``length`` on (rejected draft tokens), in every layer."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]
        for cache in self.later:
            cache.crop(length)


def attend_eager(
    q: torch.Tensor,
    block_k: torch.Tensor,
    block_v: torch.Tensor,
    mask: torch.Tensor,
    diag_k: list[torch.Tensor],
    diag_v: list[torch.Tensor],
) -> torch.Tensor:
    """Reference attention: one explicit softmax over ``[block keys (S) | diagonal keys (k)]`` per query.

    ``q [B, Hq, T, d]``, ``block_k/v [B, Hkv, S, d]`` (``S == T`` in TTT, ``past + T`` when
    decoding with :class:`Eagle3DecodeCache`), ``mask [B, 1, T, S]`` bool, ``diag_k/v``: k
    tensors ``[B, Hkv, T, d]`` (key ``j`` at slot ``t`` is seen only by query ``t``). Returns
    ``[B, Hq, T, d]``. Materialises fp32 scores ``[B, Hkv, g, T, S + k]`` (and autograd keeps
    copies of them): simple and exact, but ``O(Hq * T * S)`` memory per step. Training uses
    :func:`attend_sdpa`; this stays as the reference it is tested against.
    """
    batch, q_heads, seq, dim = q.shape
    kv_heads = block_k.size(1)
    groups = q_heads // kv_heads
    scale = dim ** -0.5
    wide = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32
    qg = q.reshape(batch, kv_heads, groups, seq, dim)  # GQA: query heads grouped per kv head
    scores = torch.matmul(qg, block_k.unsqueeze(2).transpose(-1, -2)).to(wide) * scale  # [B,Hkv,g,T,S]
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    if diag_k:
        dk = torch.stack(diag_k, dim=-2)  # [B, Hkv, T, k, d]
        diag_scores = torch.einsum("bhgtd,bhtjd->bhgtj", qg, dk).to(wide) * scale  # [B,Hkv,g,T,k]
        scores = torch.cat([scores, diag_scores], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    keys = block_k.size(2)
    out = torch.matmul(probs[..., :keys], block_v.unsqueeze(2))  # [B, Hkv, g, T, d]
    if diag_v:
        dv = torch.stack(diag_v, dim=-2)  # [B, Hkv, T, k, d]
        out = out + torch.einsum("bhgtj,bhtjd->bhgtd", probs[..., keys:], dv)
    return out.reshape(batch, q_heads, seq, dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fused attention ``q [B, Hq, T, d]`` over ``k/v [B, Hkv, S, d]`` under a bool ``mask [B, 1, T, S]``.

    On CPU the flash kernel takes the mask and grouped kv heads as they are. On CUDA a mask with
    ``enable_gqa`` sends SDPA to its unfused math kernel, so kv heads are repeated instead (the
    copy is ``O(Hq * S * d)``, far below the ``O(Hq * T * S)`` scores it avoids)."""
    groups = q.size(1) // k.size(1)
    if groups > 1 and q.device.type != "cpu":
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)


#: Queries per fused attention call in TTT steps with diagonal keys (see :func:`attend_sdpa`). Measured
#: on CPU (benchmarks/ttt_memory.py defaults, T=2048, 7 steps, fused only, peak / CPU time per pass):
#: one call per step 968 MiB / 11.9 s, chunks of 512 702 MiB / 6.4 s, 256 666 MiB / 5.4 s, 128
#: 668 MiB / 6.1 s. Smaller chunks keep smaller masks (``C x (b + k * C)``) and skip more block keys
#: but launch more, smaller kernels. Not measured on a GPU: sweep ``--query-chunk`` there.
SDPA_QUERY_CHUNK = 256


def attend_sdpa(
    q: torch.Tensor,
    block_k: torch.Tensor,
    block_v: torch.Tensor,
    mask: torch.Tensor,
    diag_k: list[torch.Tensor],
    diag_v: list[torch.Tensor],
    *,
    query_chunk: int | None = SDPA_QUERY_CHUNK,
) -> torch.Tensor:
    """The same attention as :func:`attend_eager` through ``scaled_dot_product_attention``: no
    ``T x S`` score tensor is materialised or kept for backward.

    Without diagonal keys (TTT step 0, decoding) this is one fused call under ``mask``. At TTT
    step ``k >= 1`` each chunk of queries ``[a, b)`` attends one key set: the block keys
    ``[0, b)`` (the block mask is causal, so later block keys are never attended) followed by
    the ``k`` diagonal keys of slots ``[a, b)``, under ``cat(mask[a:b, :b], I, ..., I)`` (the
    identity lets query ``t`` see only its own diagonal keys). Keys and mask are ``O(b + k * C)``
    per chunk of ``C`` queries; with one chunk (``query_chunk=None``) the key set is
    ``(k + 1) * T`` and the kernel scores ``k * T`` diagonal keys per query, almost all masked.
    Chunking bounds that waste to ``k * C`` and skips the block keys after each chunk.

    Requires ``block_k.size(2) == T`` and a causal ``mask`` when ``diag_k`` is given (what
    :func:`build_attention_mask` builds). Shapes as in :func:`attend_eager`.
    """
    if not diag_k:
        return _sdpa(q, block_k, block_v, mask)
    batch, _, seq, _ = q.shape
    steps = len(diag_k)
    chunk = seq if query_chunk is None else max(1, min(int(query_chunk), seq))
    eye = torch.eye(chunk, dtype=torch.bool, device=q.device)
    outs = []
    for start in range(0, seq, chunk):
        end = min(start + chunk, seq)
        n = end - start
        keys = torch.cat([block_k[:, :, :end]] + [d[:, :, start:end] for d in diag_k], dim=2)  # [B,Hkv,end+k*n,d]
        values = torch.cat([block_v[:, :, :end]] + [d[:, :, start:end] for d in diag_v], dim=2)
        diagonal = eye[:n, :n].expand(batch, 1, n, n)
        chunk_mask = torch.cat([mask[:, :, start:end, :end]] + [diagonal] * steps, dim=-1)  # [B,1,n,end+k*n]
        outs.append(_sdpa(q[:, :, start:end], keys, values, chunk_mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


#: ``Eagle3DraftModel(attn_implementation=...)``: ``sdpa`` (fused, the default) or ``eager`` (reference).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class Eagle3Attention(nn.Module):
    """GQA self-attention whose q/k/v read ``width`` features: the ``2H``-wide ``[embed | hidden]``
    input in layer 0, ``H`` in later layers; q/k/v/o biases under ``attention_bias``."""

    def __init__(self, config: Eagle3DraftConfig, width: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        self.attn_implementation = "sdpa"  # or "eager" (the reference); set via Eagle3DraftModel
        self.query_chunk: int | None = SDPA_QUERY_CHUNK

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: "Eagle3KVCache | Eagle3DecodeCache | None" = None,
    ) -> torch.Tensor:
        """``x [B, T, width]`` at ``position_ids [B, T]`` -> ``[B, T, H]``.

        Without a cache, or with an empty one, this is causal attention under ``mask`` (the
        cache then keeps these keys as the block). With a filled cache, the new keys are
        appended as diagonal keys and the queries attend block + all diagonal keys.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary.cos_sin(position_ids, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(cache, Eagle3DecodeCache):
            block_k, block_v = cache.append(k, v)  # mask is [B, 1, T_new, T_past + T_new]
            diag_k, diag_v = [], []
        elif cache is None or cache.block_k is None:
            block_k, block_v, diag_k, diag_v = k, v, [], []
            if cache is not None:
                cache.block_k, cache.block_v = k, v
        else:
            cache.diag_k.append(k)
            cache.diag_v.append(v)
            block_k, block_v, diag_k, diag_v = cache.block_k, cache.block_v, cache.diag_k, cache.diag_v
        if self.attn_implementation == "eager":
            out = attend_eager(q, block_k, block_v, mask, diag_k, diag_v)  # [B, Hq, T, d]
        else:
            out = attend_sdpa(q, block_k, block_v, mask, diag_k, diag_v, query_chunk=self.query_chunk)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class Eagle3DecoderLayer(nn.Module):
    """The draft's first decoder layer (``midlayer``), reading ``[embed | hidden]``."""

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__()
        self.norm_before_residual = config.norm_before_residual
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, 2 * config.hidden_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: "Eagle3KVCache | Eagle3DecodeCache | None" = None,
    ) -> torch.Tensor:
        """``embeds, hidden [B, T, H]`` -> pre-norm output ``[B, T, H]``."""
        normed_hidden = self.hidden_norm(hidden)
        residual = normed_hidden if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed_hidden], dim=-1)  # [B, T, 2H]
        h = residual + self.self_attn(x, position_ids, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3LaterLayer(nn.Module):
    """Decoder layer ``i >= 1`` (``layers.{i}``): standard pre-norm Llama over the previous layer's
    output, ``h + attn(input_layernorm(h))`` then ``+ mlp(post_attention_layernorm(.))`` (what vLLM's
    fused ``input_layernorm(hidden, residual)`` computes for ``layer_idx > 0``)."""

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, config.hidden_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: "Eagle3KVCache | Eagle3DecodeCache | None" = None,
    ) -> torch.Tensor:
        """``hidden [B, T, H]`` -> ``[B, T, H]``."""
        h = hidden + self.self_attn(self.input_layernorm(hidden), position_ids, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# --------------------------------------------------------------------------------------------
# The draft
# --------------------------------------------------------------------------------------------


@dataclass
class Eagle3Output:
    """``logits [B, T, Vd]`` (None when not asked for); ``hidden_states [B, T, H]``, what the next
    step reads: the pre-norm output, or the post-norm one under ``norm_output``; and
    ``normed_hidden_states [B, T, H]``, the final norm's output the logits project."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    normed_hidden_states: torch.Tensor | None = None


class Eagle3DraftModel(nn.Module):
    """EAGLE-3 draft; ``state_dict()`` keys are exactly the exported checkpoint names."""

    def __init__(self, config: Eagle3DraftConfig, *, freeze_embeddings: bool = True,
                 attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.target_vocab_size, config.hidden_size)
        fc_in = config.num_aux_layers * config.target_hidden_size
        if config.norm_before_fc:
            self.input_norm = RMSNorm(fc_in, config.rms_norm_eps)
        if config.fc_norm:
            self.fc_norm = nn.ModuleList(RMSNorm(config.target_hidden_size, config.rms_norm_eps)
                                         for _ in range(config.num_aux_layers))
        self.fc = nn.Linear(fc_in, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        if config.num_hidden_layers > 1:  # keys "1".. so that state_dict names are the export's layers.{i}
            self.layers = nn.ModuleDict({str(i): Eagle3LaterLayer(config) for i in range(1, config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        # default maps: draft id i = target id i (the first Vd target ids)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(config.target_vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        if config.parallel_drafting:
            self.mask_hidden = nn.Parameter(torch.empty(1, fc_in).normal_(0.0, 0.02))
        if freeze_embeddings:
            self.embed_tokens.weight.requires_grad_(False)
        self.attn_implementation = attn_implementation

    @property
    def attn_implementation(self) -> str:
        """``sdpa`` (fused attention, the default) or ``eager`` (explicit scores, the reference)."""
        return self.midlayer.self_attn.attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        if value not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {value!r}")
        for layer in self.decoder_layers:
            layer.self_attn.attn_implementation = value

    @property
    def decoder_layers(self) -> list[nn.Module]:
        """``[midlayer, layers.1, ...]`` in order."""
        later = list(self.layers.values()) if self.config.num_hidden_layers > 1 else []
        return [self.midlayer, *later]

    # ---- vocabulary and warm starts -----------------------------------------------------

    @property
    def selected_token_ids(self) -> torch.Tensor:
        """``[Vd]`` int64 target ids of the draft vocabulary (``arange(Vd) + d2t``)."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, vocab: DraftVocab) -> None:
        """Install a draft vocabulary's ``d2t``/``t2d`` (sizes must match the config)."""
        if vocab.size != self.config.draft_vocab_size or vocab.target_vocab_size != self.config.target_vocab_size:
            raise ValueError(
                f"draft vocabulary is {vocab.size} of {vocab.target_vocab_size} tokens but the model expects "
                f"draft_vocab_size={self.config.draft_vocab_size}, target_vocab_size={self.config.target_vocab_size}"
            )
        with torch.no_grad():
            self.d2t.copy_(vocab.d2t)
            self.t2d.copy_(vocab.t2d)

    def load_target_embeddings(self, weight: torch.Tensor) -> None:
        """Copy the target's input embeddings ``[V, H]`` into ``embed_tokens``."""
        expected = tuple(self.embed_tokens.weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"target embeddings have shape {tuple(weight.shape)} but the draft expects {expected} "
                "([target_vocab_size, hidden_size]); pass the target's input embedding matrix"
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def init_lm_head_from_target(
        self, target_lm_head_weight: torch.Tensor, selected_token_ids: torch.Tensor | None = None
    ) -> None:
        """Warm-start ``lm_head`` with the target's rows for the draft vocabulary.

        ``target_lm_head_weight [V, H_t]``; ``selected_token_ids [Vd]`` defaults to the model's
        own (``arange(Vd) + d2t``), so call this *after* :meth:`set_draft_vocab`. Only valid
        when the draft width equals the target's.
        """
        v, h = self.config.target_vocab_size, self.config.hidden_size
        if self.config.target_hidden_size != h:
            raise ValueError(
                f"cannot copy the target lm_head: draft hidden_size {h} != target_hidden_size "
                f"{self.config.target_hidden_size}"
            )
        if tuple(target_lm_head_weight.shape) != (v, h):
            raise ValueError(f"target lm_head weight has shape {tuple(target_lm_head_weight.shape)}, expected {(v, h)}")
        ids = self.selected_token_ids if selected_token_ids is None else selected_token_ids.to(torch.int64)
        if ids.shape != (self.config.draft_vocab_size,):
            raise ValueError(
                f"selected_token_ids must have shape [{self.config.draft_vocab_size}], got {tuple(ids.shape)}"
            )
        with torch.no_grad():
            self.lm_head.weight.copy_(target_lm_head_weight.index_select(0, ids.to(target_lm_head_weight.device)))

    # ---- forward --------------------------------------------------------------------------

    def combine_hidden_states(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., num_aux * H_t]`` target features -> ``[..., H]``: ``input_norm`` (norm_before_fc),
        then one ``fc_norm`` per aux chunk (fc_norm), then ``fc`` (vLLM's ``combine_hidden_states``)."""
        x = aux_hidden_states.to(self.fc.weight.dtype)
        if self.config.norm_before_fc:
            x = self.input_norm(x)
        if self.config.fc_norm:
            chunks = x.chunk(self.config.num_aux_layers, dim=-1)
            x = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(x)

    def mask_hidden_state(self) -> torch.Tensor:
        """``[1, H]``: the hidden input of every P-EAGLE mask slot, ``combine_hidden_states(mask_hidden)``
        (vLLM projects its ``mask_hidden`` buffer the same way at load)."""
        if not self.config.parallel_drafting:
            raise ValueError("this draft has no mask_hidden: it was not built with parallel_drafting")
        return self.combine_hidden_states(self.mask_hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The last layer's pre-norm output ``[B, T, H]`` -> ``[B, T, Vd]`` (under ``norm_output`` the
        ``hidden_states`` a step returns are already normed: use its ``logits``)."""
        return self.lm_head(self.norm(hidden_states))

    def forward_step(
        self,
        input_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: "Eagle3KVCache | Eagle3DecodeCache | None" = None,
        logits: bool = True,
    ) -> Eagle3Output:
        """One draft step: ``input_ids [B, T]`` (the tokens this step reads), ``hidden_states
        [B, T, H]`` (:meth:`combine_hidden_states` output for the first step, the previous step's
        ``hidden_states`` after), ``position_ids [B, T]``, ``mask [B, 1, T, T]`` from
        :func:`build_attention_mask`. ``cache`` is layer 0's; later layers use ``cache.layer(i)``.
        ``logits=False`` skips the ``[B, T, Vd]`` projection (the TTT loss projects
        ``normed_hidden_states`` in chunks)."""
        embeds = self.embed_tokens(input_ids).to(hidden_states.dtype)
        out = self.midlayer(embeds, hidden_states, position_ids, mask, cache)
        for i, layer in enumerate(self.decoder_layers[1:], start=1):
            out = layer(out, position_ids, mask, None if cache is None else cache.layer(i))
        normed = self.norm(out)
        return Eagle3Output(logits=self.lm_head(normed) if logits else None,
                            hidden_states=normed if self.config.norm_output else out, normed_hidden_states=normed)

    def decode(
        self, input_ids: torch.Tensor, hidden_states: torch.Tensor, cache: Eagle3DecodeCache
    ) -> Eagle3Output:
        """Append ``n`` entries to an inference cache and return their outputs.

        ``input_ids [B, n]`` (the token each entry reads), ``hidden_states [B, n, H]``
        (``combine_hidden_states(aux)`` for context entries, the previous step's ``hidden_states`` for
        chain-drafted ones, :meth:`mask_hidden_state` for P-EAGLE mask slots). Entries take the next
        ``n`` positions after the cache and attend causally to everything before them (and to each
        other, causally: a P-EAGLE round appends its context entries and mask slots in one call).
        """
        batch, n = input_ids.shape
        past = cache.length
        position_ids = torch.arange(past, past + n, device=input_ids.device).expand(batch, n)
        q_pos = torch.arange(past, past + n, device=input_ids.device)
        k_pos = torch.arange(past + n, device=input_ids.device)
        mask = (k_pos[None, :] <= q_pos[:, None]).expand(batch, 1, n, past + n)
        return self.forward_step(input_ids, hidden_states, position_ids=position_ids, mask=mask, cache=cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        aux_hidden_states: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
    ) -> Eagle3Output:
        """First draft step over a sequence (= TTT step 0).

        Args:
            input_ids: ``[B, T]`` shifted tokens (slot ``t`` holds ``x_{t+1}``).
            aux_hidden_states: ``[B, T, num_aux * H_t]`` unshifted target features.
            attention_mask: ``[B, T]`` 1 = real token (keys at 0 are never attended).
            position_ids: ``[B, T]``; default ``arange(T)``, or per document with ``seq_lens``.
            seq_lens: ``[B, D]`` packed document lengths (block-causal attention).
        """
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = _default_positions(batch, seq, seq_lens, input_ids.device)
        mask = build_attention_mask(attention_mask, seq_len=seq, batch_size=batch, seq_lens=seq_lens,
                                    device=input_ids.device)
        hidden = self.combine_hidden_states(aux_hidden_states)
        return self.forward_step(input_ids, hidden, position_ids=position_ids, mask=mask)


def _default_positions(batch: int, seq: int, seq_lens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if seq_lens is not None:
        return document_layout(seq_lens.to(device), seq)[1]
    return torch.arange(seq, device=device).expand(batch, seq)
