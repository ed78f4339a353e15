"""CacheLock against a real second process and a stale lock from a dead one."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from draftcache.cache_format import CacheLock, CacheLockedError

HOLDER = textwrap.dedent("""
    import sys, time
    from draftcache.cache_format import CacheLock
    with CacheLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold until the test says so
""")


def test_second_process_is_refused_until_the_first_releases(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        owner = json.loads((tmp_path / ".lock").read_text())
        assert owner["pid"] == holder.pid and owner["hostname"] == socket.gethostname()
        with pytest.raises(CacheLockedError, match=f"is locked by process {holder.pid} on this host .* delete "):
            with CacheLock(tmp_path):
                pass
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    assert not (tmp_path / ".lock").exists()
    with CacheLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] != holder.pid
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid, "hostname": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.warns(UserWarning, match=f"removing stale lock .* left by process {dead_pid}"):
        lock = CacheLock(tmp_path)
        lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] != dead_pid
    lock.release()


def test_lock_from_another_host_or_unreadable_is_reported(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "hostname": "elsewhere", "started": "x"}))
    with pytest.raises(CacheLockedError, match="locked by process 1 on host 'elsewhere'"):
        CacheLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text("garbage")
    with pytest.raises(CacheLockedError, match="does not name its owner"):
        CacheLock(tmp_path).acquire()


def test_lock_is_not_reentrant_in_one_process(tmp_path):
    with CacheLock(tmp_path):
        with pytest.raises(CacheLockedError):
            CacheLock(tmp_path).acquire()


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    """A dead owner's pid now belongs to another live process: its start time differs, so the lock is stale."""
    import json as _json
    import socket as _socket
    import subprocess as _subprocess
    import sys as _sys
    import warnings as _warnings

    from draftcache.cache_format import CacheLock

    other = _subprocess.Popen([_sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(_json.dumps({"pid": other.pid, "hostname": _socket.gethostname(),
                                                     "started": "then", "pid_start": 1}))
        with _warnings.catch_warnings(record=True):
            _warnings.simplefilter("always")
            with CacheLock(tmp_path):
                assert _json.loads((tmp_path / ".lock").read_text())["pid"] != other.pid
    finally:
        other.kill()
        other.wait()
