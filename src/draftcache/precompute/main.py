"""Wire the components for one precompute run, cheapest checks first: settings, device, output
directory, the target's config, the data (read and tokenized); only then are the weights loaded."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from draftcache.data import TokenStore, load_conversations, set_chat_template
from draftcache.precompute.config import ConfigError, PrecomputeConfig
from draftcache.precompute.distributed import DistContext, gather_step, init_distributed, run_step, \
    shutdown_distributed
from draftcache.precompute.engines import build_target, check_engine
from draftcache.precompute.fingerprint import chat_template_fingerprint
from draftcache.precompute.output_dir import PrecomputeError, check_output_dir
from draftcache.precompute.pipeline import run_precompute, tokenize_conversations
from draftcache.precompute.summary import PrecomputeSummary
from draftcache.targets import default_dflash_layer_ids, num_hidden_layers
from draftcache.targets.layout import text_config
from draftcache.targets.loading import load_tokenizer, resolve_device

__all__ = ["precompute_from_config", "DEFAULT_MODEL_ID"]

#: What the manifest names the embedded default target.
DEFAULT_MODEL_ID = "draftcache/embedded-default-target"


def precompute_from_config(cfg: PrecomputeConfig, *, log: Callable[[str], None] = print) -> PrecomputeSummary:
    """Load the target and data named by ``cfg`` (the embedded defaults when unset) and run the precompute.

    Raises ``ConfigError`` for invalid settings (before anything is loaded), ``PrecomputeError``
    for an output directory that cannot be used or a refused resume, and the data loader's
    errors (``FileNotFoundError``, ``BadRecordError``, ...) for unusable input.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group first (gloo on the CPU,
    NCCL on ``cuda:<LOCAL_RANK>``), every rank loads the same data and the target, and the ranks
    share the shards (see ``draftcache.precompute.writer``); a failure on any rank raises
    ``RankFailedError`` on every rank.
    """
    cfg.validate()
    ctx = DistContext.from_env()
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    import torch.distributed as torch_dist

    joined = ctx.is_distributed and not torch_dist.is_initialized()  # leave a caller's process group alone
    device = init_distributed(ctx, device)
    try:
        return _run(cfg, ctx, device, log)
    finally:
        if joined:
            shutdown_distributed(ctx)


def _run(cfg: PrecomputeConfig, ctx: DistContext, device, log: Callable[[str], None]) -> PrecomputeSummary:
    from draftcache.defaults import default_data_path, default_target_path

    target_path = cfg.target_model or default_target_path()

    def check() -> None:
        if cfg.device_map is not None and ctx.is_distributed:
            raise ConfigError("--device-map auto splits one target over every visible GPU in ONE process; under "
                              "torchrun each rank already has its own GPU (cuda:LOCAL_RANK). Drop one of them.")
        if ctx.is_main:  # rank 0 alone owns the directory; the others would see its lock
            check_output_dir(cfg.output_dir, cfg.resume)
        _check_target_config(cfg, target_path)
        check_engine(cfg, distributed=ctx.is_distributed)

    run_step(ctx, "checking the output directory and target", check)

    def load():
        # lazy: records are read while tokenizing, only until --num-samples samples survive
        conversations = load_conversations(cfg.input_data or default_data_path(), split=cfg.split, strict=cfg.strict,
                                           shuffle_seed=cfg.shuffle_seed, num_samples=cfg.num_samples,
                                           trust_remote_code=cfg.trust_remote_code, lazy=True)
        tokenizer = load_tokenizer(target_path, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
        set_chat_template(tokenizer, cfg.chat_template)
        if cfg.resume and ctx.is_main:
            _check_resume_template(Path(cfg.output_dir), tokenizer)
        loaded.update(conversations=conversations, tokenizer=tokenizer, samples=None)
        if not ctx.is_main:
            return None
        # rank 0 tokenizes once, into a store on disk; the ranks on its host read it
        store = tokenize_conversations(cfg, tokenizer, conversations, store_dir=stores.new())
        loaded["samples"] = store
        return socket.gethostname(), str(store.directory)

    stores = _TokenStores()
    loaded: dict = {}
    try:
        # patient: the other ranks wait while rank 0 tokenizes (hours for millions of conversations)
        host, shared = gather_step(ctx, "loading and tokenising the data", load, patient=True)[0]
        conversations, tokenizer, samples = loaded["conversations"], loaded["tokenizer"], loaded["samples"]
        if samples is None:
            def open_store():
                if host == socket.gethostname() and Path(shared).is_dir():
                    return TokenStore(shared)
                # another host: tokenize here, once per rank (the same samples: deterministic)
                return tokenize_conversations(replace(cfg, progress=False), tokenizer, conversations,
                                              store_dir=stores.new())

            samples = run_step(ctx, "opening the tokenized data", open_store)
        else:
            run_step(ctx, "opening the tokenized data", lambda: None)
        return _run_target(cfg, ctx, device, log, target_path, conversations, tokenizer, samples)
    finally:
        stores.remove()


def _run_target(cfg: PrecomputeConfig, ctx: DistContext, device, log: Callable[[str], None], target_path: str,
                conversations, tokenizer, samples) -> PrecomputeSummary:
    if not cfg.progress or not ctx.is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar

    where = f"into vLLM (tensor parallel {cfg.tensor_parallel_size})" if cfg.engine == "vllm" else f"onto {device}"
    target = run_step(ctx, f"loading the target {where}", lambda: build_target(cfg, target_path, device))
    try:
        return run_precompute(cfg, target=target, tokenizer=tokenizer, conversations=conversations, samples=samples,
                              model_id=cfg.target_model or DEFAULT_MODEL_ID, log=log, dist=ctx)
    finally:
        close = getattr(target, "close", None)  # an engine-served target stops its engine
        if callable(close):
            close()


class _TokenStores:
    """The temporary token stores this process created (``$TMPDIR/draftcache-tokens-*``), removed
    when the run ends, however it ends (a SIGKILL leaves one behind)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def new(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="draftcache-tokens-"))
        self.paths.append(path)
        return path

    def remove(self) -> None:
        for path in self.paths:
            shutil.rmtree(path, ignore_errors=True)


