"""Checks on ``--output-dir`` before (and again after) the cache lock is taken."""

from __future__ import annotations

from pathlib import Path

from draftcache.cache_format import MANIFEST_FILE, CacheLock

__all__ = ["PrecomputeError", "check_output_dir", "check_cache_contents"]


class PrecomputeError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def check_output_dir(output_dir: str | Path, resume: bool) -> None:
    """Refuse a directory another live precompute holds (naming its pid), a non-empty directory
    without ``resume``, and with ``resume`` a non-empty directory that is not a cache.

    Cheap and side-effect free apart from removing a stale lock, so it runs before any model loads.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PrecomputeError(f"--output-dir {out} exists and is not a directory; choose another path")
    if not out.is_dir():
        return
    lock = CacheLock(out)
    if lock.path.exists():
        with lock:  # raises CacheLockedError naming the owner while it runs; a dead owner's lock is removed
            pass
    check_cache_contents(out, resume)


def check_cache_contents(out: Path, resume: bool) -> None:
    """Refuse a non-empty ``out`` without ``resume``, and with it one that holds no manifest."""
    entries = sorted(p.name for p in out.iterdir() if p.name != CacheLock(out).path.name)
    if not entries:
        return
    if not resume:
        what = "a cache" if MANIFEST_FILE in entries else f"{len(entries)} file(s) ({', '.join(entries[:3])})"
        raise PrecomputeError(f"--output-dir {out} already holds {what}; pass --resume to continue it, or choose an "
                              "empty directory")
    if MANIFEST_FILE not in entries:
        raise PrecomputeError(f"--resume: {out} holds {', '.join(entries[:3])} but no {MANIFEST_FILE}, so it is not a "
                              "draftcache cache; choose an empty --output-dir (or empty this one)")
