"""``PrecomputeSummary``: what a precompute left in the cache and what this run did."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PrecomputeSummary"]


@dataclass
class PrecomputeSummary:
    """What a run left in the cache (totals over all committed shards) and what this run did."""

    output_dir: str
    encoding: str
    dtype: str
    draft_vocab_size: int
    num_samples: int                 # samples in the cache
    num_tokens: int                  # real tokens in the cache
    num_supervised: int              # supervised positions in the cache
    cache_bytes: int                 # shards + side files, as the manifest records them
    computed_samples: int            # samples this run computed (fewer than num_samples after --resume)
    computed_tokens: int
    resumed_from_sample: int         # 0 for a fresh run
    bytes_written: int               # bytes this run wrote
    wall_seconds: float
    padding_fraction: float          # share of this run's forward token slots spent on padding
    skipped: dict[str, int] = field(default_factory=dict)
    non_finite: int = 0              # samples left out: the target produced NaN/Inf for them
    dropped_turns: int = 0           # turns before the first user turn removed from the records read
    dropped_turn_records: int = 0    # records that lost such turns

    @classmethod
    def from_manifest(cls, manifest: dict, *, output_dir, encoding: str, dtype: str, draft_vocab_size: int,
                      computed_samples: int, computed_tokens: int, slots: int, resumed_from_sample: int,
                      bytes_written: int, wall_seconds: float, skipped: dict) -> "PrecomputeSummary":
        """Cache totals from the final manifest (and the dropped-turn counts of its ``dataset``
        section) plus what this run did (``slots``: forward token slots)."""
        files = list(manifest["shards"]) + list(manifest["files"].values())
        dropped = manifest["dataset"].get("dropped_leading_turns") or {}
        return cls(
            output_dir=str(output_dir), encoding=encoding, dtype=dtype, draft_vocab_size=draft_vocab_size,
            num_samples=sum(e["num_samples"] for e in manifest["shards"]), num_tokens=manifest["stats"]["num_tokens"],
            num_supervised=manifest["stats"]["num_supervised"], cache_bytes=sum(e["bytes"] for e in files),
            computed_samples=computed_samples, computed_tokens=computed_tokens,
            resumed_from_sample=resumed_from_sample, bytes_written=bytes_written, wall_seconds=wall_seconds,
            padding_fraction=0.0 if slots == 0 else 1.0 - computed_tokens / slots, skipped=skipped,
            non_finite=int(manifest["stats"].get("non_finite", 0)), dropped_turns=int(dropped.get("turns", 0)), dropped_turn_records=int(dropped.get("records", 0)),
        )

    @property
    def bytes_per_token(self) -> float:
        return self.cache_bytes / max(1, self.num_tokens)

    def format(self) -> str:
        skipped = sum(self.skipped.values())
        skipped_text = (f"{skipped} records: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
                        if skipped else "none")
        dropped_text = "none"
        if self.dropped_turns:
            turns, records = self.dropped_turns, self.dropped_turn_records
            dropped_text = (f"{turns} turn{'s' * (turns != 1)} before the first user turn, in "
                            f"{records} record{'s' * (records != 1)}")
        this_run = f"computed {self.computed_samples} now"
        if self.resumed_from_sample:
            this_run += f", resumed at sample {self.resumed_from_sample}"
        rate = self.computed_tokens / max(self.wall_seconds, 1e-9)
        return "\n".join([
            f"cache       {self.output_dir}",
            f"encoding    {self.encoding}, dtype {self.dtype}, draft vocab {self.draft_vocab_size}",
            f"samples     {self.num_samples} ({this_run})",
            f"tokens      {self.num_tokens} ({self.num_supervised} supervised)",
            f"skipped     {skipped_text}",
            f"non-finite  {self.non_finite} sample(s) left out (NaN/Inf in the target's output)",
            f"dropped     {dropped_text}",
            f"disk        {self.cache_bytes / 1e6:.2f} MB, {self.bytes_per_token:.1f} bytes/token "
            f"({self.bytes_written / 1e6:.2f} MB written now)",
            f"padding     {100 * self.padding_fraction:.1f}% of forward slots",
            f"wall time   {self.wall_seconds:.1f} s ({rate:.0f} tokens/s)",
        ])
