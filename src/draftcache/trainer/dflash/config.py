"""DFlash draft config: shapes, block geometry and the ``config.json`` vLLM's DFlash loader reads.

The authority on names is vLLM's ``model_executor/models/qwen3_dflash.py`` (architecture
``DFlashDraftModel`` -> ``DFlashQwen3ForCausalLM``) and ``config/speculative.py``:

- Qwen3-style decoder layers (``q_norm`` / ``k_norm`` per head), ``num_hidden_layers`` of them;
- ``dflash_config.mask_token_id``: the id fed at the ``block_size - 1`` masked slots;
- ``dflash_config.target_layer_ids``: decoder-layer OUTPUT ids (vLLM adds 1 to capture
  the same tensor: ``get_eagle3_aux_layers_from_config``);
- ``fc`` input width = ``target_hidden_size * len(target_layer_ids)``;
- no ``layer_types`` / ``use_swa`` / ``causal``: every layer is full, non-causal attention
  (``_resolve_layer_attention``), which is how we train the block.
- ``block_size`` and ``num_target_layers`` are informative for vLLM (it takes the block
  from ``num_speculative_tokens = block_size - 1``); the DFlash reference writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from draftcache.trainer.layers import SUPPORTED_ROPE_TYPES, rope_type, target_decoder_shape, target_rope, text_config

__all__ = ["DFlashDraftConfig", "DFLASH_ARCHITECTURE", "DSPARK_ARCHITECTURE", "DSPARK_MARKOV_RANK"]

DFLASH_ARCHITECTURE = "DFlashDraftModel"
DSPARK_MARKOV_RANK = 64  # draftcache train --method dspark's default Markov rank
DSPARK_ARCHITECTURE = "Qwen3DSparkModel"  # vLLM's registry: qwen3_dspark.Qwen3DSparkForCausalLM, method "dspark"


@dataclass(frozen=True, kw_only=True)
class DFlashDraftConfig:
    """Shapes and settings of a DFlash draft (saved with every checkpoint and export).

    Attributes:
        hidden_size: draft width ``H``; equals the target's (the draft reuses its embeddings and lm_head).
        intermediate_size: SwiGLU inner width.
        num_hidden_layers: draft decoder layers (NeMo's recipe: 5; fewer is cheaper to serve).
        num_attention_heads / num_key_value_heads / head_dim: attention geometry (GQA allowed).
        rms_norm_eps: epsilon of every RMSNorm (q_norm/k_norm included).
        rope_theta / rope_scaling: the target's RoPE, so draft positions mean the target's positions.
        max_position_embeddings: the target's context length.
        vocab_size: the target's vocabulary ``V`` (the draft predicts over all of it).
        target_hidden_size: width ``H_t`` of each captured target layer.
        num_target_layers: ``L`` of the target (recorded; vLLM reads its own).
        target_layer_ids: target decoder-layer outputs concatenated, in order, into ``fc``.
        block_size: ``B``: one anchor + ``B - 1`` masked slots per proposal (serving:
            ``num_speculative_tokens = B - 1``).
        mask_token_id: a token id in ``[0, V)`` whose (frozen target) embedding marks masked slots.
        hidden_act: MLP activation (only ``silu``).
        markov_rank: ``r > 0`` makes this a DSpark draft (vLLM's ``Qwen3DSparkModel``): the same
            backbone plus a low-rank Markov head ``markov_w2(markov_w1[previous token])`` added to
            each slot's logits, and vLLM's ``sample_from_anchor`` layout: ALL ``B`` slots predict,
            slot ``k`` the token at ``p + k + 1`` (``num_speculative_tokens = B``). ``0``: DFlash.
        enable_confidence_head: DSpark only: a ``Linear(H + r -> 1)`` head estimating each slot's
            acceptance (vLLM's ``confidence_head``, ``confidence_head_with_markov``).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int
    vocab_size: int
    target_hidden_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    block_size: int = 16
    mask_token_id: int
    hidden_act: str = "silu"
    markov_rank: int = 0
    enable_confidence_head: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_layer_ids", [int(i) for i in self.target_layer_ids])
        object.__setattr__(self, "rope_scaling", dict(self.rope_scaling) if self.rope_scaling else None)
        problems: list[str] = []
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                     "target_hidden_size", "num_target_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if problems:
            raise ValueError("invalid DFlashDraftConfig: " + "; ".join(problems))
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            problems.append(f"block_size must be an int >= 2 (an anchor plus at least one masked slot), "
                            f"got {self.block_size!r}")
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id must be a token id in [0, {self.vocab_size}), got {self.mask_token_id!r}")
        ids = self.target_layer_ids
        if not ids:
            problems.append("target_layer_ids is empty; DFlash needs at least one target layer")
        elif len(set(ids)) != len(ids) or any(not 0 <= i < self.num_target_layers for i in ids):
            problems.append(f"target_layer_ids {ids} must be distinct decoder-layer ids in "
                            f"[0, {self.num_target_layers})")
        if self.rms_norm_eps <= 0:
            problems.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if rope_type(self.rope_scaling) not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope_scaling type {rope_type(self.rope_scaling)!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.markov_rank < 0:
            problems.append(f"markov_rank must be >= 0 (0 = DFlash, > 0 = DSpark), got {self.markov_rank}")
        if self.enable_confidence_head and self.markov_rank == 0:
            problems.append("enable_confidence_head needs a DSpark draft (markov_rank > 0)")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported; the draft MLP is SwiGLU ('silu')")
        if problems:
            raise ValueError("invalid DFlashDraftConfig: " + "; ".join(problems))

    @property
    def is_dspark(self) -> bool:
        """A DSpark draft (Markov head, ``sample_from_anchor`` layout) rather than DFlash."""
        return self.markov_rank > 0

    @property
    def first_draft_slot(self) -> int:
        """Block slot of the first draft token: 1 for DFlash (the anchor slot predicts nothing), 0
        for DSpark (``sample_from_anchor``: the anchor slot predicts ``p + 1``). Slot ``k`` predicts
        position ``p + k + 1 - first_draft_slot``."""
        return 0 if self.is_dspark else 1

    @property
    def draft_tokens(self) -> int:
        """``K`` tokens proposed per block: ``B - 1`` (DFlash), ``B`` (DSpark)."""
        return self.block_size - self.first_draft_slot

    @property
    def fc_input_size(self) -> int:
        """``len(target_layer_ids) * target_hidden_size``: width of the concatenated target features."""
        return len(self.target_layer_ids) * self.target_hidden_size

    @classmethod
    def from_target_config(
        cls,
        hf_config: Any,
        *,
        target_layer_ids: Sequence[int],
        mask_token_id: int,
        num_hidden_layers: int = 1,
        block_size: int = 16,
        markov_rank: int = 0,
        enable_confidence_head: bool = False,
    ) -> "DFlashDraftConfig":
        """Draft config matching a HF target config (object or ``to_dict()`` form): sizes,
        heads, eps, RoPE and context length are the target's."""
        text, shape = target_decoder_shape(hf_config, draft="DFlash", required=("num_hidden_layers",))
        return cls(
            **shape,
            num_hidden_layers=int(num_hidden_layers),
            vocab_size=int(text.vocab_size),
            num_target_layers=int(text.num_hidden_layers),
            target_layer_ids=list(target_layer_ids),
            block_size=int(block_size),
            mask_token_id=int(mask_token_id),
            markov_rank=int(markov_rank),
            enable_confidence_head=bool(enable_confidence_head),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DFlashDraftConfig":
        """Inverse of :meth:`to_dict`; unknown keys fail instead of being dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DFlashDraftConfig keys {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` of an exported draft, in the keys vLLM's DFlash (or, with
        ``markov_rank > 0``, DSpark: ``qwen3_dspark.py``, ``dspark/speculator.py``) loader reads."""
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        data = {
            "architectures": [DSPARK_ARCHITECTURE if self.is_dspark else DFLASH_ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "target_hidden_size": self.target_hidden_size,
            "num_target_layers": self.num_target_layers,
            "block_size": self.block_size,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
            },
        }
        if self.is_dspark:
            # the Qwen3DSparkModel backbone reads dflash_config as DFlash does; these are DSpark's own
            data.update({"markov_rank": self.markov_rank, "markov_head_type": "vanilla", "sample_from_anchor": True,
                         "dspark_bonus_anchor": False, "enable_confidence_head": self.enable_confidence_head,
                         "confidence_head_with_markov": self.enable_confidence_head})
        return data

    @classmethod
    def from_hf_config(cls, data: Mapping[str, Any]) -> "DFlashDraftConfig":
        """Inverse of :meth:`to_hf_config` (reads an exported ``config.json``)."""
        dflash = data.get("dflash_config") or {}
        missing = [k for k in ("mask_token_id", "target_layer_ids") if k not in dflash]
        if missing:
            raise ValueError(f"config.json has no dflash_config.{', dflash_config.'.join(missing)}; "
                             "is this a DFlash draft export?")
        if data.get("markov_rank") and data.get("sample_from_anchor", True) is not True:
            raise ValueError("config.json is a DSpark draft with sample_from_anchor=false (the fill-in layout); "
                             "draftcache trains and decodes only vLLM's default sample_from_anchor=true layout")
        theta, scaling = target_rope(text_config(data))
        return cls(
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=int(data["num_attention_heads"]),
            num_key_value_heads=int(data["num_key_value_heads"]),
            head_dim=int(data["head_dim"]),
            rms_norm_eps=float(data["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(data["max_position_embeddings"]),
            vocab_size=int(data["vocab_size"]),
            target_hidden_size=int(data["target_hidden_size"]),
            num_target_layers=int(data["num_target_layers"]),
            target_layer_ids=list(dflash["target_layer_ids"]),
            block_size=int(data["block_size"]),
            mask_token_id=int(dflash["mask_token_id"]),
            hidden_act=str(data.get("hidden_act", "silu")),
            markov_rank=int(data.get("markov_rank") or 0),
            enable_confidence_head=bool(data.get("enable_confidence_head", False)),
        )
