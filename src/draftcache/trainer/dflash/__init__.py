"""DFlash block drafts: config, block model, anchor-block loss, the training loop (from a DFlash
cache or a co-located target), the vLLM export and block speculative decoding."""
