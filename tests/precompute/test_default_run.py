"""The README's main job: ``precompute-eagle3 --output-dir OUT`` on the embedded target and chats."""

from __future__ import annotations

import re

from draftcache.cache_format import open_cache
from draftcache.defaults import DEFAULT_DATA_PATH
from prewarmed import run_python

from .helpers import SUBPROCESS_ENV, default_dims, read_manifest_json, run_cli


def test_embedded_default_runs_offline_and_verifies(tmp_path):
    out = tmp_path / "cache"
    result = run_cli("--output-dir", str(out), "--quiet", timeout=300)
    assert result.returncode == 0, result.stderr

    manifest = read_manifest_json(out)
    num_records = sum(1 for line in DEFAULT_DATA_PATH.read_text(encoding="utf-8").splitlines() if line.strip())
    assert manifest["complete"] is True
    assert manifest["target"]["model_id"] == "draftcache/embedded-default-target"
    assert manifest["dataset"]["input_data"] == str(DEFAULT_DATA_PATH)
    assert manifest["num_samples"] + sum(manifest["dataset"]["skipped"].values()) == num_records
    # auto: hidden size < vocabulary and the Llama head rebuilds exactly
    hidden, vocab, _ = default_dims()
    supervision = manifest["supervision"]
    assert (supervision["encoding"], supervision["topk"]) == ("hidden", None)
    # bf16 storage of an fp32 target's final hidden state: the rebuild is close, not exact, and says how close
    assert 1e-5 < supervision["rebuild_max_abs_prob_diff"] < 1e-2
    assert f"auto: hidden, since hidden size {hidden} < draft vocab {vocab}" in result.stderr

    summary = result.stdout
    stats = manifest["stats"]
    assert re.search(rf"^samples +{manifest['num_samples']} \(computed {manifest['num_samples']} now\)$", summary, re.M)
    assert re.search(rf"^tokens +{stats['num_tokens']} \({stats['num_supervised']} supervised\)$", summary, re.M)
    assert re.search(r"^skipped +none$", summary, re.M)
    assert re.search(r"^disk +\d+\.\d\d MB, \d+\.\d bytes/token", summary, re.M)
    assert re.search(r"^wall time +\d+\.\d s", summary, re.M)
    assert len(open_cache(out)) == manifest["num_samples"]

    verify = run_python(["-m", "draftcache.cli", "verify", str(out)], env=SUBPROCESS_ENV,
                        timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"verify {out}: OK" in verify.stdout
