"""The EAGLE-3 draft training loop (every variant: EAGLE-3.1 flags, several layers, P-EAGLE): AdamW + warmup/cosine, gradient accumulation and clipping,
per-TTT-step metrics, validation, atomic resumable checkpoints, DDP under torchrun, export at the end."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from draftcache.trainer.batching import plan_epoch, split_train_val
from draftcache.trainer.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from draftcache.trainer.data_wait import DataWait
from draftcache.trainer.eagle3.config import TrainConfig
from draftcache.trainer.optim import accumulation_group, optimizer_step, training_autocast
from draftcache.trainer.distributed import DistInfo, init_distributed
from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel
from draftcache.trainer.mask_token import choose_mask_token
from draftcache.trainer.metrics import MetricSums
from draftcache.trainer.layers import text_config
from draftcache.trainer.eagle3.ttt import simulated_acceptance_length, ttt_forward

__all__ = ["train", "TrainResult", "build_draft", "evaluate_loss", "accumulation_group", "optimizer_step"]


@dataclass
class TrainResult:
    """What a run reached. ``val_acc`` counts over every supervised position (a target outside the
    draft vocabulary is a miss) and ``val_acceptance_length`` is built from it; the ``*_in_draft_vocab``
    figures count only positions whose target is in the draft vocabulary (optimistic upper bounds,
    what this trainer reported before they were told apart)."""

    run_dir: str
    steps: int
    train_loss: float
    val_loss: float | None
    val_acc: list[float] = field(default_factory=list)
    val_acceptance_length: float | None = None
    val_acc_in_draft_vocab: list[float] = field(default_factory=list)
    val_acceptance_length_in_draft_vocab: float | None = None
    wall_seconds: float = 0.0
    export_dir: str | None = None

    def format(self) -> str:
        lines = [f"run                     {self.run_dir}",
                 f"steps                   {self.steps} in {self.wall_seconds:.1f} s",
                 f"train loss              {self.train_loss:.4f}"]
        if self.val_loss is not None:
            acc = " ".join(f"{a:.3f}" for a in self.val_acc)
            in_vocab = " ".join(f"{a:.3f}" for a in self.val_acc_in_draft_vocab)
            lines += [f"val loss                {self.val_loss:.4f}",
                      f"val acc/step            {acc} (over supervised positions)",
                      f"val sim tau             {self.val_acceptance_length:.3f} "
                      "(1 + sum_k prod_j<=k acc_j, bonus token counted)",
                      f"val acc in draft vocab  {in_vocab} (targets outside the draft vocabulary left out)",
                      f"val sim tau in vocab    {self.val_acceptance_length_in_draft_vocab:.3f} (upper bound)"]
        if self.export_dir:
            lines.append(f"export                  {self.export_dir}")
        return "\n".join(lines)


def _hf_config_object(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **d)


def build_draft(source, cfg: TrainConfig, device: torch.device, *, log=print) -> Eagle3DraftModel:
    """A fresh draft shaped after ``source``'s target, with frozen target embeddings and its vocab maps."""
    info = source.info
    embeddings = source.target_embeddings().float()
    parallel = cfg.method == "peagle"
    mask_token_id = None
    if parallel:  # the rule DFlash uses (trainer/mask_token.py): never a zero row, a token the data never supervises
        eps = float(getattr(text_config(_hf_config_object(info.hf_config)), "rms_norm_eps", None) or 1e-6)
        choice = choose_mask_token(embeddings=embeddings, supervised_counts=source.supervised_token_counts(),
                                   rms_norm_eps=eps, special_ids=source.special_ids(), given=cfg.mask_token_id)
        mask_token_id = choice.token_id
        log(f"mask token            {choice.token_id} ({choice.rule}: {choice.why})")
    dcfg = Eagle3DraftConfig.from_target_config(
        _hf_config_object(info.hf_config), draft_vocab_size=source.vocab.size, aux_layer_ids=info.aux_layer_ids,
        fc_norm=cfg.fc_norm, norm_output=cfg.norm_output, norm_before_fc=cfg.norm_before_fc,
        attention_bias=cfg.attention_bias, num_hidden_layers=cfg.num_hidden_layers,
        parallel_drafting=parallel, mask_token_id=mask_token_id,
    )
    model = Eagle3DraftModel(dcfg, freeze_embeddings=cfg.freeze_embeddings)
    model.load_target_embeddings(embeddings)
    model.set_draft_vocab(source.vocab)
    if cfg.init_lm_head:
        weight = source.target_lm_head()
        if weight is None:
            raise ValueError(
                "--init-lm-head needs the target's lm_head, which only hidden-encoding caches store; "
                "train online (--target-model) or from a cache made with --supervision hidden, or drop the flag"
            )
        model.init_lm_head_from_target(weight.float())
    return model.to(device)


