"""Crash safety: a precompute SIGKILLed mid-run and resumed equals an uninterrupted run byte for
byte; a second writer is locked out; resuming with other settings is refused naming every field;
damaged committed files are found and rewritten."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from draftcache.cache_format.resume import read_journals
from draftcache.precompute import PrecomputeConfig, PrecomputeError, precompute_from_config
from draftcache.precompute.cli import app

from .helpers import SUBPROCESS_ENV, default_dims, file_digests, precompute_cmd, read_manifest_json, target_dir, \
    write_chat_subset

NUM_SAMPLES = 80
SHARD_SIZE = 8
STALE_TEMPORARY = "shard-000017.safetensors.tmp-999999"


def _args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--target-model", target_dir(), "--input-data", str(data), "--output-dir", str(out),
            "--dtype", "fp32", "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--seq-length", "128",
            "--num-samples", str(NUM_SAMPLES), "--quiet", *extra]


def _wait_for_first_shard(proc: subprocess.Popen, out: Path, timeout: float = 180) -> int:
    """Poll the commit journal (fsynced line per committed shard) until a shard is committed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed mid-way: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        shards = len(_committed(out)) if out.is_dir() else 0
        if shards >= 1:
            return shards
        time.sleep(0.02)
    pytest.fail("no shard was committed in time")


