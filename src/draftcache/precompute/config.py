"""The precompute configuration: one frozen dataclass, validated before any model loads."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

from draftcache.data.templates import chat_template_problem
from draftcache.targets.vllm_options import RUNNER_RESERVED_ARGS, memory_utilization_problem, parse_vllm_args

__all__ = ["PrecomputeConfig", "ConfigError", "SUPERVISION_CHOICES", "DTYPE_CHOICES", "METHOD_CHOICES",
           "ENGINE_CHOICES", "parse_layer_ids"]

SUPERVISION_CHOICES = ("auto", "probs", "topk", "hidden")
METHOD_CHOICES = ("eagle3", "dflash")  # the manifest's ``kind``
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "fp8")
ENGINE_CHOICES = ("hf", "vllm")  # what runs the target: transformers in-process, or vLLM


class ConfigError(ValueError):
    """One or more command-line values are invalid; the message lists every problem."""


def parse_layer_ids(text: str | None, flag: str = "--aux-layer-ids") -> list[int] | None:
    """``"1,15,28"`` -> ``[1, 15, 28]``; ``None``/empty -> ``None`` (use the default recipe)."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip() != ""]
    except ValueError:
        raise ConfigError(
            f"{flag}: expected comma-separated integers such as '1,15,28', got {text!r}"
        ) from None


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything that shapes one ``precompute-eagle3`` run (NeMo's flags plus ours).

    ``None`` for ``target_model``/``input_data`` means the embedded default shipped in the package.
    """

    output_dir: str
    target_model: str | None = None      # HF name or local dir; None = embedded default target
    input_data: str | None = None        # local file/dir or HF dataset name; None = embedded chats
    seq_length: int = 2048               # truncate longer conversations (tokens)
    draft_vocab_size: int | None = None  # None = the full target vocabulary
    batch_size: int = 4                  # samples per target forward (length-bucketed within a shard)
    shard_size: int = 256                # most samples per shard: smaller = finer resume, more files
    max_shard_mb: float | None = 1000.0  # most MB (1e6 bytes) per shard: bounds what a crash loses; None = no cap
    dtype: str = "bf16"                  # storage dtype of float fields; fp8 = hidden states as e4m3 + a scale per row (half of bf16), probs bf16
    device: str | None = None            # None = cuda when available, else cpu
    device_map: str | None = None        # "auto": split a target too large for one GPU over all visible GPUs (one process)
    split: str | None = None             # HF dataset split (default "train")
    shuffle_seed: int | None = 42        # order of hub datasets (local files keep file order)
    num_samples: int | None = None       # read records until N usable samples (after every skip); None = all
    aux_layer_ids: tuple[int, ...] | None = None  # decoder-layer outputs; None = [1, L//2-1, L-4]
    trust_remote_code: bool = False
    strict: bool = False                 # first bad record (or non-finite sample) is an error naming it
    max_non_finite: float = 0.01         # abort when more than this share of samples is non-finite (a broken target)
    resume: bool = False
    supervision: str = "auto"            # auto | probs | topk | hidden
    target_probs_topk: int = 0           # k for the topk encoding (NeMo: >0 switches topk on)
    num_workers: int = 0                 # tokenisation processes (spawned); 0 = in this process
    chat_template: str | None = None     # Jinja file or text replacing the tokenizer's template (fingerprinted)
    method: str = "eagle3"               # eagle3 | dflash: what the cache supervises (manifest kind)
    target_layer_ids: tuple[int, ...] | None = None  # dflash: captured layers; None = default_dflash_layer_ids(L, draft_layers)
    draft_layers: int = 1                # dflash: draft depth the default layer rule spreads ids for
    progress: bool = True                # tqdm bars (--quiet turns them off)
    engine: str = "hf"                   # hf | vllm (recorded in the manifest; --resume needs the same)
    tensor_parallel_size: int = 1        # vLLM tensor parallelism (engine vllm only)
    gpu_memory_utilization: float | None = None  # vLLM's device (CPU build: host RAM) share; None = what is free
    vllm_args: tuple[str, ...] = ()      # further vllm.LLM arguments, KEY=VALUE (VALUE read as JSON)

    def problems(self) -> list[str]:
        """Every invalid value, each naming its flag."""
        p: list[str] = []
        if not self.output_dir:
            p.append("--output-dir is required: the directory to write the cache into")
        if self.seq_length < 2:
            p.append(f"--seq-length must be >= 2 (one input and one next token), got {self.seq_length}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            p.append(f"--draft-vocab-size must be >= 1 (or omitted for the full vocabulary), "
                     f"got {self.draft_vocab_size}")
        if self.batch_size < 1:
            p.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard_size < 1:
            p.append(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.max_shard_mb is not None and not self.max_shard_mb > 0:
            p.append(f"--max-shard-mb must be > 0 (MB of tensor data per shard), got {self.max_shard_mb}")
        if self.dtype not in DTYPE_CHOICES:
            p.append(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not 0 <= self.max_non_finite < 1:
            p.append(f"--max-non-finite must be a share in [0, 1), got {self.max_non_finite}")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            p.append(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device_map not in (None, "auto"):
            p.append(f"--device-map must be 'auto' (or omitted for one device), got {self.device_map!r}")
        elif self.device_map is not None and importlib.util.find_spec("accelerate") is None:
            p.append(f"--device-map {self.device_map} splits the target with accelerate, which is not installed: "
                     "pip install 'draftcache[devices]' (one device needs no --device-map)")
        if self.num_samples is not None and self.num_samples < 1:
            p.append(f"--num-samples must be >= 1 (or omitted for all), got {self.num_samples}")
        if self.supervision not in SUPERVISION_CHOICES:
            p.append(f"--supervision must be one of {', '.join(SUPERVISION_CHOICES)}, got {self.supervision!r}")
        if self.target_probs_topk < 0:
            p.append(f"--target-probs-topk must be >= 0, got {self.target_probs_topk}")
        if self.supervision == "topk" and self.target_probs_topk < 1:
            p.append("--supervision topk needs --target-probs-topk K with K >= 1")
        if self.supervision in ("probs", "hidden") and self.target_probs_topk > 0:
            p.append(f"--target-probs-topk {self.target_probs_topk} conflicts with --supervision {self.supervision}: "
                     "drop one of them")
        if (self.draft_vocab_size is not None and self.target_probs_topk > self.draft_vocab_size):
            p.append(f"--target-probs-topk ({self.target_probs_topk}) must not exceed --draft-vocab-size "
                     f"({self.draft_vocab_size})")
        if self.aux_layer_ids is not None:
            ids = list(self.aux_layer_ids)
            if len(ids) != 3:
                p.append(f"--aux-layer-ids needs exactly three layer ids (low, mid, high) such as '1,15,28', "
                         f"got {len(ids)}: {ids}")
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            if repeated:
                p.append(f"--aux-layer-ids must be distinct, got {ids} (repeated: {repeated})")
            if any(i < 0 for i in ids):
                p.append(f"--aux-layer-ids must be non-negative decoder-layer ids, got {ids}")
        p += self._method_problems()
        if self.num_workers < 0:
            p.append(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.engine not in ENGINE_CHOICES:
            p.append(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if self.tensor_parallel_size < 1:
            p.append(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        elif self.tensor_parallel_size > 1 and self.engine != "vllm":
            p.append(f"--tensor-parallel-size {self.tensor_parallel_size} needs --engine vllm (the hf engine runs "
                     "the target on one device; shard the data over processes with torchrun instead)")
        if self.engine == "vllm" and self.method != "eagle3":
            p.append(f"--engine vllm captures EAGLE-3 supervision only; --method {self.method} runs with --engine hf")
        if self.engine == "vllm" and self.device_map is not None:
            p.append("--device-map is for --engine hf; vLLM splits a target with --tensor-parallel-size")
        if self.engine != "vllm" and (self.gpu_memory_utilization is not None or self.vllm_args):
            p.append("--gpu-memory-utilization and --vllm-arg configure vLLM: they need --engine vllm")
        memory = memory_utilization_problem(self.gpu_memory_utilization)
        if memory:
            p.append(memory)
        try:
            parse_vllm_args(self.vllm_args, reserved=RUNNER_RESERVED_ARGS)
        except ValueError as e:
            p.append(str(e))
        if self.engine == "vllm" and self.device is not None:
            p.append(f"--device {self.device} does not apply to --engine vllm, which places the target itself "
                     "(use --tensor-parallel-size N); drop --device")
        template = chat_template_problem(self.chat_template)
        if template:
            p.append(template)
        return p

    def _method_problems(self) -> list[str]:
        p: list[str] = []
        if self.method not in METHOD_CHOICES:
            return [f"--method must be one of {', '.join(METHOD_CHOICES)}, got {self.method!r}"]
        if self.method == "eagle3":
            if self.target_layer_ids is not None:
                p.append("--target-layer-ids is for --method dflash; EAGLE-3 caches take --aux-layer-ids")
            return p
        for flag, given in (("--aux-layer-ids", self.aux_layer_ids is not None),
                            ("--draft-vocab-size", self.draft_vocab_size is not None),
                            ("--supervision", self.supervision not in ("auto", "hidden")),
                            ("--target-probs-topk", self.target_probs_topk > 0)):
            if given:
                p.append(f"{flag} is for EAGLE-3 caches; --method dflash stores the target's argmax over the full "
                         "vocabulary, and with --supervision hidden its final hidden state too (drop it, or use "
                         "--target-layer-ids / --draft-layers)")
        if self.draft_layers < 1:
            p.append(f"--draft-layers must be >= 1, got {self.draft_layers}")
        if self.target_layer_ids is not None:
            ids = list(self.target_layer_ids)
            if not ids:
                p.append("--target-layer-ids is empty; DFlash needs at least one target layer")
            if len(set(ids)) != len(ids):
                p.append(f"--target-layer-ids must be distinct, got {ids}")
            if any(i < 0 for i in ids):
                p.append(f"--target-layer-ids must be non-negative decoder-layer ids, got {ids}")
        return p

    def target_problems(self, *, num_layers: int, vocab_size: int) -> list[str]:
        """Values that do not fit the target (read from its config before the weights load)."""
        p: list[str] = []
        if self.method == "dflash" and self.target_layer_ids is not None:
            outside = [i for i in self.target_layer_ids if i >= num_layers]
            if outside:
                p.append(f"--target-layer-ids {outside} out of range: the target has {num_layers} decoder layers, "
                         f"so ids must lie in [0, {num_layers})")
        if self.aux_layer_ids is not None:
            outside = [i for i in self.aux_layer_ids if i >= num_layers]
            if outside:
                p.append(f"--aux-layer-ids {outside} out of range: the target has {num_layers} decoder layers, "
                         f"so ids must lie in [0, {num_layers})")
        if self.draft_vocab_size is not None and self.draft_vocab_size > vocab_size:
            p.append(f"--draft-vocab-size {self.draft_vocab_size} exceeds the target vocabulary ({vocab_size}); "
                     "omit it to use the full vocabulary")
        if self.target_probs_topk > vocab_size:
            p.append(f"--target-probs-topk {self.target_probs_topk} exceeds the target vocabulary ({vocab_size})")
        return p

    def validate(self) -> "PrecomputeConfig":
        """Raise ``ConfigError`` listing every invalid value; return ``self`` when all are valid."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid precompute settings:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def max_shard_bytes(self) -> int | None:
        """``--max-shard-mb`` in bytes (None: no byte cap)."""
        return None if self.max_shard_mb is None else max(1, int(self.max_shard_mb * 1e6))

    @property
    def encoding_request(self) -> str:
        """The requested encoding after NeMo's ``--target-probs-topk K`` shorthand."""
        if self.supervision == "auto" and self.target_probs_topk > 0:
            return "topk"
        return self.supervision

    def as_dict(self) -> dict:
        """Every setting as a JSON-able dict (``aux_layer_ids`` as a list); ``dataclasses.replace``
        is the way to derive a changed config."""
        d = asdict(self)
        d["aux_layer_ids"] = list(self.aux_layer_ids) if self.aux_layer_ids is not None else None
        d["target_layer_ids"] = list(self.target_layer_ids) if self.target_layer_ids is not None else None
        d["vllm_args"] = list(self.vllm_args)
        return d
