"""``draftcache train --method dflash``: train a DFlash draft online from a co-located frozen target,
or from a dflash cache (``--cached-target-path``: ``precompute-eagle3 --method dflash``).

Per micro-batch (consecutive samples packed into one row of at most ``batch_tokens``): the target
runs once over the batch's documents (right-padded, no cross-document attention), giving the
concatenated ``target_layer_ids`` outputs (unshifted) and its argmax at every position; both are
packed into the row with the document boundaries in ``seq_lens``. Anchors are sampled among
supervised positions and the draft is trained with :func:`dflash_loss`. From a cache the same row
is read from disk (only the batch's rows) by ``expand_dflash_raw``; the loss reads the argmax only
at supervised positions, which is all the cache stores, so both paths give the same loss. Checkpoints, ``--resume``,
the warmup/cosine schedule, the seeded epoch plan and the held-out split are the EAGLE-3 trainer's
(:mod:`draftcache.trainer.checkpoint`, :mod:`draftcache.trainer.batching`). Metrics: loss,
per-block-position accuracy and simulated acceptance length (mean over blocks of 1 + leading
correct slots, greedy). Under ``torchrun`` it runs DDP as the EAGLE-3 loop does
(:mod:`draftcache.trainer.distributed`): each rank reads its share of every epoch's micro-batches
(``plan_epoch(rank=, world_size=)``; online, each rank runs its own copy of the target on them),
gradients are averaged over ranks, metric sums all-reduced, and rank 0 alone writes checkpoints,
metrics and the export. ``--grad-accum G`` on one process steps on the same micro-batches, with the
same anchors, as ``G`` ranks: anchors are seeded by a micro-batch's global index in the epoch plan.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from draftcache.trainer.batching import SHUFFLE_MODES, cache_block_tokens, plan_epoch, split_train_val
from draftcache.trainer.checkpoint import TrainState, latest_checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint
from draftcache.trainer.data_wait import DataWait
from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.data.vocab import supervised_token_counts
from draftcache.trainer.dflash.loss import DFLASH_LOSS_DECAY, dflash_loss, sample_anchors
from draftcache.trainer.metrics import MetricSums
from draftcache.trainer.mask_token import MaskTokenChoice, choose_mask_token, tokenizer_special_ids
from draftcache.trainer.dflash.model import DFlashDraftModel
from draftcache.trainer.distributed import init_distributed
from draftcache.trainer.layers import text_config
from draftcache.trainer.optim import accumulation_group, optimizer_step, training_autocast

__all__ = ["DFlashTrainConfig", "DFlashTrainResult", "train_dflash", "dflash_mask_token", "online_mask_token",
           "cached_mask_token", "OnlineDFlashBatches", "CachedDFlashBatches"]


@dataclass(frozen=True)
class DFlashTrainConfig:
    """Everything that shapes one DFlash training run (validated before anything loads)."""

    output_dir: str
    cached_target_path: str | None = None  # a dflash cache (precompute-eagle3 --method dflash); no target is loaded
    allow_partial_cache: bool = False      # train on an unfinished cache's committed samples
    target_model: str | None = None        # HF name/dir; None = embedded default target
    input_data: str | None = None          # chats; None = embedded default chats
    seq_length: int = 2048                 # truncate conversations
    chat_template: str | None = None       # Jinja file or text replacing the tokenizer's template
    target_layer_ids: tuple[int, ...] | None = None  # None = default_dflash_layer_ids(L, num_draft_layers)
    num_draft_layers: int = 1              # NeMo's recipe: 5; 1 keeps CPU runs small
    block_size: int = 16                   # anchor + 15 masked slots (NeMo: 16)
    num_anchors: int = 128                 # blocks per packed row; NeMo: 512 per sequence (docs/DFLASH.md, "Recipe")
    mask_token_id: int | None = None       # None = chosen by trainer/mask_token.py (never a zero embedding row)
    loss_decay: float = DFLASH_LOSS_DECAY  # slot k weighs exp(-(k-1)/decay)
    freeze_k_norm: bool = False            # keep every layer's k_norm at ones: vLLM CPU serves multi-layer drafts as trained
    markov_rank: int = 0                   # > 0: a DSpark draft (draftcache train --method dspark), 0: DFlash
    confidence_head: bool = False          # DSpark: also train vLLM's confidence_head (acceptance estimate)
    confidence_weight: float = 0.1         # DSpark: weight of the confidence head's binary cross-entropy
    distribution_weight: float = 0.0       # weight w of the soft-CE to the target's distribution (online, or a
                                           # dflash cache precomputed with --supervision hidden)
    epochs: int = 18                       # the measured recipe on the embedded default (docs/DFLASH.md, "Recipe")
    max_steps: int | None = None
    batch_tokens: int = 1024               # token budget of a packed micro-batch
    grad_accum: int = 1                    # micro-batches per optimizer step (per rank under torchrun)
    shuffle: str = "window"                # cache: window (blocks of about one reader window) | global; online: global
    lr: float = 3e-3                       # suits the tiny embedded draft; ~6e-4 for real targets
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    val_fraction: float = 0.05
    eval_every: int = 100
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str | None = None
    resume: bool = False
    export: bool = True
    trust_remote_code: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        p: list[str] = []
        for name, low in (("num_draft_layers", 1), ("block_size", 2), ("num_anchors", 1), ("epochs", 1),
                          ("batch_tokens", 2), ("grad_accum", 1), ("eval_every", 1), ("save_every", 1),
                          ("log_every", 1)):
            if getattr(self, name) < low:
                p.append(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.shuffle not in SHUFFLE_MODES:
            p.append(f"--shuffle must be one of {', '.join(SHUFFLE_MODES)}, got {self.shuffle!r}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if self.markov_rank < 0:
            p.append(f"--markov-rank must be >= 0, got {self.markov_rank}")
        if self.confidence_head and self.markov_rank == 0:
            p.append("--confidence-head is a DSpark option: use --method dspark (--markov-rank > 0)")
        if not 0 <= self.distribution_weight <= 1:
            p.append(f"--distribution-weight must be in [0, 1], got {self.distribution_weight}")
        if self.confidence_weight < 0:
            p.append(f"--confidence-weight must be >= 0, got {self.confidence_weight}")
        if self.loss_decay <= 0:
            p.append(f"--loss-decay must be > 0, got {self.loss_decay}")
        if not 0 <= self.val_fraction < 1:
            p.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.cached_target_path is not None:
            online = [flag for flag, given in (("--input-data", self.input_data), ("--chat-template", self.chat_template))
                      if given is not None]
            if online:
                p.append(f"{', '.join(online)} only apply online; a cache already holds its tokenized data "
                         "(drop them, or drop --cached-target-path)")
        return p

    def validate(self) -> "DFlashTrainConfig":
        problems = self.problems()
        if problems:
            raise ValueError("invalid DFlash training settings:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def method(self) -> str:
        """``dspark`` with a Markov head, else ``dflash`` (checkpoints and exports say which)."""
        return "dspark" if self.markov_rank > 0 else "dflash"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["target_layer_ids"] = list(self.target_layer_ids) if self.target_layer_ids is not None else None
        return d


@dataclass
class DFlashTrainResult:
    run_dir: str
    steps: int
    train_loss: float
    val_loss: float | None = None
    val_acc: list[float] = field(default_factory=list)  # per draft token (DFlash: block slots 1..B-1; DSpark: 0..B-1)
    val_sim_tau: float | None = None
    wall_seconds: float = 0.0
    export_dir: str | None = None

    def format(self) -> str:
        lines = [f"run                     {self.run_dir}",
                 f"steps                   {self.steps} in {self.wall_seconds:.1f} s",
                 f"train loss              {self.train_loss:.4f}"]
        if self.val_loss is not None:
            lines += [f"val loss                {self.val_loss:.4f}",
                      f"val acc/block slot      {' '.join(f'{a:.3f}' for a in self.val_acc)}",
                      f"val sim tau             {self.val_sim_tau:.3f} (mean over blocks of 1 + leading correct slots)"]
        if self.export_dir:
            lines.append(f"export                  {self.export_dir}")
        return "\n".join(lines)


def dflash_mask_token(cfg: "DFlashTrainConfig", *, embeddings: torch.Tensor, supervised_counts: torch.Tensor,
                      hf_config, tokenizer=None, special_ids=()) -> MaskTokenChoice:
    """The run's mask token (:func:`choose_mask_token`) from the tokenizer's special tokens (else
    ``special_ids``), the target's embedding rows ``[V, H]`` and the ``[V]`` supervised-token counts."""
    eps = float(getattr(text_config(hf_config), "rms_norm_eps", None) or 1e-6)
    return choose_mask_token(
        embeddings=embeddings, supervised_counts=supervised_counts, rms_norm_eps=eps,
        special_ids=tokenizer_special_ids(tokenizer) if tokenizer is not None else special_ids,
        tokenizer_mask_id=getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None,
        given=cfg.mask_token_id, token_name=tokenizer.convert_ids_to_tokens if tokenizer is not None else None)


