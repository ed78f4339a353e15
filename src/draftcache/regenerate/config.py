"""The ``draftcache regenerate`` configuration: one frozen dataclass, validated before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from draftcache.data.templates import chat_template_problem
from draftcache.targets.vllm_options import memory_utilization_problem, parse_vllm_args

__all__ = ["ENGINE_CHOICES", "DTYPE_CHOICES", "VLLM_RESERVED_ARGS", "RegenerateConfig", "RegenerateConfigError"]

ENGINE_CHOICES = ("vllm", "hf")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
#: ``vllm.LLM`` arguments regenerate sets from its own flags (``--vllm-arg`` may not set them)
VLLM_RESERVED_ARGS = {"model": "use --target-model", "tokenizer": "the target's tokenizer is used",
                      "dtype": "use --dtype", "max_model_len": "use --max-model-len", "seed": "use --seed",
                      "tensor_parallel_size": "use --tensor-parallel-size", "trust_remote_code": "use --trust-remote-code"}


class RegenerateConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem, each naming its flag."""


@dataclass(frozen=True)
class RegenerateConfig:
    """Everything that shapes one ``draftcache regenerate`` run.

    ``None`` for ``target_model``/``input_data`` means the embedded default shipped in the package;
    ``engine=None`` means vLLM when it is importable, else HF.
    """

    output: str                           # the regenerated chat JSONL (a progress file sits beside it)
    target_model: str | None = None       # HF name or local dir; None = embedded default target
    input_data: str | None = None         # local file/dir or HF dataset name; None = embedded chats
    engine: str | None = None             # vllm | hf | None (vllm when importable)
    chat_template: str | None = None      # Jinja file or text replacing the tokenizer's template
    temperature: float = 0.0              # 0 = greedy (reproducible across interruptions)
    max_new_tokens: int = 512             # per reply; a reply cut here is counted as truncated
    seed: int = 0                         # sampling seed (per conversation and turn)
    batch_size: int = 16                  # conversations per batch = per commit: smaller = finer resume
    max_model_len: int | None = None      # prompt + reply budget; None = the target's max_position_embeddings
    dtype: str = "auto"                   # auto = fp32 on CPU, bf16 on GPUs
    device: str | None = None             # HF engine: cuda, cuda:N or cpu (None = cuda when available)
    tensor_parallel_size: int = 1         # vLLM engine
    gpu_memory_utilization: float | None = None  # vLLM engine: device (CPU build: host RAM) share; None = what is free
    vllm_args: tuple[str, ...] = ()       # vLLM engine: further vllm.LLM arguments, KEY=VALUE (not resume settings)
    split: str | None = None              # HF dataset split (default "train")
    shuffle_seed: int | None = 42         # order of hub datasets (local files keep file order)
    num_samples: int | None = None        # the first N valid conversations; None = all
    trust_remote_code: bool = False
    strict: bool = False                  # the first bad record is an error naming file and line
    resume: bool = False
    progress: bool = True

    def problems(self) -> list[str]:
        """Every invalid value, each naming its flag."""
        p: list[str] = []
        if not self.output:
            p.append("--output is required: the JSONL file to write the regenerated chats into")
        elif not self.output.endswith(".jsonl"):
            p.append(f"--output {self.output!r}: must end in .jsonl (the output is chat JSON lines)")
        if self.engine is not None and self.engine not in ENGINE_CHOICES:
            p.append(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if not self.temperature >= 0:
            p.append(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.max_new_tokens < 1:
            p.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            p.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            p.append(f"--max-model-len ({self.max_model_len}) must exceed --max-new-tokens ({self.max_new_tokens}): "
                     "it holds the prompt and the reply")
        if self.dtype not in DTYPE_CHOICES:
            p.append(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            p.append(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device is not None and self.engine == "vllm":
            p.append("--device applies to --engine hf only; vLLM picks its own devices (see --tensor-parallel-size)")
        if self.tensor_parallel_size < 1:
            p.append(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.engine == "hf":
            p.append("--tensor-parallel-size applies to --engine vllm only")
        if self.num_samples is not None and self.num_samples < 1:
            p.append(f"--num-samples must be >= 1 (or omitted for all), got {self.num_samples}")
        if self.engine == "hf" and (self.gpu_memory_utilization is not None or self.vllm_args):
            p.append("--gpu-memory-utilization and --vllm-arg configure vLLM: they apply to --engine vllm only")
        memory = memory_utilization_problem(self.gpu_memory_utilization)
        if memory:
            p.append(memory)
        try:
            parse_vllm_args(self.vllm_args, reserved=VLLM_RESERVED_ARGS)
        except ValueError as e:
            p.append(str(e))
        template = chat_template_problem(self.chat_template)
        if template:
            p.append(template)
        return p

    def validate(self) -> "RegenerateConfig":
        """Raise :class:`RegenerateConfigError` listing every invalid value; return ``self`` otherwise."""
        problems = self.problems()
        if problems:
            raise RegenerateConfigError("invalid regenerate settings:\n  - " + "\n  - ".join(problems))
        return self

    def as_dict(self) -> dict:
        return asdict(self)
