"""Running the precompute under ``torchrun``: the rank layout, the process group, and steps that
fail together.

``torchrun --nproc_per_node=N -m draftcache.precompute ...`` starts N copies of the command line
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Every rank reads and tokenises the same data
(cheap and deterministic) and loads the target; the shards are then split between ranks (shard
``k`` of the remaining ones goes to rank ``position % world_size``), each rank writes its own
shard files, and rank 0 alone owns ``manifest.json`` and the cache lock.

Failing together instead of hanging: work that can fail on one rank only (loading the model onto
its device, running a shard, writing a file) runs inside ``run_step``, which catches the
exception and then exchanges every rank's outcome with one ``all_gather_object``. If any rank
failed, every rank raises ``RankFailedError("rank R failed: <step>: <cause>")``, so the job ends
with that message instead of leaving the others waiting in a collective. A rank that dies without
raising (killed, segfault) is noticed by ``torchrun``, which stops the others; as a last resort
every collective times out after ``DRAFTCACHE_DIST_TIMEOUT_S`` seconds (default 600), which
therefore must exceed the time one rank needs for one shard.
"""

from __future__ import annotations

import datetime as _dt
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["DistContext", "RankFailedError", "PeerLostError", "init_distributed", "shutdown_distributed", "run_step",
           "gather_step", "all_reduce_sum", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "PATIENT_TIMEOUT_ENV",
           "DEFAULT_PATIENT_TIMEOUT_S"]

TIMEOUT_ENV = "DRAFTCACHE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
# Steps whose length grows with the cache (verifying every committed shard on --resume) exchange
# their outcomes on a second gloo group with this much longer timeout, so they are not bounded
# by the per-shard collective timeout above.
PATIENT_TIMEOUT_ENV = "DRAFTCACHE_DIST_PATIENT_TIMEOUT_S"
DEFAULT_PATIENT_TIMEOUT_S = 7 * 24 * 3600.0

_PATIENT_GROUP: list[Any] = []  # the long-timeout group of this process, once joined

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """A rank of a distributed precompute failed; ``rank`` is the failed one (this rank when it
    failed itself, else the lowest failed rank) and ``cause`` what went wrong there."""

    def __init__(self, rank: int, cause: str, also: list[int] | None = None):
        self.rank = rank
        self.cause = cause
        others = f" (also failed: rank {', '.join(map(str, also))})" if also else ""
        super().__init__(f"rank {rank} failed: {cause}{others}")


class PeerLostError(RuntimeError):
    """A collective broke because another rank vanished (killed, crashed) without reporting why."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the manifest, the lock, the log and the progress bar."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistContext":
        """From ``torchrun``'s ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when unset)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them): {exc}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a rank of a job; launch with torchrun")
        return cls(rank=rank, world_size=world, local_rank=local)


def _timeout(env: str = TIMEOUT_ENV, default: float = DEFAULT_TIMEOUT_S) -> _dt.timedelta:
    raw = os.environ.get(env)
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{env} must be > 0 seconds; got {seconds}")
    return _dt.timedelta(seconds=seconds)


def init_distributed(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the process group (NCCL for CUDA, gloo on the CPU) when ``ctx`` is distributed and
    return the device this rank computes on: ``cuda:<local_rank>`` for a CUDA request (whatever
    index was asked for), else ``device``. One process: nothing to join, ``device`` unchanged."""
    if not ctx.is_distributed:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=_timeout(),
                                rank=ctx.rank, world_size=ctx.world_size, **kwargs)
    _PATIENT_GROUP[:] = [dist.new_group(backend="gloo", timeout=_timeout(PATIENT_TIMEOUT_ENV,
                                                                          DEFAULT_PATIENT_TIMEOUT_S))]
    return device


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group (a no-op for one process or when it was never joined)."""
    if not ctx.is_distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            # Let every rank reach teardown before any rank closes its gloo connections: a peer that
            # exits first can abort the other's gloo thread ("terminate called without an active
            # exception", SIGABRT) while it is still destroying its group.
            dist.barrier()
        except Exception:
            pass  # a peer is already gone (failure path): nothing left to wait for
        _PATIENT_GROUP.clear()
        dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or traceback.format_exception_only(type(exc), exc)[-1].strip()
    return f"{type(exc).__name__}: {text}"


def run_step(ctx: DistContext, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on this rank and return its result; distributed, fail on every rank if it failed
    on any (see ``gather_step``). One process: exceptions propagate unchanged."""
    return _step(ctx, what, fn, share=False)


def gather_step(ctx: DistContext, what: str, fn: Callable[[], T], *, patient: bool = False) -> list[T]:
    """Run ``fn`` on this rank and return every rank's result, by rank (results must be picklable;
    one process: ``[fn()]`` and exceptions propagate unchanged).

    Distributed, an exception is caught and the outcomes are exchanged, so either every rank gets
    all results or every rank raises ``RankFailedError`` naming the failed rank and ``what`` it was
    doing. Every rank must call ``run_step`` / ``gather_step`` the same number of times in the same
    order, and ``fn`` must not use collectives itself.

    ``patient``: the outcomes are exchanged on a gloo group whose timeout is
    ``DRAFTCACHE_DIST_PATIENT_TIMEOUT_S`` (default 7 days) instead of the per-shard timeout, for
    steps whose length grows with the cache (split the work between ranks as well).
    """
    return _step(ctx, what, fn, share=True, patient=patient)


def _step(ctx: DistContext, what: str, fn: Callable[[], T], share: bool, patient: bool = False) -> Any:
    if not ctx.is_distributed:
        result = fn()
        return [result] if share else result
    import torch.distributed as dist

    result = None
    try:
        result = fn()
        outcome: tuple[bool, Any] = (True, result if share else None)
    except Exception as exc:  # every kind of failure must reach the other ranks
        outcome = (False, f"{what}: {_describe(exc)}")
    outcomes: list[Any] = [None] * ctx.world_size
    try:
        group = _PATIENT_GROUP[0] if patient and _PATIENT_GROUP else None
        dist.all_gather_object(outcomes, outcome, group=group)
    except Exception as exc:  # the collective itself broke: a peer died without reporting
        raise PeerLostError(f"rank {ctx.rank} stopped: another rank stopped answering while this one was "
                            f"{what} (it crashed or was killed; torchrun's report names it and its exit code): "
                            f"{_describe(exc)}") from exc
    failed = [r for r, (ok, _) in enumerate(outcomes) if not ok]
    if failed:
        rank = ctx.rank if ctx.rank in failed else failed[0]
        raise RankFailedError(rank, outcomes[rank][1], [r for r in failed if r != rank])
    return [value for _, value in outcomes] if share else result


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (through the process group's device for NCCL)."""
    if not ctx.is_distributed:
        return tensor
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor
