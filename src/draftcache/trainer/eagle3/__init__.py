"""EAGLE-3 drafts: the draft model, the training-time-test loss, the training loop (from a cache or
a co-located target), the SGLang/vLLM export and chain speculative decoding."""