class _TTTModule(torch.nn.Module):
    """Routes the TTT loss through ``forward`` so DistributedDataParallel sees the call."""

    def __init__(self, draft: Eagle3DraftModel):
        super().__init__()
        self.draft = draft

    def forward(self, inputs: dict, *, ttt_steps: int, step_weight: float):
        return ttt_forward(self.draft, **inputs, ttt_steps=ttt_steps, step_weight=step_weight)


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _metric_sums(k: int, device) -> MetricSums:
    return MetricSums({"loss": 1, "batches": 1, "correct": k, "valid": k, "supervised": k}, device)


def _accumulate(sums: MetricSums, out) -> None:
    """Add one micro-batch to ``sums`` on device (no host sync per micro-batch)."""
    sums.add(loss=out.loss, batches=1, correct=out.correct, valid=out.valid, supervised=out.supervised)


def _summarize(sums: MetricSums) -> dict:
    """Mean micro-batch loss, per-TTT-step accuracies and simulated acceptance lengths from
    (all-reduced) ``sums``: ``acc`` over supervised positions, ``acc_in_draft_vocab`` over those
    whose target is in the draft vocabulary (the same hits, a smaller denominator)."""
    acc = sums.ratio("correct", "supervised").tolist()
    in_vocab = sums.ratio("correct", "valid").tolist()
    return {"loss": float(sums.ratio("loss", "batches")), "acc": acc, "acc_in_draft_vocab": in_vocab,
            "sim_acceptance_length": simulated_acceptance_length(acc),
            "sim_acceptance_length_in_draft_vocab": simulated_acceptance_length(in_vocab)}


@torch.no_grad()
def evaluate_loss(model, source, plan, cfg: TrainConfig, device, dist_info: DistInfo) -> dict:
    """Validation loss, per-step accuracies and simulated acceptance lengths (see :func:`_summarize`),
    summed across ranks."""
    model.eval()
    k = cfg.ttt_steps
    sums = _metric_sums(k, device)
    for batch in source.loader(plan, cfg.batch_tokens):
        inputs = source.supervise(batch, device)
        with training_autocast(device):
            out = ttt_forward(model, **inputs, ttt_steps=k, step_weight=cfg.step_weight)
        _accumulate(sums, out)
    sums.all_reduce(dist_info)
    model.train()
    return _summarize(sums)


# Settings that do not change which micro-batches a step sees or how they are optimised.
# (allow_partial_cache only permits; what the run reads is compared as its data source.)
_RESUME_FREE_FIELDS = frozenset({"output_dir", "resume", "progress", "device", "num_workers", "eval_every",
                                 "save_every", "log_every", "export", "export_format", "trust_remote_code",
                                 "allow_partial_cache"})


