"""The ``draftcache regenerate`` command (registered on the ``draftcache`` app by ``draftcache.cli``)."""

from __future__ import annotations

from typing import Optional

import typer

from draftcache.regenerate.config import RegenerateConfig, RegenerateConfigError
from draftcache.targets.vllm_options import GPU_MEMORY_HELP, VLLM_ARG_HELP

__all__ = ["regenerate_command"]

_D = RegenerateConfig(output="")  # the CLI shows the library's defaults


def regenerate_command(
    output: str = typer.Option(..., "--output", help="The regenerated chat JSONL (OUT.jsonl; OUT.jsonl.progress beside it)."),
    target_model: Optional[str] = typer.Option(None, "--target-model", help="HF model name or local dir; default: the embedded target."),
    input_data: Optional[str] = typer.Option(None, "--input-data", help="Local .json/.jsonl/.parquet file or dir, or a HF dataset name; default: the embedded chats."),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm (offline LLM API) or hf (generate, batched, KV cache); default: vllm when importable."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat template replacing the tokenizer's own: the path of a Jinja file, or the template text itself."),
    temperature: float = typer.Option(_D.temperature, "--temperature", help="0 = greedy (identical output whether or not the run was interrupted)."),
    max_new_tokens: int = typer.Option(_D.max_new_tokens, "--max-new-tokens", help="Per reply; replies cut here are counted as truncated."),
    seed: int = typer.Option(_D.seed, "--seed", help="Sampling seed (mixed with each conversation's id and turn)."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="Conversations per batch; each batch is committed to disk as a whole."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Prompt + reply budget (default: the target's max_position_embeddings)."),
    dtype: str = typer.Option(_D.dtype, "--dtype", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16 or fp16."),
    device: Optional[str] = typer.Option(None, "--device", help="HF engine: cuda, cuda:N or cpu."),
    tensor_parallel_size: int = typer.Option(_D.tensor_parallel_size, "--tensor-parallel-size", help="vLLM engine: GPUs per model."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a HF dataset (default: train)."),
    shuffle_seed: int = typer.Option(42, "--shuffle-seed", help="Shuffle seed for HF datasets (local files keep file order)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Regenerate the first N valid conversations (default: all)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad record instead of skipping and counting it."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into --output (same settings required)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help=GPU_MEMORY_HELP + " (--engine vllm; not a --resume setting)"),
    vllm_arg: Optional[list[str]] = typer.Option(None, "--vllm-arg", help=VLLM_ARG_HELP + " (--engine vllm; not a --resume setting)"),
) -> None:
    """Replace every assistant turn with the target's own reply (turn by turn), for precompute-eagle3.

    Example: draftcache regenerate --target-model HuggingFaceTB/SmolLM2-135M-Instruct --input-data sharegpt.json --output regen.jsonl
    """
    from draftcache.regenerate.run import regenerate

    try:
        cfg = RegenerateConfig(
            output=output, target_model=target_model, input_data=input_data, engine=engine, chat_template=chat_template,
            temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
            max_model_len=max_model_len, dtype=dtype, device=device, tensor_parallel_size=tensor_parallel_size,
            split=split, shuffle_seed=shuffle_seed, num_samples=num_samples, strict=strict, resume=resume,
            trust_remote_code=trust_remote_code, progress=not quiet,
            gpu_memory_utilization=gpu_memory_utilization, vllm_args=tuple(vllm_arg or ()),
        ).validate()
        summary = regenerate(cfg, log=lambda message: typer.echo(message, err=True))
    except RegenerateConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(summary.format())
