"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is a directory ``step-0000123/`` holding ``draft.safetensors`` (the draft's state
dict), ``optimizer.safetensors`` (AdamW moments, flattened as ``<param_index>.<key>``),
``rng.safetensors`` (torch CPU/CUDA generator states) and ``state.json`` (step, epoch, batches
consumed in the epoch, scheduler state, optimizer hyper-parameters, the resolved train config).
It is written to ``step-NNNNNNN.tmp-<pid>``, every file fsync'd, then renamed into place, and
``latest`` (a one-line file naming the newest checkpoint) is replaced atomically afterwards
(cache_format's commit protocol): a run killed at any moment leaves the previous checkpoint
intact. Files and folders are created with the process umask's modes (0644 / 0755 under 022).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from draftcache.cache_format.checksum import atomic_write_bytes, fsync_dir

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "read_checkpoint_meta", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the path."""


@dataclass
class TrainState:
    step: int = 0            # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed (data position)
    tokens_seen: int = 0


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    config: dict,
    extra: dict | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``run_dir/step-NNNNNNN`` atomically and point ``run_dir/latest`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:07d}"
    final = run_dir / name
    tmp = run_dir / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # safetensors' save_file creates its files 0600 whatever the umask: serialise, then write plainly
    (tmp / "draft.safetensors").write_bytes(save(model_sd))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    (tmp / "optimizer.safetensors").write_bytes(save(opt_tensors))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    (tmp / "rng.safetensors").write_bytes(save(rng))
    meta = {
        "state": state.__dict__,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_random": _encode_py_random(random.getstate()),
        "config": config,
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_bytes(run_dir / "latest", (name + "\n").encode())  # also fsyncs run_dir (the rename above)
    _prune(run_dir, keep_last)
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    ckpts = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and ".tmp-" not in p.name)
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob("*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _encode_py_random(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_py_random(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint a run directory's ``latest`` names, a checkpoint directory itself, or None."""
    path = Path(path)
    if (path / "draft.safetensors").is_file():
        return path
    pointer = path / "latest"
    if pointer.is_file():
        ckpt = path / pointer.read_text().strip()
        if (ckpt / "draft.safetensors").is_file():
            return ckpt
        raise CheckpointError(f"{pointer} names {ckpt.name}, which is missing or incomplete")
    return None


def read_checkpoint_meta(ckpt: str | Path) -> dict:
    """The JSON half of a checkpoint (state, train config, draft/target description)."""
    path = Path(ckpt) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_checkpoint(ckpt: str | Path, *, model, optimizer=None, scheduler=None) -> tuple[TrainState, dict]:
    """Restore model (and optimizer, scheduler, RNG) from ``ckpt``; returns (state, saved config)."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        model_sd = load_file(str(ckpt / "draft.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {e}") from e
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in model_sd.items()})
    if optimizer is not None:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
        for pid, scalars in meta["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_decode_py_random(meta["python_random"]))
    return TrainState(**meta["state"]), meta.get("config", {})
