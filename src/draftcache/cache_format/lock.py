"""``CacheLock``: one writer per cache directory, across processes.

The lock is the file ``<cache_dir>/.lock`` created with ``O_CREAT | O_EXCL`` (atomic on local
file systems) holding ``{"pid", "hostname", "started"}``. A lock left by a process that no longer
runs on this host is stale: it is removed with a warning and taken over. A lock from another
host cannot be checked, so it is reported and left for the user to remove.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from draftcache.cache_format.errors import CacheLockedError
from draftcache.cache_format.schema import LOCK_FILE

__all__ = ["CacheLock", "CacheLockedError"]

_READ_RETRIES = 5  # the owner writes its JSON right after creating the file; give it a moment


class CacheLock:
    """Exclusive lock on a cache directory; a context manager (``with CacheLock(d): ...``).

    Raises ``CacheLockedError`` naming the owner's pid and host when another live process holds
    it. Not re-entrant: a second ``CacheLock`` on the same directory in the same process fails too.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / LOCK_FILE
        self._content: bytes | None = None

    def acquire(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(),
                              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "pid_start": _process_start_ticks(os.getpid())}).encode()
        for _ in range(3):  # later tries follow the removal of a stale lock or a release meanwhile
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._content = content
            return
        raise CacheLockedError(f"could not acquire {self.path}: another process took it while a stale lock was removed")

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self._content is None:
            return
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._content = None

    def __enter__(self) -> "CacheLock":
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def _handle_existing(self) -> None:
        raw, owner = self._read_owner()
        if raw is None:
            return  # released meanwhile: try to create it again
        if owner is None:
            raise CacheLockedError(
                f"{self.path} exists but does not name its owner (contents {raw[:100]!r}); if no draftcache process "
                f"is writing to {self.cache_dir}, delete {self.path} and retry")
        pid, host = owner.get("pid"), owner.get("hostname")
        if host == socket.gethostname() and isinstance(pid, int) and not _owner_alive(pid, owner.get("pid_start")):
            # re-read right before removing, so a lock that was just replaced by a live owner survives
            if self.path.read_bytes() == raw:
                warnings.warn(f"removing stale lock {self.path} left by process {pid} on {host} "
                              f"(started {owner.get('started')}), which is no longer running", stacklevel=3)
                self.path.unlink(missing_ok=True)
            return
        where = "this host" if host == socket.gethostname() else f"host {host!r}"
        raise CacheLockedError(
            f"{self.cache_dir} is locked by process {pid} on {where} (started {owner.get('started')}): another "
            f"draftcache process is writing this cache. Wait for it to finish or stop it; if it is no longer running, "
            f"delete {self.path} and retry")

    def _read_owner(self) -> tuple[bytes | None, dict[str, Any] | None]:
        raw = b""
        for _ in range(_READ_RETRIES):
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None, None
            try:
                owner = json.loads(raw)
                if isinstance(owner, dict):
                    return raw, owner
            except ValueError:
                pass
            time.sleep(0.05)
        return raw, None


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the name may contain spaces
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, recorded_start: int | None) -> bool:
    """Whether the lock's owner still runs: its pid is alive and, where both are known, it is the same
    process (a dead owner's pid can be reused by an unrelated process)."""
    if not _pid_alive(pid):
        return False
    current = _process_start_ticks(pid)
    return recorded_start is None or current is None or current == recorded_start


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
