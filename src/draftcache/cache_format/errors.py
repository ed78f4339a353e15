"""Exceptions raised by the cache format, one class per kind of problem."""

from __future__ import annotations

__all__ = ["CacheFormatError", "ManifestError", "FormatVersionError", "CacheCorruptError", "CacheLockedError"]


class CacheFormatError(Exception):
    """Base class of every error raised by ``draftcache.cache_format``."""


class ManifestError(CacheFormatError, ValueError):
    """A manifest is malformed. ``problems`` lists every problem found, one string each."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class FormatVersionError(ManifestError):
    """The manifest or shard was written with a format version this reader does not understand."""


class CacheCorruptError(CacheFormatError):
    """A committed file is missing, truncated or does not match the checksum the manifest records."""


class CacheLockedError(CacheFormatError):
    """Another live process holds the cache directory's ``.lock``."""