def online_mask_token(cfg: "DFlashTrainConfig", *, tokenizer, samples, embeddings: torch.Tensor,
                      hf_config) -> MaskTokenChoice:
    """Online: the supervised-token counts are one ``bincount`` over the tokenized samples."""
    counts = supervised_token_counts([s.input_ids for s in samples], [s.loss_mask for s in samples],
                                     int(embeddings.shape[0]))  # [V]
    return dflash_mask_token(cfg, embeddings=embeddings, supervised_counts=counts, hf_config=hf_config,
                             tokenizer=tokenizer)


def cached_mask_token(cfg: "DFlashTrainConfig", reader, *, embeddings: torch.Tensor) -> MaskTokenChoice:
    """From a dflash cache, reading no shard: the manifest's ``token_counts`` (supervised tokens of
    the whole dataset), ``embeddings`` (its ``target_embeddings`` side file), and the tokenizer it
    names (or ``--target-model``; when neither loads here, the special ids the manifest records)."""
    from draftcache.targets.loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.target_model or reader.manifest["tokenizer"]["name_or_path"],
                                   trust_remote_code=cfg.trust_remote_code)
    except Exception:
        tokenizer = None
    return dflash_mask_token(cfg, embeddings=embeddings, hf_config=reader.manifest["target"]["config"],
                             supervised_counts=torch.tensor(reader.manifest["token_counts"], dtype=torch.int64),
                             tokenizer=tokenizer, special_ids=reader.manifest["draft_vocab"]["special_token_ids"])


