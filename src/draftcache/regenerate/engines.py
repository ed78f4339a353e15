"""Engines that write the target's replies: vLLM's offline ``LLM`` API, or HF ``generate``.

Both take prompts as token ids (rendered by :mod:`draftcache.regenerate.turns` with the chat
template), so the two engines see the same inputs, and both stop a reply at the first
end-of-turn id or after ``max_new_tokens``. ``temperature == 0`` is greedy decoding; above 0
it is plain temperature sampling over the whole vocabulary (no top-k / top-p).

vLLM is imported only when :class:`VLLMEngine` is built: ``draftcache.regenerate`` works where
vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

__all__ = ["Engine", "Generation", "HFEngine", "VLLMEngine", "default_engine", "vllm_importable"]


@dataclass(frozen=True)
class Generation:
    """One reply: ``token_ids`` without the end-of-turn id; ``stopped`` is False when the reply
    hit ``max_new_tokens`` (or the model length) before an end-of-turn id."""

    token_ids: list[int]
    stopped: bool


class Engine(Protocol):
    """What the turn loop needs from an engine."""

    name: str

    def generate(self, prompts: Sequence[list[int]], seeds: Sequence[int]) -> list[Generation]:
        """One reply per prompt (token ids), in order; ``seeds[i]`` seeds prompt ``i``'s sampling."""
        ...

    def version(self) -> str:
        """What produced the replies (engine and library version), for the progress file."""
        ...


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_engine() -> str:
    """``vllm`` when it is importable, else ``hf``."""
    return "vllm" if vllm_importable() else "hf"


def _cut(token_ids: Sequence[int], stop_ids: frozenset[int]) -> Generation:
    """The reply up to its first end-of-turn id."""
    ids = [int(t) for t in token_ids]
    for i, t in enumerate(ids):
        if t in stop_ids:
            return Generation(ids[:i], True)
    return Generation(ids, False)


class HFEngine:
    """``model.generate`` over a left-padded batch with the KV cache.

    Left padding keeps every prompt's last token in the last column, so all rows start decoding
    together; ``generate`` derives position ids from the attention mask, so padding does not shift
    positions. Sampled runs (``temperature > 0``) seed the batch's generator with ``seeds[0]``:
    reproducible for the same batch composition.
    """

    name = "hf"

    def __init__(self, model: Any, *, stop_ids: Sequence[int], pad_token_id: int, temperature: float,
                 max_new_tokens: int) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.pad_token_id = int(pad_token_id)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        # A fresh config: the model's own generation_config (top_p, repetition penalty, ...) must not apply.
        self.generation_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=sorted(self.stop_ids),
                                                  pad_token_id=self.pad_token_id, use_cache=True, **sampling)

    def version(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}"

    def generate(self, prompts: Sequence[list[int]], seeds: Sequence[int]) -> list[Generation]:
        import torch

        if not prompts:
            return []
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)  # [B, L] left-padded
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)              # [B, L] 1 on real tokens
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        if self.generation_config.do_sample:
            torch.manual_seed(int(seeds[0]))
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      generation_config=self.generation_config)  # [B, L + new]
        return [_cut(row[width:].tolist(), self.stop_ids) for row in out.cpu()]


class VLLMEngine:
    """vLLM's offline ``LLM`` engine, fed token ids; one ``generate`` call per batch of prompts
    (vLLM schedules them together with paged attention, no padding)."""

    name = "vllm"

    def __init__(self, model_path: str, *, stop_ids: Sequence[int], temperature: float, max_new_tokens: int,
                 max_model_len: int, dtype: str, seed: int, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, gpu_memory_utilization: float | None = None,
                 llm_kwargs: dict[str, Any] | None = None) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        from draftcache.targets.vllm_options import engine_memory_kwargs

        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                      tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                      enforce_eager=current_platform.is_cpu())  # the CPU build does not capture graphs
        kwargs.update(engine_memory_kwargs(gpu_memory_utilization, llm_kwargs, on_cpu=current_platform.is_cpu()))
        self.llm = LLM(**kwargs)

    def version(self) -> str:
        import vllm

        return f"vllm {vllm.__version__}"

    def generate(self, prompts: Sequence[list[int]], seeds: Sequence[int]) -> list[Generation]:
        from vllm import SamplingParams

        if not prompts:
            return []
        params = [SamplingParams(temperature=self.temperature, top_k=0, top_p=1.0, max_tokens=self.max_new_tokens,
                                 stop_token_ids=sorted(self.stop_ids), detokenize=False,
                                 seed=int(seed) if self.temperature > 0 else None)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        replies = []
        for output in outputs:
            completion = output.outputs[0]
            reply = _cut(completion.token_ids, self.stop_ids)
            # vLLM may end on the model's eos without listing it in token_ids
            replies.append(Generation(reply.token_ids, reply.stopped or completion.finish_reason == "stop"))
        return replies
