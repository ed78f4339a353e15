"""The on-disk cache format (``FORMAT_VERSION``): schema, writer, reader and torch datasets (see README.md).

Producers (precompute), consumers (trainer) and the CLI import the format only from here.
"""

from draftcache.cache_format.batching import collate_padded, collate_raw, pack_samples
from draftcache.cache_format.checksum import atomic_write_bytes, atomic_write_json, sha256_file
from draftcache.cache_format.dflash import expand_dflash_raw
from draftcache.cache_format.dataset import CacheDataset, CacheIterableDataset
from draftcache.cache_format.errors import (
    CacheCorruptError,
    CacheFormatError,
    CacheLockedError,
    FormatVersionError,
    ManifestError,
)
from draftcache.cache_format.inspection import VerifyReport, cache_stats, inspect_cache, show_sample, verify_cache
from draftcache.cache_format.loader import IO_DEPTH, WINDOW_BYTES, CacheBatchLoader, window_tokens
from draftcache.cache_format.lock import CacheLock
from draftcache.cache_format.manifest import Manifest, ShardEntry, new_manifest, read_manifest, validate_manifest
from draftcache.cache_format.reader import CacheReader, open_cache
from draftcache.cache_format.record import SampleRecord
from draftcache.cache_format.resume import (
    RESUME_KEY_FIELDS,
    committed_prefix,
    diff_manifest_config,
    remove_stale_temporaries,
    verify_shard,
)
from draftcache.cache_format.schema import FORMAT_VERSION, MANIFEST_FILE, load_manifest_schema, shard_filename
from draftcache.cache_format.shard_writer import ShardFileWriter
from draftcache.cache_format.sharding import SampleBytes, plan_shard_boundaries
from draftcache.cache_format.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "RESUME_KEY_FIELDS",
    "CacheBatchLoader",
    "IO_DEPTH",
    "WINDOW_BYTES",
    "CacheCorruptError",
    "CacheDataset",
    "CacheFormatError",
    "CacheIterableDataset",
    "CacheLock",
    "CacheLockedError",
    "CacheReader",
    "CacheWriter",
    "FormatVersionError",
    "Manifest",
    "ManifestError",
    "SampleBytes",
    "SampleRecord",
    "ShardFileWriter",
    "ShardEntry",
    "VerifyReport",
    "atomic_write_bytes",
    "atomic_write_json",
    "cache_stats",
    "collate_padded",
    "collate_raw",
    "committed_prefix",
    "diff_manifest_config",
    "inspect_cache",
    "load_manifest_schema",
    "expand_dflash_raw",
    "new_manifest",
    "open_cache",
    "pack_samples",
    "plan_shard_boundaries",
    "read_manifest",
    "remove_stale_temporaries",
    "sha256_file",
    "shard_filename",
    "show_sample",
    "validate_manifest",
    "verify_cache",
    "verify_shard",
    "window_tokens",
]