class OnlineDFlashBatches:
    """Runs the frozen target over a micro-batch's documents and packs what the loss needs:
    ``batches(indices)`` gives one packed row, ``input_ids / target_argmax / loss_mask [1, T]``
    (``target_argmax[t]`` = the target's greedy token for ``t + 1``, unshifted convention),
    ``target_hidden [1, T, n*H]`` float32 and ``seq_lens [1, docs]``."""

    def __init__(self, target, samples, pad_id: int, device: torch.device, keep_distribution: bool = False):
        self.target, self.samples, self.pad_id, self.device = target, samples, pad_id, device
        self.keep_distribution = keep_distribution  # also hand out target_logits [1, T, V] (the distribution term)

    @torch.no_grad()
    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        docs = [self.samples[i] for i in indices]
        lens = [len(d.input_ids) for d in docs]
        width = max(lens)
        ids = torch.full((len(docs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(docs), width, dtype=torch.long)
        for r, d in enumerate(docs):
            ids[r, : lens[r]] = torch.as_tensor(d.input_ids)
            attn[r, : lens[r]] = 1
        fwd = self.target.forward_capture(ids.to(self.device), attn.to(self.device))
        keep = attn.bool().to(self.device)
        logits = {"target_logits": fwd.logits[keep][None]} if self.keep_distribution else {}
        return {**logits,
            "input_ids": ids.to(self.device)[keep][None],                      # [1, T]
            "target_hidden": fwd.aux_hidden_states[keep][None].float(),        # [1, T, n*H_t]
            "target_argmax": fwd.logits.argmax(-1)[keep][None],                # [1, T]
            "loss_mask": torch.cat([torch.as_tensor(d.loss_mask, dtype=torch.long) for d in docs])[None].to(self.device),
            "seq_lens": torch.tensor([lens], device=self.device),
        }

    def batches(self, plan: list[list[int]]):
        """``self(indices)`` for each micro-batch of ``plan``, in order."""
        return (self(indices) for indices in plan)


class CachedDFlashBatches:
    """Reads a micro-batch's samples from a dflash cache (only their rows, ``preadv``) as the packed
    row ``OnlineDFlashBatches`` builds online: ``expand_dflash_raw`` with the features in float32
    (``target_argmax`` is 0 where the next position is not supervised; the loss never reads it there)."""

    def __init__(self, reader, device: torch.device, keep_distribution: bool = False):
        self.reader, self.device = reader, device
        # ``hidden`` caches: also hand out target_final_hidden [1, T, H_t]; the loss projects the rows it
        # reads with ``reader.logits_from_final_hidden`` one chunk at a time (never [T, V] logits)
        self.keep_distribution = keep_distribution
        self._loader = None  # one CacheBatchLoader for every plan: its readers and buffers stay warm

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._expand(self.reader.get_raw_batch(indices))

    def batches(self, plan: list[list[int]]):
        """The micro-batches of ``plan``, read ahead by ``CacheBatchLoader`` threads (as the EAGLE-3
        trainer reads its cache) and expanded on the device in order."""
        from draftcache.cache_format import CacheBatchLoader

        if not plan:
            return iter(())
        if self._loader is None:
            self._loader = CacheBatchLoader(self.reader.path, plan)
        else:
            self._loader.set_plan(plan)  # an iteration still running keeps the plan it started with
        return (self._expand(raw) for raw in self._loader)  # iter(loader) runs now, on this plan

    def _expand(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from draftcache.cache_format import expand_dflash_raw

        row = expand_dflash_raw(raw, self.device)
        self.reader.check_finite(raw, row)  # a NaN/Inf row never reaches the draft
        final = {"target_final_hidden": row["final_hidden"]} if self.keep_distribution else {}  # [1, T, H_t]
        return {**final, "input_ids": row["input_ids"], "target_hidden": row["aux_hidden_states"].float(),
                "target_argmax": row["target_argmax"], "loss_mask": row["loss_mask"], "seq_lens": row["seq_lens"]}


def _open_dflash_cache(cfg: "DFlashTrainConfig"):
    """The cache's reader, refusing an EAGLE-3 cache, an unfinished one (unless allowed) and
    ``--target-layer-ids`` other than the cached layers."""
    from draftcache.cache_format import open_cache

    reader = open_cache(cfg.cached_target_path)
    if reader.kind != "dflash":
        raise ValueError(f"--cached-target-path {cfg.cached_target_path} is a {reader.kind!r} cache; --method dflash "
                         "trains from a dflash cache (precompute-eagle3 --method dflash)")
    if cfg.distribution_weight > 0 and reader.encoding != "hidden":
        raise ValueError(f"--distribution-weight needs the target's distribution, which cache {cfg.cached_target_path} "
                         "does not store (only its argmax): precompute it with --supervision hidden, train online, or "
                         "drop --distribution-weight")
    if not reader.complete and not cfg.allow_partial_cache:
        raise ValueError(f"cache {cfg.cached_target_path} is incomplete ({len(reader)} of "
                         f"{reader.manifest['num_samples']} samples committed): finish it with precompute --resume, "
                         "or pass --allow-partial-cache to train on the committed samples")
    cached = list(reader.manifest["capture"]["layer_ids"])
    if cfg.target_layer_ids is not None and list(cfg.target_layer_ids) != cached:
        raise ValueError(f"--target-layer-ids {list(cfg.target_layer_ids)} but the cache holds layers {cached}; "
                         "drop the flag or precompute a cache with those layers")
    if "config" not in reader.manifest["target"]:
        raise ValueError(f"cache {cfg.cached_target_path} does not record the target's config (target.config); "
                         "precompute it again with this version")
    return reader


def _sums(block: int, device) -> MetricSums:
    return MetricSums({"loss": 1, "batches": 1, "accept": 1, "blocks": 1, "correct": block, "counted": block},
                      device)


def _add(sums: MetricSums, out) -> None:
    sums.add(loss=out.loss, batches=1, accept=out.accept_length_sum, blocks=out.num_blocks, correct=out.correct,
             counted=out.counted)


class _DFlashLossModule(torch.nn.Module):
    """Routes :func:`dflash_loss` through ``forward`` so DistributedDataParallel sees the call."""

    def __init__(self, draft: DFlashDraftModel, target_lm_head=None):
        super().__init__()
        self.draft = draft
        self.target_lm_head = target_lm_head  # a hidden cache's lm_head (``reader.logits_from_final_hidden``)

    def forward(self, batch: dict, anchors: torch.Tensor, valid: torch.Tensor, *, decay: float,
                confidence_weight: float = 0.0, distribution_weight: float = 0.0):
        return dflash_loss(self.draft, target_hidden=batch["target_hidden"], input_ids=batch["input_ids"],
                           target_argmax=batch["target_argmax"], loss_mask=batch["loss_mask"],
                           anchor_positions=anchors, anchor_valid=valid, seq_lens=batch["seq_lens"], decay=decay,
                           confidence_weight=confidence_weight, target_logits=batch.get("target_logits"),
                           target_final_hidden=batch.get("target_final_hidden"), target_lm_head=self.target_lm_head,
                           distribution_weight=distribution_weight)


def _summary(sums: MetricSums, first_slot: int = 1) -> dict:
    """Per-draft-token accuracy (block slots ``first_slot..B-1``), loss and simulated tau."""
    return {"loss": float(sums.ratio("loss", "batches")), "acc": sums.ratio("correct", "counted").tolist()[first_slot:],
            "sim_tau": float(sums.ratio("accept", "blocks"))}


_RESUME_FREE = frozenset({"output_dir", "resume", "progress", "device", "eval_every", "save_every", "log_every",
                          "export", "trust_remote_code", "allow_partial_cache"})


def train_dflash(cfg: DFlashTrainConfig, *, log=print) -> DFlashTrainResult:
    """Train a DFlash draft into ``cfg.output_dir`` (checkpoints, metrics.jsonl, export/)."""
    from draftcache.data import ChatTokenizer, load_conversations, set_chat_template, tokenize_all
    from draftcache.defaults import default_data_path, default_target_path
    from draftcache.targets import HFDFlashTargetModel, default_dflash_layer_ids
    from draftcache.targets.loading import load_target_model, load_tokenizer

    cfg.validate()
    t0 = time.perf_counter()
    run_dir = Path(cfg.output_dir)
    if latest_checkpoint(run_dir) is not None and not cfg.resume:
        raise FileExistsError(f"--output-dir {run_dir} already holds a training run; pass --resume to continue it "
                              "or choose another directory")
    dist_info = init_distributed(cfg.device)
    device, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    is_main = rank == 0
    if cfg.cached_target_path is not None:
        # from a dflash cache: no target runs; its config, embeddings and lm_head come from the cache
        reader = _open_dflash_cache(cfg)
        target_path = reader.manifest["target"]["model_id"]
        hf_config = reader.manifest["target"]["config"]
        layer_ids = list(reader.manifest["capture"]["layer_ids"])
        supervise = CachedDFlashBatches(reader, device, keep_distribution=cfg.distribution_weight > 0)
        target_lm_head = reader.logits_from_final_hidden
        lengths = reader.sample_lengths().tolist()
        weights = (reader.target_embeddings(), reader.target_lm_head())
        mask = cached_mask_token(cfg, reader, embeddings=weights[0])
        block_tokens = cache_block_tokens(reader, cfg.shuffle, world)  # the loader reads a window nearly in order
    else:
        target_path = cfg.target_model or default_target_path()
        conversations = load_conversations(cfg.input_data or default_data_path(),
                                           trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(target_path, trust_remote_code=cfg.trust_remote_code, chat_template=cfg.chat_template)
        set_chat_template(tokenizer, cfg.chat_template)
        samples = tokenize_all(conversations, ChatTokenizer(tokenizer, cfg.seq_length), conversations.skipped,
                               strict=False, progress=False)
        model = load_target_model(target_path, device=device, trust_remote_code=cfg.trust_remote_code)
        hf_config = model.config
        num_layers = int(model.config.get_text_config().num_hidden_layers)
        layer_ids = list(cfg.target_layer_ids) if cfg.target_layer_ids else default_dflash_layer_ids(
            num_layers, cfg.num_draft_layers)
        target = HFDFlashTargetModel(model, layer_ids)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        supervise = OnlineDFlashBatches(target, samples, pad_id, device, keep_distribution=cfg.distribution_weight > 0)
        target_lm_head = None  # the target's logits come with the batch
        lengths = [len(s.input_ids) for s in samples]
        weights = (model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach())
        mask = online_mask_token(cfg, tokenizer=tokenizer, samples=samples, embeddings=weights[0], hf_config=hf_config)
        block_tokens = None  # online batches are computed, not read: a global shuffle costs nothing
    if is_main:
        log(f"mask token {mask.token_id} ({mask.token!r}): {mask.why}")
    mask_id = mask.token_id
    draft_config = DFlashDraftConfig.from_target_config(hf_config, target_layer_ids=layer_ids, mask_token_id=mask_id,
                                                        num_hidden_layers=cfg.num_draft_layers,
                                                        block_size=cfg.block_size, markov_rank=cfg.markov_rank,
                                                        enable_confidence_head=cfg.confidence_head)
    torch.manual_seed(cfg.seed)
    draft = DFlashDraftModel(draft_config)
    draft.load_target_embeddings(*weights)
    if cfg.freeze_k_norm:  # vLLM's CPU build applies layer 0's k_norm to every layer's context keys
        for layer in draft.layers:
            layer.self_attn.k_norm.weight.requires_grad_(False)
    draft = draft.to(device)
    num_samples = len(lengths)
    train_idx, val_idx = split_train_val(num_samples, cfg.val_fraction, cfg.seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    per_epoch = len(plan_epoch(train_idx, lengths, seed=cfg.seed, epoch=0, batch_tokens=cfg.batch_tokens, batch_size=1,
                               rank=rank, world_size=world, shuffle_block_tokens=block_tokens))
    total = cfg.max_steps or cfg.epochs * -(-per_epoch // cfg.grad_accum)  # a short last group is a step too

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    describe = {"method": cfg.method, "draft_config": draft_config.to_dict(), "target_model_id": target_path,
                "target_config": hf_config if isinstance(hf_config, dict) else hf_config.to_dict(),
                "num_samples": num_samples, "world_size": world, "mask_token": mask.as_dict()}
    state = TrainState()
    if cfg.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        meta = read_checkpoint_meta(ckpt)
        saved_cfg = meta.get("config", {})
        defaults = {f.name: f.default for f in fields(DFlashTrainConfig)}  # keys older runs did not record
        defaults["shuffle"] = "global"  # runs from before --shuffle shuffled every sample at once
        diffs = [f"{k}: {saved_cfg.get(k, defaults.get(k))!r} != {v!r}" for k, v in sorted(cfg.as_dict().items())
                 if k not in _RESUME_FREE and saved_cfg.get(k, defaults.get(k)) != v]
        for key, value in (("num_samples", num_samples), ("world_size", world)):
            saved = meta.get("extra", {}).get(key, 1 if key == "world_size" else None)  # older runs: one process
            if saved != value:
                diffs.append(f"{key}: {saved!r} != {value!r}")
        if diffs:
            raise ValueError(f"--resume refused: {ckpt} was trained with different settings or data:\n  - "
                             + "\n  - ".join(diffs) + "\nRerun with the original settings (and number of ranks), "
                             "or start a new --output-dir.")
        state, _ = load_checkpoint(ckpt, model=draft, optimizer=optimizer, scheduler=scheduler)
        if is_main:
            log(f"resumed from {ckpt} at step {state.step}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    block, first = cfg.block_size, draft_config.first_draft_slot
    loss_module = local_loss = _DFlashLossModule(draft, target_lm_head)  # validation runs outside DDP (no gradients)
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    def run(module, batch: dict, generator: torch.Generator):
        anchors, valid = sample_anchors(batch["loss_mask"], num_anchors=cfg.num_anchors, seq_lens=batch["seq_lens"],
                                        generator=generator)
        return module(batch, anchors, valid, decay=cfg.loss_decay, confidence_weight=cfg.confidence_weight,
                      distribution_weight=cfg.distribution_weight)

    def anchor_seed(base: int, global_index: int) -> int:
        return base * 1_000_003 + global_index

    val_plan = plan_epoch(val_idx, lengths, seed=cfg.seed, epoch=0, batch_tokens=cfg.batch_tokens, batch_size=1,
                          rank=rank, world_size=world, shuffle=False) if val_idx else []

    @torch.no_grad()
    def validate() -> dict | None:
        if not val_plan:
            return None
        draft.eval()
        sums = _sums(block, device)
        for i, batch in enumerate(supervise.batches(val_plan)):
            # seeded by the micro-batch's global index: the same anchors at every validation, on any world size
            gen = torch.Generator().manual_seed(anchor_seed(cfg.seed + 1, i * world + rank))
            with training_autocast(device):
                _add(sums, run(local_loss, batch, gen))
        draft.train()
        sums.all_reduce(dist_info)
        return _summary(sums, first)

    def record(entry: dict) -> None:
        if not is_main:
            return
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def checkpoint() -> None:
        if is_main:
            save_checkpoint(run_dir, model=draft, optimizer=optimizer, scheduler=scheduler, state=state,
                            config=cfg.as_dict(), extra=describe)
        if world > 1:
            dist.barrier()

    window, last_loss, val = _sums(block, device), float("nan"), None
    waiting = DataWait()
    draft.train()
    while state.step < total:
        plan = plan_epoch(train_idx, lengths, seed=cfg.seed, epoch=state.epoch, batch_tokens=cfg.batch_tokens,
                          batch_size=1, rank=rank, world_size=world, shuffle_block_tokens=block_tokens)
        micro_batches = len(plan)  # equal on every rank, so all ranks sync on the same micro-batch
        # checkpoints follow optimizer steps, so a resumed epoch restarts at a group boundary
        for batch in waiting.wrap(supervise.batches(plan[state.batches_in_epoch :])):
            group, sync = accumulation_group(state.batches_in_epoch, micro_batches, cfg.grad_accum)
            in_group = state.batches_in_epoch % cfg.grad_accum
            # anchors seeded by the micro-batch's global index (step, slot in its group, rank): a resumed
            # run draws what an uninterrupted one would, and G ranks what one process with --grad-accum G does
            gen = torch.Generator().manual_seed(
                anchor_seed(cfg.seed, state.step * cfg.grad_accum * world + in_group * world + rank))
            with loss_module.no_sync() if (world > 1 and not sync) else nullcontext():
                with training_autocast(device):  # the forward only: backward ops take their forward's dtypes
                    out = run(loss_module, batch, gen)
                (out.loss / group).backward()
            _add(window, out)
            state.batches_in_epoch += 1
            state.tokens_seen += int(batch["input_ids"].numel())
            if not sync:
                continue
            optimizer_step(params, optimizer, scheduler, cfg.grad_clip)
            state.step += 1
            if state.step % cfg.log_every == 0 or state.step == total:
                window.all_reduce(dist_info)
                summary = _summary(window, first)
                last_loss = summary["loss"]
                record({"step": state.step, "epoch": state.epoch, "split": "train", **summary,
                        "lr": scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
                        "data_wait_share": waiting.window()})
                if cfg.progress and is_main:
                    log(f"step {state.step}/{total} loss {last_loss:.4f} sim tau {summary['sim_tau']:.3f}")
                window.zero_()
            with waiting.excluded():
                if state.step % cfg.eval_every == 0 or state.step == total:
                    val = validate()
                    if val is not None:
                        record({"step": state.step, "split": "val", **val})
                if state.step % cfg.save_every == 0 or state.step == total:
                    checkpoint()
            if state.step >= total:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    if is_main:
        log(f"data wait: {waiting.total():.1%} of training step time spent waiting for batches")
    if val is None:
        val = validate()
    export_dir = None
    if cfg.export and is_main:
        from draftcache.trainer.dflash.export import export_dflash_draft, vllm_cpu_k_norm_warning

        export_dir = str(export_dflash_draft(draft, run_dir / "export", target_model_id=target_path,
                                             mask_token=mask.as_dict()))
        if (warning := vllm_cpu_k_norm_warning(export_dir)) is not None:
            log(warning)
    result = DFlashTrainResult(run_dir=str(run_dir), steps=state.step, train_loss=last_loss,
                               val_loss=val["loss"] if val else None, val_acc=val["acc"] if val else [],
                               val_sim_tau=val["sim_tau"] if val else None,
                               wall_seconds=time.perf_counter() - t0, export_dir=export_dir)
    if is_main:
        (run_dir / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result
