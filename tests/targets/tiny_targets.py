"""Tiny real Hugging Face models for tests/targets: fp32, 8 layers, hidden 32, vocab 128, built from configs.

Nothing is downloaded.

Families cover the layouts ``draftcache.targets`` must find:
``model.model.layers`` (llama, qwen2, qwen3, mistral), ``model.model.language_model.layers``
(llava, gemma3: multimodal models run on text only) and ``model.transformer.h`` (gpt2).
mistral and gemma3 get ``sliding_window=4`` so packing tests exercise the window
(mistral: every layer windowed, one mask; gemma3: hybrid layers, a dict of masks).
"""

from __future__ import annotations

import functools

import torch

VOCAB = 128
LAYERS = 8
HIDDEN = 32

_TEXT = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "llava", "gemma3", "gpt2"]
#: Families whose attention takes a custom 4D mask in both eager and sdpa (packing parity).
PACKING_FAMILIES = ["llama", "qwen3", "mistral", "llava", "gemma3"]


def _config(family: str, num_layers: int):
    import transformers as tf

    text = dict(_TEXT, num_hidden_layers=num_layers)
    if family == "llama":
        return tf.LlamaConfig(**text)
    if family == "qwen2":
        return tf.Qwen2Config(**text)
    if family == "qwen3":
        return tf.Qwen3Config(**text, head_dim=8)
    if family == "mistral":
        return tf.MistralConfig(**text, sliding_window=4)
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=HIDDEN,
            n_layer=num_layers,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    if family == "llava":
        return tf.LlavaConfig(
            text_config=tf.LlamaConfig(**text), vision_config=tf.CLIPVisionConfig(**vision), image_token_index=VOCAB - 1
        )
    if family == "gemma3":
        return tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**text, head_dim=8, sliding_window=4),
            vision_config=tf.SiglipVisionConfig(**vision),
            mm_tokens_per_image=4,
            image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
        )
    raise ValueError(family)


@functools.cache
def _cached_model(family: str, attn: str, num_layers: int):
    import transformers as tf

    torch.manual_seed(0)
    config = _config(family, num_layers)
    if family == "llava":
        cls = tf.LlavaForConditionalGeneration
    elif family == "gemma3":
        cls = tf.Gemma3ForConditionalGeneration
    else:
        cls = tf.AutoModelForCausalLM
    if cls is tf.AutoModelForCausalLM:
        model = cls.from_config(config, attn_implementation=attn, dtype=torch.float32)
    else:
        model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def build_model(family: str, attn: str = "sdpa", *, num_layers: int = LAYERS, fresh: bool = False):
    """A tiny fp32 model of ``family``; shared across tests unless ``fresh`` (for tests that alter it)."""
    if fresh:
        _cached_model.cache_clear()
        model = _cached_model(family, attn, num_layers)
        _cached_model.cache_clear()
        return model
    return _cached_model(family, attn, num_layers)


def reference_hidden_states(model, input_ids, attention_mask, **kwargs):
    """HF's own ``output_hidden_states`` and logits, for comparison."""
    with torch.no_grad():
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **kwargs
        )
    return out.hidden_states, out.logits


def hook_snapshot(model) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Ids of every forward hook and pre-hook in ``model``, per module.

    Compared before/after instead of asserting "no hooks": transformers 5.x permanently installs
    its own (inert) output-capturing hooks on the first ``output_hidden_states=True`` call.
    """
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }
