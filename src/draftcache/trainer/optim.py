"""The optimizer step, gradient-accumulation grouping and mixed precision shared by every draft family's loop."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

__all__ = ["optimizer_step", "accumulation_group", "training_autocast"]


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   grad_clip: float) -> None:
    """One update at the end of an accumulation group: clip (``grad_clip > 0``), step the
    optimizer and the LR schedule, drop the gradients."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def accumulation_group(position: int, micro_batches: int, grad_accum: int) -> tuple[int, bool]:
    """``(size, last)`` of the gradient-accumulation group holding micro-batch ``position`` of an
    epoch of ``micro_batches``: groups of ``grad_accum`` from the epoch's start, the last one taking
    what is left; ``last`` when ``position`` ends its group (the optimizer steps after it).

    Each micro-batch's loss is divided by its group's size, so a short final group is a mean
    too, and every step ends inside its epoch: no gradient carries over into the next one."""
    start = position - position % grad_accum
    size = min(grad_accum, micro_batches - start)
    return size, position == start + size - 1


def training_autocast(device: torch.device) -> AbstractContextManager:
    """Mixed precision for a draft's forward and loss: bf16 autocast on GPUs (parameters and the
    optimizer state stay fp32), full fp32 on CPU (bf16 CPU matmuls are slow and hurt loss parity)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
