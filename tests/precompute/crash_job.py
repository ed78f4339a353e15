"""A precompute that crashes like a killed machine: the CLI, SIGKILLing its own process right after
its ``N``-th shard commit is journaled (fsynced), so the kill lands at a known point instead of a
polled one. Under ``torchrun`` only rank ``RANK`` (default 0) dies.
Usage: ``python crash_job.py N [RANK] -- ARGS...`` (ARGS: ``precompute-eagle3`` flags).
"""

from __future__ import annotations

import os
import signal
import sys

import draftcache.precompute.writer as writer
from draftcache.precompute.cli import app


def main() -> None:
    split = sys.argv.index("--")
    head, args = sys.argv[1:split], sys.argv[split + 1:]
    after, victim = int(head[0]), int(head[1]) if len(head) > 1 else 0
    if int(os.environ.get("RANK", "0")) == victim:
        real, commits = writer.append_commit, [0]

        def append_then_die(*a, **k):
            real(*a, **k)
            commits[0] += 1
            if commits[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)

        writer.append_commit = append_then_die
    app(args, prog_name="precompute-eagle3")


if __name__ == "__main__":
    main()
