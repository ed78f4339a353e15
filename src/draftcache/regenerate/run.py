"""The ``draftcache regenerate`` run: settings, data and output checked first, then the engine,
then batches of conversations regenerated and committed one by one."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from draftcache.data import ChatTokenizer, NoConversationsError, load_conversations, set_chat_template
from draftcache.data.templates import template_sha256
from draftcache.regenerate.config import RegenerateConfig, RegenerateConfigError
from draftcache.regenerate.engines import Engine, HFEngine, VLLMEngine, default_engine, vllm_importable
from draftcache.regenerate.output import Progress, RegenerationOutput
from draftcache.regenerate.turns import TurnRegenerator, end_of_turn_ids

__all__ = ["RegenerateSummary", "regenerate"]

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class RegenerateSummary:
    """What a run did. Counts cover the whole output (earlier interrupted runs included);
    ``generated_tokens``/``wall_seconds`` this process only; ``resumed_from`` conversations were
    done before it started."""

    output: str
    engine: str
    progress: Progress
    skipped_records: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    wall_seconds: float = 0.0
    resumed_from: int = 0

    @property
    def skipped(self) -> dict[str, int]:
        """Conversations left out by reason: refused records and conversations cut to nothing."""
        merged = dict(self.skipped_records)
        for reason, n in self.progress.cut.items():
            merged[reason] = merged.get(reason, 0) + n
        return dict(sorted(merged.items()))

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.wall_seconds, 1e-9)

    def format(self) -> str:
        p = self.progress
        skipped = self.skipped
        skipped_text = (f"{sum(skipped.values())}: " + ", ".join(f"{k}={v}" for k, v in skipped.items())) if skipped \
            else "0"
        lines = [
            f"output       {self.output}",
            f"engine       {self.engine}",
            f"regenerated  {p.regenerated} conversations ({p.truncated} with a reply cut at --max-new-tokens, "
            f"{p.shortened} cut short)",
            f"truncated    {p.truncated}",
            f"skipped      {skipped_text}",
            f"generated    {self.generated_tokens} tokens in {self.wall_seconds:.1f} s "
            f"({self.tokens_per_s:.1f} tok/s, this run)",
        ]
        if self.resumed_from:
            lines.append(f"resumed      after {self.resumed_from} conversations")
        return "\n".join(lines)


def regenerate(cfg: RegenerateConfig, *, log: Callable[[str], None] = print) -> RegenerateSummary:
    """Write ``cfg.output``: the input conversations with every assistant turn replaced by the
    target's own reply (see :mod:`draftcache.regenerate.turns`), resumable after a kill.

    Raises :class:`RegenerateConfigError` for invalid settings, ``ResumeError`` for an output that
    exists without ``--resume`` or was made with other settings, and the data loader's errors
    (``FileNotFoundError``, ``BadRecordError`` with ``--strict``, ``NoConversationsError``).
    """
    from transformers import AutoConfig, GenerationConfig

    from draftcache.defaults import default_data_path, default_target_path
    from draftcache.targets.layout import text_config
    from draftcache.targets.loading import load_tokenizer, resolve_device

    cfg.validate()
    engine_name = cfg.engine or default_engine()
    if engine_name == "vllm" and not vllm_importable():
        raise RegenerateConfigError("--engine vllm: vLLM is not importable in this environment; install vllm, or "
                                    "use --engine hf")
    target_path = cfg.target_model or default_target_path()
    local = Path(target_path).expanduser().is_dir()
    config = AutoConfig.from_pretrained(target_path, local_files_only=local, trust_remote_code=cfg.trust_remote_code)
    max_model_len = cfg.max_model_len or getattr(text_config(config), "max_position_embeddings", None)
    if not isinstance(max_model_len, int):
        raise RegenerateConfigError("the target's config has no max_position_embeddings; pass --max-model-len")
    if max_model_len <= cfg.max_new_tokens:
        raise RegenerateConfigError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
                                    f"target's {max_model_len} positions; lower it")
    device = resolve_device(cfg.device) if engine_name == "hf" else None
    dtype = cfg.dtype if cfg.dtype != "auto" else _auto_dtype(engine_name, device)

    conversations = load_conversations(cfg.input_data or default_data_path(), split=cfg.split, strict=cfg.strict,
                                       shuffle_seed=cfg.shuffle_seed, trust_remote_code=cfg.trust_remote_code,
                                       lazy=True)
    tokenizer = load_tokenizer(target_path, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
    set_chat_template(tokenizer, cfg.chat_template)
    template = ChatTokenizer(tokenizer, None).chat_template  # refuses a template that fails a plain chat
    try:
        generation_config = GenerationConfig.from_pretrained(target_path, local_files_only=local)
    except OSError:
        generation_config = None
    stop_ids = end_of_turn_ids(tokenizer, template, generation_config)

    settings = {
        "target_model": cfg.target_model or "embedded-default-target",
        "target_config_sha256": _sha256(Path(target_path) / "config.json") if local else None,
        "chat_template_sha256": template_sha256(template),
        "engine": engine_name, "dtype": dtype, "temperature": float(cfg.temperature),
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "max_model_len": max_model_len,
        "input_data": conversations.input_data, "input_fingerprint": conversations.fingerprint,
        "split": conversations.split, "shuffle_seed": cfg.shuffle_seed,
    }
    output = RegenerationOutput(cfg.output, settings, resume=cfg.resume)
    done = output.progress.next_id
    if output.progress.covers(cfg.num_samples):
        log(f"{output.path} is complete ({done} conversations read); nothing to do")
        return RegenerateSummary(str(output.path), engine_name, output.progress, output.progress.skipped_records,
                                 resumed_from=done)

    # (id, conversation): id = rank among the input's valid conversations, the same on every run
    numbered = enumerate(conversations)
    limit = cfg.num_samples
    if limit is not None:
        numbered = islice(numbered, limit)
    first = next(numbered, None)
    if first is None:
        raise NoConversationsError(f"no valid conversation in {conversations.input_data!r} "
                                   f"({conversations.skipped.summary()})")

    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    engine = _build_engine(cfg, engine_name, target_path, device, dtype, stop_ids, max_model_len, tokenizer)
    output.start({"stop_token_ids": stop_ids, "engine_version": engine.version()})
    output.progress.finished = False  # a finished run asked for more --num-samples continues
    if done:
        log(f"resuming {output.path}: {done} conversations done")
    regenerator = TurnRegenerator(tokenizer, template, engine, max_new_tokens=cfg.max_new_tokens,
                                  max_model_len=max_model_len, seed=cfg.seed, strict=cfg.strict)
    from tqdm.auto import tqdm

    t0, tokens0 = time.perf_counter(), output.progress.generated_tokens
    try:
        with tqdm(total=limit, initial=min(done, limit or done), desc="regenerating", unit="chat",
                  disable=not cfg.progress) as bar:
            batch: list = []
            for item in _chain(first, numbered):
                if item[0] < done:
                    continue
                batch.append(item)
                if len(batch) == cfg.batch_size:
                    output.commit(regenerator.run(batch))
                    bar.update(len(batch))
                    batch = []
            if batch:
                output.commit(regenerator.run(batch))
                bar.update(len(batch))
        output.finish(conversations.skipped.as_dict(), limit)
    finally:
        output.close()
    return RegenerateSummary(str(output.path), f"{engine_name} ({engine.version()})", output.progress,
                             conversations.skipped.as_dict(), output.progress.generated_tokens - tokens0,
                             time.perf_counter() - t0, done)


def _chain(first, rest):
    yield first
    yield from rest


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _auto_dtype(engine_name: str, device: Any) -> str:
    """fp32 on CPUs (bf16 matmuls there are slow and inexact), bf16 on GPUs."""
    if engine_name == "hf":
        return "fp32" if device.type == "cpu" else "bf16"
    from vllm.platforms import current_platform

    return "fp32" if current_platform.is_cpu() else "bf16"


def _build_engine(cfg: RegenerateConfig, engine_name: str, target_path: str, device: Any, dtype: str,
                  stop_ids: list[int], max_model_len: int, tokenizer: Any) -> Engine:
    if engine_name == "vllm":
        from draftcache.regenerate.config import VLLM_RESERVED_ARGS
        from draftcache.targets.vllm_options import parse_vllm_args

        return VLLMEngine(target_path, stop_ids=stop_ids, temperature=cfg.temperature,
                          max_new_tokens=cfg.max_new_tokens, max_model_len=max_model_len, dtype=_DTYPES[dtype],
                          seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                          trust_remote_code=cfg.trust_remote_code, gpu_memory_utilization=cfg.gpu_memory_utilization,
                          llm_kwargs=parse_vllm_args(cfg.vllm_args, reserved=VLLM_RESERVED_ARGS))
    import torch

    from draftcache.targets.loading import load_target_model

    model = load_target_model(target_path, device=device, trust_remote_code=cfg.trust_remote_code,
                              dtype=getattr(torch, _DTYPES[dtype]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    return HFEngine(model, stop_ids=stop_ids, pad_token_id=pad, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens)
