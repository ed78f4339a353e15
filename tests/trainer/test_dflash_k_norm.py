"""vLLM's CPU build applies layer 0's ``k_norm`` to every DFlash layer's context keys
(docs/DFLASH.md): ``--freeze-k-norm`` keeps every layer's ``k_norm`` equal, and ``draftcache
export`` warns when a multi-layer draft's ``k_norm`` weights differ."""

from __future__ import annotations

import subprocess

import torch
from safetensors.torch import load_file

from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash
from prewarmed import SUBPROCESS_ENV, run_python



def _train(out, **kw):
    cfg = DFlashTrainConfig(output_dir=str(out), num_draft_layers=2, max_steps=2, block_size=4, num_anchors=8,
                            batch_tokens=256, val_fraction=0.0, progress=False, export=False, **kw)
    train_dflash(cfg, log=lambda _: None)


def _export(run, out) -> subprocess.CompletedProcess:
    return run_python(["-m", "draftcache.cli", "export", str(run), "--output", str(out)],
                      env=SUBPROCESS_ENV, timeout=300)



def test_export_warns_about_untied_k_norm_and_freeze_k_norm_avoids_it(tmp_path):
    _train(tmp_path / "free")
    r = _export(tmp_path / "free", tmp_path / "free-export")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: this 2-layer DFlash draft has per-layer k_norm weights" in r.stderr
    assert "--freeze-k-norm" in r.stderr
    free = load_file(str(tmp_path / "free-export" / "model.safetensors"))
    assert not torch.equal(free["layers.0.self_attn.k_norm.weight"], free["layers.1.self_attn.k_norm.weight"])

    _train(tmp_path / "frozen", freeze_k_norm=True)
    r = _export(tmp_path / "frozen", tmp_path / "frozen-export")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning" not in r.stderr and "(dflash)" in r.stdout
    frozen = load_file(str(tmp_path / "frozen-export" / "model.safetensors"))
    for i in range(2):
        assert torch.equal(frozen[f"layers.{i}.self_attn.k_norm.weight"], torch.ones(16))  # head_dim 16
    # the rest of the draft did train
    assert not torch.equal(frozen["layers.1.self_attn.q_norm.weight"], torch.ones(16))