def _check_target_config(cfg: PrecomputeConfig, path: str) -> None:
    """Check the flags that depend on the target (layer ids, vocabulary sizes) against its config."""
    from transformers import AutoConfig

    local = Path(os.path.expanduser(path))
    if path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise PrecomputeError(f"--target-model {path} does not exist; pass a local model directory or a Hugging Face "
                              "model name such as 'meta-llama/Llama-3.1-8B-Instruct'")
    if local.is_dir() and not (local / "config.json").is_file():
        raise PrecomputeError(f"--target-model {path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(local) if local.is_dir() else path, local_files_only=local.is_dir(),
                                        trust_remote_code=cfg.trust_remote_code)
    vocab_size = getattr(text_config(config), "vocab_size", None)
    problems = cfg.target_problems(num_layers=num_hidden_layers(config),
                                   vocab_size=vocab_size if isinstance(vocab_size, int) else 1 << 62)
    if cfg.method == "dflash" and cfg.target_layer_ids is None:
        try:
            default_dflash_layer_ids(num_hidden_layers(config), cfg.draft_layers)
        except ValueError as exc:
            problems.append(f"--draft-layers {cfg.draft_layers}: {exc} (--target-layer-ids)")
    if problems:
        raise ConfigError("invalid precompute settings for this target:\n  - " + "\n  - ".join(problems))


def _check_resume_template(out: Path, tokenizer) -> None:
    """Refuse, before any data is tokenized, to resume a cache made with another chat template."""
    from draftcache.cache_format import MANIFEST_FILE, read_manifest

    if not (out / MANIFEST_FILE).is_file():
        return
    try:
        made_with = read_manifest(out)["tokenizer"]["chat_template_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the resume check proper reports a damaged manifest
    now = chat_template_fingerprint(tokenizer)
    if made_with != now:
        raise PrecomputeError(
            f"--resume refused: the cache in {out} was made with a different chat template "
            f"(tokenizer.chat_template_fingerprint: {made_with} != {now})  [--chat-template]. Rerun with the "
            "--chat-template it was made with (none for the tokenizer's own), or write a new cache to another "
            "--output-dir."
        )