def _committed(out: Path) -> list[dict]:
    """The shard entries a resume would consider: the manifest's, then the journals' (a line a
    kill tore is skipped, as the resume skips it)."""
    try:
        listed = read_manifest_json(out)["shards"]
    except (FileNotFoundError, json.JSONDecodeError):
        listed = []
    return [*listed, *read_journals(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run SIGKILLed after its first committed shard, then resumed, and an uninterrupted run.

    While the doomed run holds its directory, a second precompute is started on it and must be
    refused by the lock. The uninterrupted run goes through the same CLI in-process (while the
    resumed one starts up): with one thread on each side, fp32 results are equal across processes.
    """
    root = tmp_path_factory.mktemp("resume")
    data = write_chat_subset(root / "chat.jsonl", NUM_SAMPLES + 20)
    full, killed = root / "full", root / "killed"
    doomed = subprocess.Popen(precompute_cmd(*_args(killed, data)), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_first_shard(doomed, killed)
        second = CliRunner().invoke(app, _args(killed, data))
        second_resume = CliRunner().invoke(app, _args(killed, data, "--resume"))
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    after_kill = read_manifest_json(killed)
    committed_at_kill = _committed(killed)
    lock_after_kill = json.loads((killed / ".lock").read_text())
    (killed / STALE_TEMPORARY).write_bytes(b"half a shard")
    resuming = subprocess.Popen(precompute_cmd(*_args(killed, data, "--resume")), env=SUBPROCESS_ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reference = CliRunner().invoke(app, _args(full, data))  # while the resumed run starts up
        stdout, stderr = resuming.communicate(timeout=300)
    finally:
        if resuming.poll() is None:
            resuming.kill()
            resuming.wait()
    assert reference.exit_code == 0, reference.stderr
    resumed = subprocess.CompletedProcess(resuming.args, resuming.returncode, stdout, stderr)
    return dict(root=root, data=data, full=full, killed=killed, doomed_pid=doomed.pid, second=second,
                second_resume=second_resume, after_kill=after_kill, committed_at_kill=committed_at_kill, lock_after_kill=lock_after_kill,
                resumed=resumed)


def test_second_writer_is_refused_naming_the_pid(runs):
    pid = runs["doomed_pid"]
    for result in (runs["second"], runs["second_resume"]):
        assert result.exit_code == 1
        assert f"is locked by process {pid} on this host" in result.stderr
        assert "another draftcache process is writing this cache" in result.stderr


def test_the_kill_left_a_partial_cache_and_a_stale_lock(runs):
    manifest = runs["after_kill"]
    assert manifest["complete"] is False
    assert 1 <= len(runs["committed_at_kill"]) < NUM_SAMPLES // SHARD_SIZE
    assert runs["lock_after_kill"]["pid"] == runs["doomed_pid"]


def test_resume_after_sigkill_equals_an_uninterrupted_run(runs):
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    start = sum(e["num_samples"] for e in runs["committed_at_kill"])
    computed = f"samples     {NUM_SAMPLES} (computed {NUM_SAMPLES - start} now, resumed at sample {start})"
    assert computed in resumed.stdout
    # the dead process's lock did not block, and is gone afterwards
    assert f"removing stale lock {runs['killed'] / '.lock'} left by process {runs['doomed_pid']}" in resumed.stderr
    assert not (runs["killed"] / ".lock").exists()
    # stale temporaries are removed; the result equals the uninterrupted run byte for byte,
    # manifest included (it records no timestamps)
    assert f"resume: removed stale temporary {STALE_TEMPORARY}" in resumed.stderr
    assert file_digests(runs["killed"]) == file_digests(runs["full"])
    assert read_manifest_json(runs["killed"]) == read_manifest_json(runs["full"])
    assert read_manifest_json(runs["killed"])["complete"] is True


def _config(out: Path, data: Path, **changes) -> PrecomputeConfig:
    settings = dict(output_dir=str(out), target_model=target_dir(), input_data=str(data), dtype="fp32",
                    shard_size=SHARD_SIZE, batch_size=2, seq_length=128, num_samples=NUM_SAMPLES, resume=True,
                    progress=False)
    return PrecomputeConfig(**{**settings, **changes})


def test_resume_with_other_settings_is_refused_naming_every_field(runs):
    killed, data = runs["killed"], runs["data"]
    before = file_digests(killed)
    original = data.read_bytes()
    lines = original.decode().splitlines()
    lines[0] = lines[0].replace("Answer carefully.", "Answer very carefully.")
    data.write_text("\n".join(lines) + "\n")
    try:
        cfg = _config(killed, data, seq_length=96, dtype="bf16", draft_vocab_size=500, shuffle_seed=7,
                      aux_layer_ids=(1, 2, 3), supervision="probs", shard_size=16, num_samples=100)
        with pytest.raises(PrecomputeError) as refused:
            precompute_from_config(cfg, log=lambda _: None)
    finally:
        data.write_bytes(original)
    message = str(refused.value)
    assert message.startswith(f"--resume refused: the cache in {killed} was made with a different configuration "
                              "(11 field(s) differ, cache value != this run's)")
    for line in ("seq_length: 128 != 96  [--seq-length]",
                 'dtype: "fp32" != "bf16"  [--dtype]',
                 f"draft_vocab.selected_token_ids: [0, 1, 2, ... ({default_dims()[1]} items)] != "
                 "[0, 1, 2, ... (500 items)]",
                 "dataset.shuffle_seed: 42 != 7  [--shuffle-seed]",
                 "[--input-data contents]",
                 "capture.layer_ids: [1, 3, 4] != [1, 2, 3]  [--aux-layer-ids]",
                 'supervision.encoding: "hidden" != "probs"  [--supervision]',
                 "shard_size: 8 != 16  [--shard-size]",
                 f"dataset.num_samples: {NUM_SAMPLES} != 100  [--num-samples]",
                 f"\n  - num_samples: {NUM_SAMPLES} != "):  # fewer usable samples: 100 minus those too long
        assert line in message
    assert "[--draft-vocab-size]" in message
    assert "[sample lengths / --shard-size / --max-shard-mb]" in message  # shard_boundaries
    assert file_digests(killed) == before  # nothing changed, and the lock was released
    assert not (killed / ".lock").exists()


def test_damaged_committed_files_are_found_and_rewritten(runs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runs["killed"], cache)
    shard = cache / "shard-000001.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one flipped bit in the data section
    shard.write_bytes(bytes(damaged))
    (cache / "shard-000004.safetensors").unlink()
    embeddings = cache / "target_embeddings.safetensors"
    embeddings.write_bytes(embeddings.read_bytes()[:-4])  # truncated
    logs: list[str] = []
    summary = precompute_from_config(_config(cache, runs["data"]), log=logs.append)
    log = "\n".join(logs)
    assert "resume: shard-000001.safetensors: checksum mismatch" in log
    assert "resume: shard-000004.safetensors: missing (the manifest lists it as committed)" in log
    assert "resume: target_embeddings.safetensors: size mismatch" in log
    committed = sum(e["num_samples"] for e in read_manifest_json(runs["killed"])["shards"])
    # every sound shard is kept (also those after the damaged one); only the damaged and missing ones are recomputed
    assert summary.resumed_from_sample == committed - 2 * SHARD_SIZE
    assert file_digests(cache) == file_digests(runs["full"])


def test_resuming_a_complete_cache_changes_nothing(runs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runs["full"], cache)
    summary = precompute_from_config(_config(cache, runs["data"]), log=lambda _: None)
    assert (summary.computed_samples, summary.resumed_from_sample, summary.num_samples) == (0, NUM_SAMPLES,
                                                                                            NUM_SAMPLES)
    assert file_digests(cache) == file_digests(runs["full"])
