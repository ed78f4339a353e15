"""``precompute-eagle3``: run the frozen target once over a chat corpus and write the cache.

Example::

    precompute-eagle3 --target-model meta-llama/Llama-3.1-8B-Instruct \\
        --input-data Aeala/ShareGPT_Vicuna_unfiltered --output-dir /data/cache \\
        --seq-length 2048 --draft-vocab-size 32000 --batch-size 4 --shard-size 256 --dtype bf16

With neither ``--target-model`` nor ``--input-data`` it runs on the small trained target and chat
set shipped inside the package.

Under ``torchrun --nproc_per_node=N -m draftcache.precompute ...`` the ranks share the shards and
write the same cache as one process; a failure on any rank ends every rank with
``error: rank R failed: <cause>`` and exit status 1 (see ``draftcache.precompute.distributed``).
"""

from __future__ import annotations

from typing import Optional

import typer

from draftcache.precompute.config import ConfigError, PrecomputeConfig, parse_layer_ids
from draftcache.targets.vllm_options import GPU_MEMORY_HELP, VLLM_ARG_HELP

app = typer.Typer(add_completion=False, help="Run a frozen target once over a chat corpus and write an EAGLE-3 (or, with --method dflash, a DFlash) supervision cache.", pretty_exceptions_enable=False)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def precompute(
    output_dir: str = typer.Option(..., "--output-dir", help="Directory to write the cache into (must be empty unless --resume)."),
    target_model: Optional[str] = typer.Option(None, "--target-model", help="HF model name or local dir; default: the embedded target."),
    input_data: Optional[str] = typer.Option(None, "--input-data", help="Local .json/.jsonl/.parquet file or dir, or a HF dataset name; default: the embedded chats."),
    seq_length: int = typer.Option(2048, "--seq-length", help="Truncate conversations to this many tokens."),
    draft_vocab_size: Optional[int] = typer.Option(None, "--draft-vocab-size", help="Draft vocabulary size (default: full target vocabulary)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples per target forward."),
    shard_size: int = typer.Option(256, "--shard-size", help="Most samples per shard."),
    max_shard_mb: float = typer.Option(1000.0, "--max-shard-mb", help="Most MB (1e6 bytes) of data per shard, so a crash loses at most about this much per rank; boundaries depend only on the sample order and lengths, so any number of ranks writes the same cache. 0 = no byte cap (only --shard-size)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Storage dtype of float fields: bf16, fp16, fp32 or fp8 (hidden states as "
                               "float8_e4m3fn with a float32 scale per row, ~half of bf16; probabilities stay bf16)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda when available)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="'auto': split a target too large for one GPU over every visible GPU (one process, not under torchrun; needs the 'devices' extra: accelerate). The captured layers may then live on different GPUs; their outputs are gathered on the logits' device."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a HF dataset (default: train)."),
    shuffle_seed: int = typer.Option(42, "--shuffle-seed", help="Shuffle seed for HF datasets (local files keep file order)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Cache N usable samples: records are read in order until N of them survive loading and tokenization (bad records, template errors and records with nothing to supervise within --seq-length are skipped, counted and not part of N; later records are never read). Default: all."),
    aux_layer_ids: Optional[str] = typer.Option(None, "--aux-layer-ids", help="Three decoder-layer ids, e.g. '1,15,28' (default: 1, L/2-1, L-4)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code from the hub (off by default)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad record (or sample whose target output is NaN/Inf) "
                                "instead of skipping and counting it."),
    max_non_finite: float = typer.Option(0.01, "--max-non-finite",
                                         help="Abort when more than this share of samples has NaN/Inf target output "
                                              "(a broken target, not a bad record)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --output-dir (same settings required)."),
    supervision: str = typer.Option("auto", "--supervision", help="auto, probs, topk or hidden (EAGLE-3); with --method dflash: auto (the argmax alone) or hidden (also the final hidden state, for the distribution term of train --distribution-weight)."),
    target_probs_topk: int = typer.Option(0, "--target-probs-topk", help="Keep the top-k draft-vocab probabilities (topk encoding)."),
    num_workers: int = typer.Option(0, "--num-workers", help="Tokenize in N worker processes (spawned, one tokenizer each; the result is identical to 0 = in this process). Worth it for large corpora: each worker takes a few seconds to start."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat template replacing the tokenizer's own: the path of a Jinja file, or the template text itself (a value that is not an existing file must contain '{{' or '{%'). The manifest fingerprints the template used, so --resume needs the same one."),
    method: str = typer.Option("eagle3", "--method", help="eagle3, or dflash: the concatenated outputs of --target-layer-ids (unshifted) and the target's greedy token per supervised position (manifest kind dflash)."),
    target_layer_ids: Optional[str] = typer.Option(None, "--target-layer-ids", help="DFlash: decoder-layer ids such as '1,14,27' (default: one per draft layer, evenly spaced over [1, L-3]; [L//2] for one)."),
    draft_layers: int = typer.Option(1, "--draft-layers", help="DFlash: draft decoder layers the default --target-layer-ids are spread for (NeMo's recipe: 5)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    engine: str = typer.Option("hf", "--engine", help="What runs the target: hf (transformers, in this process, on --device) or vllm (vLLM serves it; needs the vllm package). Recorded in the manifest; --resume needs the same engine."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vLLM tensor parallelism: shard the target over N devices (--engine vllm only)."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help=GPU_MEMORY_HELP + " Room for one batch's states and logits is left (--engine vllm only; not a --resume setting)."),
    vllm_arg: Optional[list[str]] = typer.Option(None, "--vllm-arg", help=VLLM_ARG_HELP + " (--engine vllm only; not a --resume setting)"),
) -> None:
    """Write the EAGLE-3 supervision cache of a frozen target over a chat corpus.

    Example: precompute-eagle3 --output-dir cache/   (the embedded target and chats)
    """
    try:
        cfg = PrecomputeConfig(
            output_dir=output_dir, target_model=target_model, input_data=input_data, seq_length=seq_length,
            draft_vocab_size=draft_vocab_size, batch_size=batch_size, shard_size=shard_size,
            max_shard_mb=max_shard_mb if max_shard_mb != 0 else None, dtype=dtype,
            device=device, device_map=device_map, split=split, shuffle_seed=shuffle_seed, num_samples=num_samples,
            aux_layer_ids=_layer_ids(aux_layer_ids), trust_remote_code=trust_remote_code, strict=strict,
            max_non_finite=max_non_finite,
            resume=resume, supervision=supervision, target_probs_topk=target_probs_topk, num_workers=num_workers,
            chat_template=chat_template, method=method, draft_layers=draft_layers,
            target_layer_ids=_layer_ids(target_layer_ids, "--target-layer-ids"), progress=not quiet,
            engine=engine, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, vllm_args=tuple(vllm_arg or ()),
        ).validate()
    except ConfigError as e:
        _fail(str(e), 2)
    from draftcache.cache_format import CacheFormatError
    from draftcache.precompute.distributed import DistContext, PeerLostError, RankFailedError
    from draftcache.precompute.main import precompute_from_config
    from draftcache.precompute.output_dir import PrecomputeError
    from draftcache.targets import RunnerError

    try:
        ctx = DistContext.from_env()
    except ValueError as e:
        _fail(str(e), 2)
    try:
        summary = precompute_from_config(cfg, log=lambda message: typer.echo(message, err=True))
    except (RankFailedError, PeerLostError) as e:
        _fail(str(e), 1)
    except ConfigError as e:
        _fail(str(e) if not ctx.is_distributed else f"rank {ctx.rank} failed: {e}", 2)
    except (ValueError, OSError, PrecomputeError, CacheFormatError, RunnerError) as e:
        _fail(str(e) if not ctx.is_distributed else f"rank {ctx.rank} failed: {e}", 1)
    except Exception as e:
        if not ctx.is_distributed:
            raise
        # e.g. a collective that broke because another rank died: name this rank and the cause
        _fail(f"rank {ctx.rank} failed: {type(e).__name__}: {e}", 1)
    if ctx.is_main:
        typer.echo(summary.format())


def _layer_ids(text: Optional[str], flag: str = "--aux-layer-ids") -> Optional[tuple[int, ...]]:
    ids = parse_layer_ids(text, flag)
    return tuple(ids) if ids is not None else None


def main() -> None:
    """Console entry point (Typer handles exit codes and usage errors)."""
    app(prog_name="precompute-eagle3")


if __name__ == "__main__":
    main()