def _check_resume(ckpt: Path, cfg: TrainConfig, world_size: int, data_source: dict) -> None:
    """Refuse to resume with settings that shape the data order or the optimisation, or on data
    that changed since the checkpoint (a cache that grew changes the train/validation split and
    every epoch's plan), naming each difference."""
    meta = read_checkpoint_meta(ckpt)
    saved = dict(meta.get("config", {}))
    saved["world_size"] = meta.get("extra", {}).get("world_size", 1)
    saved.setdefault("shuffle", "global")  # runs from before --shuffle shuffled every sample at once
    current = {**cfg.as_dict(), "world_size": world_size}
    diffs = [f"{key}: {saved.get(key)!r} != {value!r}" for key, value in sorted(current.items())
             if key not in _RESUME_FREE_FIELDS and key in saved and saved[key] != value]
    trained_on = meta.get("extra", {}).get("data_source")
    if trained_on is not None:  # checkpoints written before the data source was recorded lack it
        diffs += [f"data {key}: {trained_on.get(key, '<not recorded>')!r} != {value!r}"
                  for key, value in data_source.items() if trained_on.get(key, "<not recorded>") != value]
    if diffs:
        raise ValueError(
            f"--resume refused: {ckpt} was trained with different settings or data:\n  - " + "\n  - ".join(diffs)
            + "\nRerun with the original settings (and number of ranks) on the data it was trained on, "
            "or start a new --output-dir."
        )


