"""A target whose forward yields inf on some samples gives a cache without them, each counted;
``--strict`` names the first; more than ``--max-non-finite`` of them aborts the run."""

from __future__ import annotations

import pytest
import torch

from draftcache.cache_format import open_cache, read_manifest, verify_cache
from draftcache.data import load_conversations
from draftcache.precompute import PrecomputeConfig, PrecomputeError, run_precompute, tokenize_conversations
from draftcache.targets import HFEagle3TargetModel
from draftcache.targets.loading import load_target_model, load_tokenizer

from .helpers import target_dir, write_chat_subset

NUM = 12
BAD = (1, 6)  # sample 1 in shard 0 ([0, 4)), sample 6 in shard 1 ([4, 8))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    chat = write_chat_subset(tmp_path_factory.mktemp("data") / "chat.jsonl", NUM)
    tokenizer = load_tokenizer(target_dir())
    conversations = load_conversations(str(chat))
    cfg = PrecomputeConfig(output_dir="unused", seq_length=96, progress=False)
    samples = tokenize_conversations(cfg, tokenizer, conversations)
    assert len(samples) == NUM
    return tokenizer, conversations, samples


def _target(samples, bad: tuple[int, ...]) -> HFEagle3TargetModel:
    """The embedded default target; a forward hook on its input embeddings makes the whole row inf
    for the samples ``bad`` (recognised by their tokens), as an fp16 overflow would."""
    model = load_target_model(target_dir(), device=torch.device("cpu"))
    poisoned = [samples[i].input_ids.tolist() for i in bad]

    def hook(_module, args, output):
        ids = args[0]
        for row in range(ids.shape[0]):
            if any(ids[row, :len(p)].tolist() == p for p in poisoned):
                output[row] = float("inf")
        return output

    model.get_input_embeddings().register_forward_hook(hook)
    return HFEagle3TargetModel(model)


def _run(parts, out, bad, **flags):
    tokenizer, conversations, samples = parts
    cfg = PrecomputeConfig(output_dir=str(out), seq_length=96, shard_size=4, batch_size=3, progress=False,
                           supervision="hidden", **flags)
    return run_precompute(cfg, target=_target(samples, bad), tokenizer=tokenizer, conversations=conversations,
                          samples=samples, model_id="embedded", log=lambda _: None)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_non_finite_samples_are_left_out_and_counted(tmp_path, parts, dtype):
    clean = _run(parts, tmp_path / "clean", (), dtype=dtype)
    summary = _run(parts, tmp_path / "hooked", BAD, dtype=dtype, max_non_finite=0.2)
    assert clean.non_finite == 0 and summary.non_finite == 2
    assert summary.num_samples == NUM - 2
    manifest = read_manifest(tmp_path / "hooked")
    assert manifest["stats"]["non_finite"] == 2
    assert [e.get("non_finite") for e in manifest["shards"]] == [[1], [6], None]
    assert [e["num_samples"] for e in manifest["shards"]] == [3, 3, 4]
    assert verify_cache(tmp_path / "hooked").ok
    # every other sample is exactly what the clean run stored (the same forward batches)
    kept = [i for i in range(NUM) if i not in BAD]
    a, b = open_cache(tmp_path / "clean"), open_cache(tmp_path / "hooked")
    assert len(b) == len(kept)
    for j, i in enumerate(kept):
        want, got = a.get_raw(i), b.get_raw(j)
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name].view(torch.uint8) if want[name].dtype == torch.float8_e4m3fn else want[name],
                               got[name].view(torch.uint8) if got[name].dtype == torch.float8_e4m3fn else got[name])
        assert torch.isfinite(b[j]["aux_hidden_states"].float()).all()


def test_strict_names_the_first_non_finite_sample(tmp_path, parts):
    with pytest.raises(PrecomputeError, match=r"sample 1 \(shard 0\): the target produced NaN/Inf in its "
                                              r"aux_hidden_states and supervision .*\(--strict\)"):
        _run(parts, tmp_path / "strict", BAD, strict=True)


def test_too_many_non_finite_samples_abort_the_run(tmp_path, parts):
    with pytest.raises(PrecomputeError, match=r"2 of 12 samples \(16.7%\) so far made the target produce NaN/Inf "
                                              r"\(first: samples \[1, 6\]\), more than --max-non-finite 0.1 of them"):
        _run(parts, tmp_path / "abort", BAD, max_non_finite=0.1)
    assert not read_manifest(tmp_path / "abort")["complete"]
