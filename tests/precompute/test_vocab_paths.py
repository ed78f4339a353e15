"""``--draft-vocab-size N`` builds ONE vocabulary: precompute (a ``probs`` cache), the online
source, and a ``hidden`` cache choosing its vocabulary at training time give the same d2t, with
the tokenizer's special tokens kept; the supervised-token counts come from one bincount equal to
counting sample by sample."""

from __future__ import annotations

import torch

from draftcache.cache_format import open_cache
from draftcache.data import load_conversations
from draftcache.data.vocab import count_supervised_tokens, supervised_token_counts
from draftcache.precompute import PrecomputeConfig, run_precompute, tokenize_conversations
from draftcache.targets import HFEagle3TargetModel
from draftcache.targets.loading import load_target_model, load_tokenizer
from draftcache.trainer.eagle3.sources import CachedSource, OnlineSource

from .helpers import target_dir, write_chat_subset

N = 40  # small enough that the special tokens would not all make it in by frequency


def test_same_draft_vocab_size_gives_the_same_d2t_in_all_three_paths(tmp_path):
    chat = write_chat_subset(tmp_path / "chat.jsonl", 6)
    tokenizer = load_tokenizer(target_dir())
    target = HFEagle3TargetModel(load_target_model(target_dir(), device=torch.device("cpu")))
    conversations = load_conversations(str(chat))

    def precompute(out, **flags):
        cfg = PrecomputeConfig(output_dir=str(out), input_data=str(chat), seq_length=64, dtype="fp32",
                               progress=False, **flags)
        samples = tokenize_conversations(cfg, tokenizer, conversations)
        run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                       model_id="default", log=lambda _: None)
        return samples

    samples = precompute(tmp_path / "probs", supervision="probs", draft_vocab_size=N)
    precompute(tmp_path / "hidden", supervision="hidden")
    from_precompute = open_cache(tmp_path / "probs").draft_vocab
    from_hidden_cache = CachedSource(str(tmp_path / "hidden"), draft_vocab_size=N).vocab
    online = OnlineSource(target=target, tokenizer=tokenizer, samples=samples, model_id="default",
                          draft_vocab_size=N).vocab

    specials = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                            tokenizer.unk_token_id) if i is not None}
    assert specials and specials <= set(from_precompute.selected_token_ids.tolist())
    assert open_cache(tmp_path / "hidden").manifest["draft_vocab"]["special_token_ids"]
    for vocab in (from_hidden_cache, online):
        assert torch.equal(vocab.d2t, from_precompute.d2t)
        assert torch.equal(vocab.selected_token_ids, from_precompute.selected_token_ids)


def test_one_bincount_equals_counting_sample_by_sample():
    gen = torch.Generator().manual_seed(0)
    vocab_size = 1000
    ids = [torch.randint(0, vocab_size, (int(n),), generator=gen) for n in torch.randint(1, 50, (30,), generator=gen)]
    masks = [torch.randint(0, 2, (len(i),), generator=gen) for i in ids]
    one_by_one = torch.zeros(vocab_size, dtype=torch.int64)
    for i, m in zip(ids, masks):
        count_supervised_tokens(i, m, vocab_size, one_by_one)
    assert torch.equal(supervised_token_counts(ids, masks, vocab_size), one_by_one)
    assert supervised_token_counts([], [], vocab_size).tolist() == [0] * vocab_size
