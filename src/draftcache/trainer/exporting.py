"""``draftcache export``: turn a training checkpoint into the engines' EAGLE-3 layout."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from draftcache.trainer.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint_meta
from draftcache.trainer.eagle3.export import export_draft
from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel

__all__ = ["export_checkpoint", "load_checkpoint_draft"]


def load_checkpoint_draft(checkpoint: str | Path) -> tuple[Eagle3DraftModel, dict]:
    """The draft stored in a checkpoint (or a run directory's latest one) and its description."""
    ckpt = latest_checkpoint(checkpoint)
    if ckpt is None:
        raise CheckpointError(
            f"{checkpoint} is neither a checkpoint (draft.safetensors + state.json) nor a run directory with a "
            "'latest' checkpoint; pass the --output-dir of draftcache train or one of its step-* folders"
        )
    meta = read_checkpoint_meta(ckpt)
    extra = meta.get("extra", {})
    if "draft_config" not in extra:
        raise CheckpointError(f"{ckpt}/state.json does not describe the draft (no extra.draft_config)")
    # a frozen table is the target's: the export then leaves it to the engines (see export_draft)
    frozen = bool((meta.get("config") or {}).get("freeze_embeddings", True))
    model = Eagle3DraftModel(Eagle3DraftConfig.from_dict(extra["draft_config"]), freeze_embeddings=frozen)
    model.load_state_dict(load_file(str(ckpt / "draft.safetensors")))
    return model, extra


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, format: str = "eagle3") -> Path:
    """Export a checkpoint; a DFlash or DSpark run (``extra.method``) always exports vLLM's layout of that method."""
    ckpt = latest_checkpoint(checkpoint)
    if ckpt is not None and read_checkpoint_meta(ckpt).get("extra", {}).get("method") in ("dflash", "dspark"):
        return _export_dflash_checkpoint(ckpt, output)
    model, extra = load_checkpoint_draft(checkpoint)
    return export_draft(model, output, target_config=extra.get("target_config") or None,
                        target_model_id=extra.get("target_model_id"), format=format)


def _export_dflash_checkpoint(ckpt: Path, output: str | Path) -> Path:
    from draftcache.trainer.dflash.config import DFlashDraftConfig
    from draftcache.trainer.dflash.export import export_dflash_draft
    from draftcache.trainer.dflash.model import DFlashDraftModel

    extra = read_checkpoint_meta(ckpt)["extra"]
    model = DFlashDraftModel(DFlashDraftConfig.from_dict(extra["draft_config"]))
    model.load_state_dict(load_file(str(ckpt / "draft.safetensors")))  # includes the target's embeddings/lm_head
    return export_dflash_draft(model, output, target_model_id=extra.get("target_model_id"),
                               mask_token=extra.get("mask_token"))
