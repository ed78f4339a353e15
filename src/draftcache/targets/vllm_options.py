"""Engine options of every command that starts vLLM (``precompute-eagle3 --engine vllm``,
``draftcache regenerate --engine vllm``, ``draftcache eval --engine vllm``).

* ``--gpu-memory-utilization F``: the share of the device vLLM reserves for weights, activations
  and KV cache; on vLLM's CPU build the share of host RAM (``total * F`` must be free when it
  starts). Default (:func:`default_memory_utilization`): what is actually free now, less what
  draftcache itself still needs beside the engine (the target's head and one batch of states and
  logits for precompute), capped at vLLM's own 0.9.
* ``--vllm-arg KEY=VALUE`` (repeated): any other ``vllm.LLM`` engine argument; ``VALUE`` is read
  as JSON (``4096``, ``true``, ``{"a": 1}``) and otherwise kept as the string.

Neither is a resume key: how much memory an engine may use does not change what it computes.
Nothing here imports vLLM (psutil is not a dependency either: free host memory is read from
``/proc/meminfo``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["GPU_MEMORY_HELP", "VLLM_ARG_HELP", "RUNNER_RESERVED_ARGS", "parse_vllm_args", "memory_utilization_problem", "free_device_memory", "default_memory_utilization",
           "engine_memory_kwargs", "VLLM_DEFAULT_UTILIZATION", "MARGIN_BYTES"]

VLLM_DEFAULT_UTILIZATION = 0.9   # vLLM's own default on GPUs (the CPU build's is 0.92)
MARGIN_BYTES = 1 << 30           # left free beyond what draftcache names: allocator slack, other processes' growth
_MIN_UTILIZATION = 0.05

GPU_MEMORY_HELP = ("vLLM: the share of the device it may reserve (on vLLM's CPU build: of host RAM). Default: what "
                   "is free when it starts, less what draftcache keeps beside it, at most 0.9.")
VLLM_ARG_HELP = ("vLLM: another engine argument KEY=VALUE for vllm.LLM (repeatable; VALUE read as JSON, else a "
                 "string), e.g. --vllm-arg max_num_seqs=8.")

#: ``vllm.LLM`` arguments the precompute runner sets itself (``--vllm-arg`` may not change them).
RUNNER_RESERVED_ARGS = {
    "model": "the target is --target-model",
    "tensor_parallel_size": "use --tensor-parallel-size",
    "trust_remote_code": "use --trust-remote-code",
    "max_model_len": "set from --seq-length",
    "speculative_config": "the runner captures hidden states through it",
    "kv_transfer_config": "the runner receives the hidden states through it",
    "enable_prefix_caching": "every prompt token's states must come from its own forward",
}


def parse_vllm_args(items: Iterable[str], *, reserved: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``["max_num_seqs=8", "kv_cache_dtype=fp8"]`` -> ``{"max_num_seqs": 8, "kv_cache_dtype": "fp8"}``.

    Raises ``ValueError`` naming the item for one without ``=``, and for a key in ``reserved``
    (``{key: why}``: what draftcache sets itself, e.g. the flag that sets it)."""
    reserved = reserved or {}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--vllm-arg {item!r}: expected KEY=VALUE, e.g. --vllm-arg max_num_seqs=8")
        if key in reserved:
            raise ValueError(f"--vllm-arg {key}: {reserved[key]}")
        if key == "gpu_memory_utilization":
            raise ValueError("--vllm-arg gpu_memory_utilization: use --gpu-memory-utilization")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def memory_utilization_problem(value: float | None) -> str | None:
    """The message for an invalid ``--gpu-memory-utilization`` (None when valid or not given)."""
    if value is not None and not 0 < value <= 1:
        return f"--gpu-memory-utilization must be in (0, 1], the share of the device vLLM may reserve; got {value}"
    return None


def _meminfo() -> dict[str, int]:
    info = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                info[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def free_device_memory(on_cpu: bool) -> tuple[int, int]:
    """``(free, total)`` bytes of what vLLM will reserve from: host RAM (``MemAvailable``,
    ``MemTotal``) on the CPU build, else the current CUDA device."""
    if on_cpu:
        info = _meminfo()
        return info["MemAvailable"], info["MemTotal"]
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def default_memory_utilization(*, on_cpu: bool, reserve_bytes: int = 0, free_total: tuple[int, int] | None = None
                               ) -> float:
    """The largest share of the device that is free now less ``reserve_bytes`` (what draftcache keeps
    beside the engine) and :data:`MARGIN_BYTES`, capped at :data:`VLLM_DEFAULT_UTILIZATION`, rounded
    down to 0.01. Raises ``ValueError`` naming the numbers when not even 5% fits."""
    free, total = free_total if free_total is not None else free_device_memory(on_cpu)
    usable = free - int(reserve_bytes) - MARGIN_BYTES
    share = min(VLLM_DEFAULT_UTILIZATION, usable / total) if total > 0 else 0.0
    share = int(share * 100) / 100
    if share < _MIN_UTILIZATION:
        where = "host RAM" if on_cpu else "device memory"
        raise ValueError(f"vLLM would get {max(usable, 0) / 2**30:.2f} GiB of {total / 2**30:.2f} GiB {where}: "
                         f"{free / 2**30:.2f} GiB is free, draftcache keeps {reserve_bytes / 2**30:.2f} GiB beside "
                         f"the engine and {MARGIN_BYTES / 2**30:.0f} GiB spare. Free memory, or pass "
                         "--gpu-memory-utilization explicitly")
    return share


def engine_memory_kwargs(gpu_memory_utilization: float | None, vllm_args: Mapping[str, Any] | None, *,
                         on_cpu: bool, reserve_bytes: int = 0) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments: ``vllm_args`` plus ``gpu_memory_utilization`` (the given one,
    else :func:`default_memory_utilization`)."""
    kwargs = dict(vllm_args or {})
    kwargs["gpu_memory_utilization"] = (float(gpu_memory_utilization) if gpu_memory_utilization is not None
                                        else default_memory_utilization(on_cpu=on_cpu, reserve_bytes=reserve_bytes))
    return kwargs
