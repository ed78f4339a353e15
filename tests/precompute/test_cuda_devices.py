"""``--device cuda:N``: the device-to-host copies of every batch (the last of each shard
included) must be complete before the rows reach the shard file. With N > 0 a copy-done event
recorded on the current device (cuda:0) does not wait for cuda:N's copies, and stale rows reach
the disk; this test compares every stored row with a synchronous forward on the same device.

Skipped without CUDA (the pipeline's CPU path has no asynchronous copies); with one GPU it runs on
cuda:0, and catches the wrong-device event only where two or more are present.
"""

from __future__ import annotations

import pytest
import torch

from draftcache.cache_format import open_cache
from draftcache.data import load_conversations
from draftcache.precompute import PrecomputeConfig, run_precompute, tokenize_conversations
from draftcache.targets import HFEagle3TargetModel
from draftcache.targets.loading import load_target_model, load_tokenizer

from .helpers import target_dir, write_chat_subset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (asynchronous copies)")


def test_every_row_on_disk_is_the_forward_of_the_last_cuda_device(tmp_path):
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)  # the process's current device stays cuda:0, as in a one-process run
    chat = write_chat_subset(tmp_path / "chat.jsonl", 12)
    tokenizer = load_tokenizer(target_dir())
    model = load_target_model(target_dir(), device=device, dtype=torch.float32)
    target = HFEagle3TargetModel(model)
    conversations = load_conversations(str(chat))
    cfg = PrecomputeConfig(output_dir=str(tmp_path / "cache"), input_data=str(chat), seq_length=128, dtype="fp32",
                           batch_size=1, shard_size=3, supervision="probs", progress=False)
    samples = tokenize_conversations(cfg, tokenizer, conversations)
    run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                   model_id="default", log=lambda _: None)
    reader = open_cache(tmp_path / "cache", verify=True)
    for i, sample in enumerate(samples):
        ids = torch.as_tensor(sample.input_ids)[None].to(device)
        out = target.forward_capture(ids, torch.ones_like(ids))
        torch.cuda.synchronize(device)
        raw = reader.get_raw(i)
        assert torch.equal(raw["aux_hidden_states"], out.aux_hidden_states[0].cpu()), i
        assert torch.equal(raw["target_argmax"].long(), out.logits[0][torch.as_tensor(sample.loss_mask).bool().to(
            device)].argmax(-1).cpu()), i
