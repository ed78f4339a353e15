"""The regenerated chats on disk: an appended JSONL file and a progress file that commits it.

``OUT.jsonl`` holds one ordinary chat record per line (what ``precompute-eagle3 --input-data``
reads), plus the record's ``id`` (its rank among the valid conversations of the input), its
``source`` and ``truncated_turns``::

    {"id": 17, "source": "/data/chat.jsonl:19", "messages": [{"role": "user", "content": "..."}, ...],
     "truncated_turns": 0}

``OUT.jsonl.progress`` is JSON lines: a header with the settings that decide the replies, then one
line per committed batch with the running counts, ``next_id`` (every conversation below it is
done) and ``output_bytes`` (the size of ``OUT.jsonl`` after the batch), and a last
``"finished": true`` line. A batch is committed in this order: its records are appended to
``OUT.jsonl``, flushed and fsynced; then its progress line is appended, flushed and fsynced. So a
kill at any point leaves a progress file whose last complete line describes a prefix of
``OUT.jsonl``; on ``--resume`` the output is cut back to that prefix (dropping a torn last line or
the records of a batch whose progress line never landed) and a torn progress line is dropped.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from draftcache.regenerate.turns import Regenerated

__all__ = ["PROGRESS_SUFFIX", "Progress", "RegenerationOutput", "ResumeError", "SETTING_FLAGS"]

PROGRESS_SUFFIX = ".progress"
_FORMAT = "draftcache-regenerate"
_VERSION = 1

#: The settings a resumed run must share with the run it continues, and the flag behind each.
SETTING_FLAGS: dict[str, str] = {
    "target_model": "--target-model",
    "target_config_sha256": "--target-model (its config.json changed)",
    "chat_template_sha256": "--chat-template",
    "engine": "--engine",
    "dtype": "--dtype",
    "temperature": "--temperature",
    "max_new_tokens": "--max-new-tokens",
    "seed": "--seed",
    "max_model_len": "--max-model-len",
    "input_data": "--input-data",
    "input_fingerprint": "--input-data (its contents changed)",
    "split": "--split",
    "shuffle_seed": "--shuffle-seed",
}


class ResumeError(ValueError):
    """The output cannot be started or continued (exists without ``--resume``, other settings, damaged)."""


@dataclass
class Progress:
    """Running counts of a regeneration, as of the last committed batch.

    ``regenerated`` conversations were written (``shortened`` of them cut before their last
    assistant turn, ``truncated`` of them with at least one reply cut at ``max_new_tokens``);
    ``cut`` counts conversations skipped by reason (:data:`~draftcache.regenerate.turns.CUT_REASONS`);
    ``skipped_records`` the records the loader refused (set on the finished line only).
    """

    next_id: int = 0
    output_bytes: int = 0
    regenerated: int = 0
    truncated: int = 0
    shortened: int = 0
    generated_tokens: int = 0
    cut: dict[str, int] = field(default_factory=dict)
    skipped_records: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    num_samples: int | None = None  # the --num-samples a finished run stopped at (None: the whole input)

    def covers(self, num_samples: int | None) -> bool:
        """Whether a finished run already holds what ``--num-samples num_samples`` asks for."""
        return self.finished and (self.num_samples is None or (num_samples is not None
                                                               and num_samples <= self.num_samples))

    def add(self, results: Sequence[Regenerated]) -> None:
        for r in results:
            self.next_id = max(self.next_id, r.id + 1)
            self.generated_tokens += r.generated_tokens
            if r.skipped:
                self.cut[r.cut] = self.cut.get(r.cut, 0) + 1
                continue
            self.regenerated += 1
            self.truncated += r.truncated_turns > 0
            self.shortened += r.cut is not None

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Progress":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RegenerationOutput:
    """``OUT.jsonl`` and its progress file. Building one reads and checks what exists (writes
    nothing); :meth:`start` creates the files, or cuts a resumed output back to its last commit,
    and locks them; :meth:`commit` appends one batch."""

    def __init__(self, path: str, settings: dict[str, Any], *, resume: bool) -> None:
        self.path = Path(os.path.expanduser(path)).absolute()
        self.progress_path = self.path.with_name(self.path.name + PROGRESS_SUFFIX)
        self.settings = settings
        self.progress = Progress()
        self._progress_bytes = 0  # size of the progress file up to its last complete line
        self._out = self._log = None
        exists = self.path.exists() or self.progress_path.exists()
        if exists and not resume:
            raise ResumeError(f"{self.path} (or its {PROGRESS_SUFFIX} file) already exists; pass --resume to continue "
                              "that run, or choose another --output")
        if resume and exists:
            self._read_progress()

    @property
    def resuming(self) -> bool:
        return self._progress_bytes > 0

    def _read_progress(self) -> None:
        if not self.progress_path.is_file():
            raise ResumeError(f"--resume: {self.path} has no progress file {self.progress_path.name}, so which "
                              "records are complete is unknown (it was not written by draftcache regenerate, or the "
                              "progress file was removed); write to another --output")
        raw = self.progress_path.read_bytes()
        # A line is committed only with its "\n" (fsynced after it): what follows the last "\n" is
        # torn by a kill, even when it happens to parse as JSON, and is cut like any torn line.
        lines = raw.split(b"\n")[:-1]
        good, end = [], 0
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    good.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ResumeError(f"--resume: {self.progress_path}:{i + 1} is not JSON; the progress file is "
                                      "damaged. Write to another --output") from None
            end += len(line) + 1
        self._progress_bytes = end
        if not good or good[0].get("format") != _FORMAT:
            raise ResumeError(f"--resume: {self.progress_path} is not a draftcache regenerate progress file")
        if good[0].get("version") != _VERSION:
            raise ResumeError(f"--resume: {self.progress_path} has version {good[0].get('version')}; this draftcache "
                              f"writes version {_VERSION}. Write to another --output")
        before = good[0].get("settings", {})
        diffs = [f"{k}: {before.get(k)!r} != {self.settings.get(k)!r}  [{SETTING_FLAGS.get(k, k)}]"
                 for k in sorted(set(before) | set(self.settings)) if before.get(k) != self.settings.get(k)]
        if diffs:
            raise ResumeError(f"--resume refused: {self.path} was written with different settings:\n  - "
                              + "\n  - ".join(diffs)
                              + "\nRerun with the settings it was made with, or write to another --output.")
        if len(good) > 1:
            self.progress = Progress.from_json(good[-1])
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.progress.output_bytes:
            raise ResumeError(f"--resume: {self.path} has {size} bytes but its progress file records "
                              f"{self.progress.output_bytes} committed; the output was cut or replaced. Write to "
                              "another --output")

    def start(self, header_extra: dict[str, Any]) -> None:
        """Create the files (a fresh run) or cut them back to the last commit (a resumed one); lock them."""
        if self.resuming:
            self._log = open(self.progress_path, "r+b")
            self._lock()
            self._log.truncate(self._progress_bytes)
            self._log.seek(self._progress_bytes)
            self._out = open(self.path, "r+b" if self.path.exists() else "w+b")
            self._out.truncate(self.progress.output_bytes)  # a torn line, or a batch that was never committed
            self._out.seek(self.progress.output_bytes)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.progress_path, "xb")
        self._lock()
        self._out = open(self.path, "xb")
        header = {"format": _FORMAT, "version": _VERSION, "settings": self.settings, **header_extra}
        self._append(self._log, [header])
        _fsync_dir(self.path.parent)

    def _lock(self) -> None:
        try:
            fcntl.flock(self._log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._log.close()
            raise ResumeError(f"another draftcache regenerate is writing {self.path}; wait for it or stop it") from None

    @staticmethod
    def _append(f, values: list[dict[str, Any]]) -> None:
        if values:
            f.write("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

    def commit(self, results: Sequence[Regenerated]) -> None:
        """Append a batch's regenerated records, then the progress line that commits them."""
        self._append(self._out, [{"id": r.id, "source": r.source, "messages": r.messages,
                                  "truncated_turns": r.truncated_turns} for r in results if not r.skipped])
        self.progress.add(results)
        self.progress.output_bytes = self._out.tell()
        self._append(self._log, [asdict(self.progress)])

    def finish(self, skipped_records: dict[str, int], num_samples: int | None) -> None:
        self.progress.skipped_records = dict(skipped_records)
        self.progress.finished = True
        self.progress.num_samples = num_samples
        self._append(self._log, [asdict(self.progress)])

    def close(self) -> None:
        for f in (self._out, self._log):
            if f is not None:
                f.close()
        self._out = self._log = None
