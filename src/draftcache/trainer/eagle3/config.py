"""The training configuration: one frozen dataclass, validated before any data or model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from draftcache.data.templates import chat_template_problem
from draftcache.trainer.batching import SHUFFLE_MODES

__all__ = ["TrainConfig", "TrainConfigError"]


class TrainConfigError(ValueError):
    """One or more training settings are invalid; the message lists every problem."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes one ``draftcache train`` run.

    Exactly one source of supervision: ``cached_target_path`` (a precompute cache) or the online
    path (``target_model``/``input_data``, ``None`` = the embedded default, used when no cache is given).
    """

    output_dir: str
    cached_target_path: str | None = None  # cache from precompute-eagle3; None = online target
    allow_partial_cache: bool = False      # train on an unfinished cache's committed prefix (else refused)
    target_model: str | None = None        # online: HF name/dir; None = embedded default target
    input_data: str | None = None          # online: chats; None = embedded default chats
    seq_length: int = 2048                 # online: truncate conversations
    chat_template: str | None = None       # online: Jinja file or text replacing the tokenizer's template
    draft_vocab_size: int | None = None    # hidden caches / online: pick N most frequent; None = cache's own
    aux_layer_ids: tuple[int, ...] | None = None  # online only; a cache fixes its own
    method: str = "eagle3"                 # eagle3 (chain drafting) | peagle (parallel drafting, P-EAGLE)
    ttt_steps: int = 7                     # unrolled training-time-test steps (EAGLE-3: 7); peagle: depths K
    fc_norm: bool = False                  # EAGLE-3.1: one RMSNorm per aux chunk before fc
    norm_output: bool = False              # EAGLE-3.1: the next draft step reads norm(out)
    norm_before_fc: bool = False           # one RMSNorm over the concatenated aux vector before fc
    attention_bias: bool = False           # q/k/v/o biases
    num_hidden_layers: int = 1             # draft decoder layers (layer 0 reads 2H, later ones H)
    mask_token_id: int | None = None       # peagle: token at mask slots; None = an unused non-special token
    step_weight: float = 0.8               # loss weight decay per TTT step
    epochs: int = 4                       # sized for the embedded default (a few CPU minutes)
    max_steps: int | None = None           # stop after this many optimizer steps (None = all epochs)
    batch_tokens: int | None = 1024        # token budget of a packed micro-batch (None = padded batches)
    batch_size: int = 4                    # samples per padded micro-batch when batch_tokens is None
    grad_accum: int = 1                    # micro-batches per optimizer step
    shuffle: str = "window"                # cache: window (blocks of about one reader window) | global; online: global
    lr: float = 3e-3                       # peak lr for the tiny embedded draft; use 1e-4..5e-5 for 8B targets
    min_lr_ratio: float = 0.1              # cosine floor as a fraction of lr
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.5
    val_fraction: float = 0.05             # held-out share of samples (0 = no validation)
    eval_every: int = 100                  # optimizer steps between validations (and at the end)
    save_every: int = 200                  # optimizer steps between checkpoints (and at the end)
    log_every: int = 10
    seed: int = 0
    device: str | None = None              # None = cuda when available, else cpu
    num_workers: int = 0                   # cache: reader threads (min 2); online: DataLoader processes
    freeze_embeddings: bool = True
    init_lm_head: bool = False             # warm-start lm_head from the target's rows (hidden caches, online)
    resume: bool = False
    export: bool = True                    # write an SGLang/vLLM export at the end
    export_format: str = "eagle3"          # eagle3 | speculators
    trust_remote_code: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.method not in ("eagle3", "peagle"):
            p.append(f"method must be eagle3 or peagle, got {self.method!r}")
        if self.num_hidden_layers < 1:
            p.append(f"--draft-layers must be >= 1, got {self.num_hidden_layers}")
        if self.mask_token_id is not None and self.method != "peagle":
            p.append("--mask-token-id applies to --method peagle (or dflash) only")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            p.append(f"--mask-token-id must be a token id >= 0, got {self.mask_token_id}")
        if self.ttt_steps < 1:
            p.append(f"--ttt-steps must be >= 1, got {self.ttt_steps}")
        if not 0 < self.step_weight <= 1:
            p.append(f"--step-weight must be in (0, 1], got {self.step_weight}")
        if self.epochs < 1:
            p.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.batch_tokens is not None and self.batch_tokens < 2:
            p.append(f"--batch-tokens must be >= 2, got {self.batch_tokens}")
        if self.batch_size < 1:
            p.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shuffle not in SHUFFLE_MODES:
            p.append(f"--shuffle must be one of {', '.join(SHUFFLE_MODES)}, got {self.shuffle!r}")
        if self.grad_accum < 1:
            p.append(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.lr <= 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            p.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            p.append(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.grad_clip < 0:
            p.append(f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.export_format not in ("eagle3", "speculators"):
            p.append(f"--export-format must be eagle3 or speculators, got {self.export_format!r}")
        if self.cached_target_path is not None and (self.target_model or self.input_data):
            p.append("--cached-target-path excludes --target-model/--input-data: the cache already fixes both")
        if self.allow_partial_cache and self.cached_target_path is None:
            p.append("--allow-partial-cache applies to --cached-target-path only; online data is never partial")
        if self.cached_target_path is not None and self.aux_layer_ids is not None:
            p.append("--aux-layer-ids applies to online training only; a cache fixes its captured layers")
        if self.cached_target_path is not None and self.chat_template is not None:
            p.append("--chat-template applies to online training only; a cache was rendered with its own template "
                     "(pass --chat-template to precompute-eagle3)")
        template = chat_template_problem(self.chat_template)
        if template:
            p.append(template)
        for name in ("eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return p

    def validate(self) -> "TrainConfig":
        problems = self.problems()
        if problems:
            raise TrainConfigError("invalid training settings:\n  - " + "\n  - ".join(problems))
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["aux_layer_ids"] = list(self.aux_layer_ids) if self.aux_layer_ids is not None else None
        return d