def train(cfg: TrainConfig, *, source=None, log=print) -> TrainResult:
    """Train a draft from ``source`` (built from ``cfg`` when None) into ``cfg.output_dir``."""
    cfg.validate()
    t0 = time.perf_counter()
    dist_info = init_distributed(cfg.device)
    device = dist_info.device
    is_main = dist_info.rank == 0
    run_dir = Path(cfg.output_dir)
    if is_main and run_dir.exists() and latest_checkpoint(run_dir) is not None and not cfg.resume:
        raise FileExistsError(
            f"--output-dir {run_dir} already holds a training run; pass --resume to continue it or choose another directory"
        )
    if source is None:
        from draftcache.trainer.eagle3.setup import build_source

        source = build_source(cfg, device)
    source.check_complete(allow_partial=cfg.allow_partial_cache)  # before anything is written
    data_source = source.describe()
    if data_source.get("complete") is False:
        log(f"training on an incomplete cache (--allow-partial-cache): {data_source['committed_samples']} of "
            f"{data_source['num_samples']} samples committed")

    torch.manual_seed(cfg.seed)
    model = build_draft(source, cfg, device, log=log if is_main else (lambda *_: None))  # refuses a bad --mask-token-id before anything is written
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = split_train_val(len(source), cfg.val_fraction, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    block_tokens = source.shuffle_block_tokens(cfg.shuffle, dist_info.world_size)
    per_epoch = len(plan_epoch(train_idx, source.lengths, seed=cfg.seed, epoch=0, batch_tokens=cfg.batch_tokens,
                               batch_size=cfg.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                               shuffle_block_tokens=block_tokens))
    steps_per_epoch = -(-per_epoch // cfg.grad_accum)  # a short last group is a step too
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))

    state = TrainState()
    if cfg.resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            _check_resume(ckpt, cfg, dist_info.world_size, data_source)
            state, _ = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
            log(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, micro-batch {state.batches_in_epoch})")
    ddp_model = _TTTModule(model)
    if dist_info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            ddp_model, device_ids=[device.index] if device.type == "cuda" else None)

    describe = {"draft_config": model.config.to_dict(), "target_config": source.info.hf_config,
                "target_model_id": source.info.model_id, "world_size": dist_info.world_size,
                "data_source": data_source}
    metrics_path = run_dir / "metrics.jsonl"
    tb = _tensorboard(run_dir) if is_main else None
    val_plan = plan_epoch(val_idx, source.lengths, seed=cfg.seed, epoch=0, batch_tokens=cfg.batch_tokens,
                          batch_size=cfg.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                          shuffle=False) if val_idx else []
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not (cfg.progress and is_main))
    k = cfg.ttt_steps
    window = _metric_sums(k, device)
    last_loss = float("nan")
    val = None

    def log_metrics(record: dict) -> None:
        if not is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    tb.add_scalar(key, value, record["step"])
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        tb.add_scalar(f"{key}/step{i}", v, record["step"])

    def checkpoint() -> None:
        if is_main:
            save_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                            config=cfg.as_dict(), extra=describe)
        if dist_info.world_size > 1:
            dist.barrier()

    done = state.step >= total_steps
    waiting = DataWait()
    while not done and state.epoch < 10**9:
        plan = plan_epoch(train_idx, source.lengths, seed=cfg.seed, epoch=state.epoch, batch_tokens=cfg.batch_tokens,
                          batch_size=cfg.batch_size, rank=dist_info.rank, world_size=dist_info.world_size,
                          shuffle_block_tokens=block_tokens)
        micro_batches = len(plan)  # equal on every rank, so all ranks sync on the same micro-batch
        # checkpoints follow optimizer steps, so a resumed epoch restarts at a group boundary
        for batch in waiting.wrap(source.loader(plan[state.batches_in_epoch :], cfg.batch_tokens)):
            inputs = source.supervise(batch, device)
            group, sync = accumulation_group(state.batches_in_epoch, micro_batches, cfg.grad_accum)
            ctx = ddp_model.no_sync() if (dist_info.world_size > 1 and not sync) else nullcontext()
            with ctx, training_autocast(device):
                out = ddp_model(inputs, ttt_steps=k, step_weight=cfg.step_weight)
                (out.loss / group).backward()
            _accumulate(window, out)
            state.batches_in_epoch += 1
            state.tokens_seen += int(inputs["attention_mask"].sum())
            if not sync:
                continue
            optimizer_step(params, optimizer, scheduler, cfg.grad_clip)
            state.step += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                window.all_reduce(dist_info)
                summary = _summarize(window)
                last_loss = summary["loss"]
                log_metrics({"step": state.step, "epoch": state.epoch, **summary, "lr": scheduler.get_last_lr()[0],
                             "tokens_seen": state.tokens_seen, "split": "train", "data_wait_share": waiting.window()})
                bar.set_postfix(loss=f"{last_loss:.3f}", tau=f"{summary['sim_acceptance_length']:.2f}")
                window.zero_()
            with waiting.excluded():
                if val_plan and (state.step % cfg.eval_every == 0 or state.step == total_steps):
                    val = evaluate_loss(model, source, val_plan, cfg, device, dist_info)
                    log_metrics({"step": state.step, "split": "val", **val})
                if state.step % cfg.save_every == 0 or state.step == total_steps:
                    checkpoint()
            if state.step >= total_steps:
                done = True
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    if is_main:
        log(f"data wait: {waiting.total():.1%} of training step time spent waiting for batches")
    if val_plan and val is None:
        val = evaluate_loss(model, source, val_plan, cfg, device, dist_info)
    export_dir = None
    if cfg.export and is_main:
        from draftcache.trainer.eagle3.export import export_draft

        export_dir = str(run_dir / "export")
        export_draft(model, export_dir, target_config=source.info.hf_config, target_model_id=source.info.model_id,
                     format=cfg.export_format)
    if tb is not None:
        tb.close()
    result = TrainResult(
        run_dir=str(run_dir), steps=state.step, train_loss=last_loss,
        val_loss=val["loss"] if val else None, val_acc=val["acc"] if val else [],
        val_acceptance_length=val["sim_acceptance_length"] if val else None,
        val_acc_in_draft_vocab=val["acc_in_draft_vocab"] if val else [],
        val_acceptance_length_in_draft_vocab=val["sim_acceptance_length_in_draft_vocab"] if val else None,
        wall_seconds=time.perf_counter() - t0, export_dir=export_dir,
    )
    if is_main:
        (run_dir / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result


def _tensorboard(run_dir: Path):
    """A SummaryWriter when tensorboard is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
