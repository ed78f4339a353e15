"""``draftcache train --method dflash`` through the real CLI on the embedded default target and chats."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from safetensors.torch import load_file

from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash
from prewarmed import SUBPROCESS_ENV, run_python

ARGS = ["--max-steps", "4", "--save-every", "2", "--log-every", "2", "--eval-every", "2", "--block-size", "4",
        "--num-anchors", "32", "--batch-tokens", "384", "--quiet"]


def _cli(*args):
    return run_python(["-m", "draftcache.cli", *args], env=SUBPROCESS_ENV, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dflash") / "run"
    r = _cli("train", "--method", "dflash", "--output-dir", str(out), *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_train_reports_block_metrics_and_exports(run):
    out, stdout = run
    assert re.search(r"val acc/block slot      [0-9.]+ [0-9.]+ [0-9.]+\n", stdout)  # B - 1 = 3 slots
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(len(r["acc"]) == 3 for r in train)
    assert all(r["sim_tau"] >= 1.0 for r in records)
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 4
    assert config["dflash_config"]["target_layer_ids"] == [4]  # default for one draft layer on L=8: [L // 2]


def test_export_command_writes_the_same_draft(run, tmp_path):
    out, _ = run
    r = _cli("export", str(out), "--output", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(out / "export" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_continues_exactly(run, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "step-0000004")
    shutil.rmtree(resumed / "export")
    (resumed / "latest").write_text("step-0000002\n")
    cfg = DFlashTrainConfig(output_dir=str(resumed), max_steps=4, save_every=2, log_every=2, eval_every=2,
                            block_size=4, num_anchors=32, batch_tokens=384, progress=False, resume=True)
    train_dflash(cfg, log=lambda _: None)
    a, b = load_file(str(out / "step-0000004" / "draft.safetensors")), load_file(
        str(resumed / "step-0000004" / "draft.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    changed = DFlashTrainConfig(output_dir=str(resumed), max_steps=4, block_size=8, progress=False, resume=True)
    with pytest.raises(ValueError, match="block_size: 4 != 8"):
        train_dflash(changed, log=lambda _: None)
    reshuffled = DFlashTrainConfig(output_dir=str(resumed), max_steps=4, save_every=2, log_every=2, eval_every=2,
                                   block_size=4, num_anchors=32, batch_tokens=384, progress=False, resume=True,
                                   shuffle="global")
    with pytest.raises(ValueError, match="shuffle: 'window' != 'global'"):
        train_dflash(reshuffled, log=lambda _: None)


def test_bad_settings_exit_2_naming_them(tmp_path):
    """Refused before any model loads: the CLI in this process (Typer's runner)."""
    from typer.testing import CliRunner

    from draftcache.cli import app

    r = CliRunner().invoke(app, ["train", "--method", "dflash", "--output-dir", str(tmp_path / "x"), "--block-size", "1"])
    assert r.exit_code == 2 and "--block-size must be >= 2" in r.stderr
    r = CliRunner().invoke(app, ["train", "--method", "dflash", "--output-dir", str(tmp_path / "y"),
                                 "--cached-target-path", str(tmp_path)])
    assert r.exit_code == 1 and "is not a draftcache cache directory" in r.stderr  # not a cache: named
    assert "Traceback" not in r.stderr
