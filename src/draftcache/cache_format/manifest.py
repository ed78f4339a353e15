"""``manifest.json``: building, validating, reading and (de)serialising the cache manifest.

The manifest is a JSON document (layout in ``README.md``, structure in
``schemas/cache_manifest.v2.schema.json``). ``Manifest`` wraps a validated copy of it with typed
accessors; ``validate_manifest`` checks both the JSON structure and the cross-field rules the
schema cannot express (shard ranges, counts, sizes), and reports every problem at once.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from draftcache import __version__
from draftcache.cache_format.checksum import dumps_json
from draftcache.cache_format.errors import FormatVersionError, ManifestError
from draftcache.cache_format.schema import (
    FORMAT_VERSION,
    KIND,
    KIND_ENCODINGS,
    KIND_SHIFT,
    LM_HEAD_ENCODINGS,
    MANIFEST_FILE,
    load_manifest_schema,
    shard_filename,
    side_filename,
)

# The fp8 layout (see fp8.py), recorded in fp8 manifests so a reader can see the scale layout
# without reading code. ``scales`` names the tensors stored as fp8 (schema.quantized_tensors); a
# cache whose final_hidden stays bf16 (its fp8 rebuild missed the tolerance) is ``fp8_quantization(why)``.
FP8_QUANTIZATION = {
    "values": "float8_e4m3fn",
    "scale_dtype": "float32",
    "scales": {"aux_hidden_states": "aux_hidden_states_scale [N, len(layer_ids)]: one per token and captured layer",
               "final_hidden": "final_hidden_scale [M, 1]: one per supervised position"},
    "dequantize": "x = values.float() * scale, per row of hidden_size values",
    "probs_dtype": "bf16",
}



def fp8_quantization(final_hidden_bf16_why: str | None = None) -> dict[str, Any]:
    """The ``quantization`` block of an fp8 manifest: ``FP8_QUANTIZATION`` (every hidden state fp8),
    or with ``final_hidden_bf16_why`` (why fp8 final hidden states would not do) ``final_hidden``
    dropped from ``scales`` and recorded as stored bf16: ``final_hidden_dtype`` / ``final_hidden_why``."""
    block = dict(FP8_QUANTIZATION, scales=dict(FP8_QUANTIZATION["scales"]))
    if final_hidden_bf16_why is not None:
        del block["scales"]["final_hidden"]
        block.update(final_hidden_dtype="bf16", final_hidden_why=final_hidden_bf16_why)
    return block


__all__ = ["FP8_QUANTIZATION", "fp8_quantization", "ShardEntry", "Manifest", "new_manifest", "validate_manifest", "read_manifest", "shard_entry_stats", "shard_stats"]


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard as recorded in ``manifest["shards"]`` (field order = JSON order)."""

    file: str
    index: int
    first_sample: int
    num_samples: int
    num_tokens: int
    num_supervised: int
    bytes: int
    sha256: str
    # planned global ids [first_sample, first_sample + num_samples + len(non_finite)) of the samples
    # the precompute dropped because the target produced NaN/Inf for them (absent when none)
    non_finite: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.non_finite:
            data["non_finite"] = list(self.non_finite)
        else:
            del data["non_finite"]
        return data

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> "ShardEntry":
        fields = {k: entry[k] for k in cls.__dataclass_fields__ if k != "non_finite"}
        return cls(**fields, non_finite=tuple(entry.get("non_finite", ())))


def new_manifest(
    *,
    target: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    layer_ids: Sequence[int],
    seq_length: int,
    dtype: str,
    encoding: str,
    topk: int | None,
    selected_token_ids: Iterable[int] | torch.Tensor,
    token_counts: Iterable[int] | torch.Tensor,
    dataset: Mapping[str, Any],
    num_samples: int,
    shard_size: int,
    max_shard_bytes: int | None = None,
    shard_boundaries: Sequence[int] | None = None,
    special_token_ids: Iterable[int] = (),
    rebuild_max_abs_prob_diff: float | None = None,
    kind: str = KIND,
    final_hidden_bf16_why: str | None = None,
) -> dict[str, Any]:
    """A validated manifest for a new cache (``complete: false``, no shards or side files yet).

    ``target``, ``tokenizer`` and ``dataset`` are the sections of the same name (see README.md;
    ``dataset["skipped"]`` defaults to ``{}``). ``capture``, ``supervision``, ``draft_vocab``,
    ``num_shards`` and the bookkeeping fields are derived here. ``shard_boundaries`` (see
    ``sharding.plan_shard_boundaries``) defaults to cuts every ``shard_size`` samples.
    ``final_hidden_bf16_why`` (fp8 only): keep final_hidden in bf16, for this reason (``fp8_quantization``).
    """
    ids = torch.as_tensor(selected_token_ids).tolist() if torch.is_tensor(selected_token_ids) else list(selected_token_ids)
    counts = torch.as_tensor(token_counts).tolist() if torch.is_tensor(token_counts) else list(token_counts)
    boundaries = [int(b) for b in shard_boundaries] if shard_boundaries is not None else _even_boundaries(
        num_samples, shard_size)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "draftcache", "version": __version__},
        "kind": kind,
        "complete": False,
        "target": dict(target),
        "tokenizer": dict(tokenizer),
        "capture": {
            "layer_ids": [int(i) for i in layer_ids],
            "convention": "decoder_layer_output",
            "hf_hidden_states_index": [int(i) + 1 for i in layer_ids],
            "shift": KIND_SHIFT.get(kind, "left_by_one"),
        },
        "seq_length": seq_length,
        "dtype": dtype,
        "supervision": {"encoding": encoding, "topk": topk, "rebuild_max_abs_prob_diff": rebuild_max_abs_prob_diff},
        "draft_vocab": {"size": len(ids), "selected_token_ids": [int(i) for i in ids],
                        "special_token_ids": [int(i) for i in special_token_ids]},
        "token_counts": [int(c) for c in counts],
        "dataset": {**dict(dataset), "skipped": dict(dataset.get("skipped", {}))},
        "num_samples": num_samples,
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "shard_boundaries": boundaries,
        "num_shards": len(boundaries) - 1,
        "files": {},
        "shards": [],
        "stats": {"num_tokens": 0, "num_supervised": 0, "non_finite": 0},
    }
    if dtype == "fp8":
        manifest["quantization"] = fp8_quantization(final_hidden_bf16_why)
    validate_manifest(manifest)
    return manifest


def _even_boundaries(num_samples: Any, shard_size: Any) -> list[int]:
    if isinstance(num_samples, int) and isinstance(shard_size, int) and shard_size > 0 and num_samples > 0:
        return [*range(0, num_samples, shard_size), num_samples]
    return [0, 0]  # invalid inputs: validate_manifest reports num_samples / shard_size themselves


def shard_entry_stats(shard: Mapping[str, Any]) -> dict[str, int]:
    """One shard entry's share of the manifest's ``stats`` (see :func:`shard_stats`)."""
    return {"num_tokens": int(shard["num_tokens"]), "num_supervised": int(shard["num_supervised"]),
            "non_finite": len(shard.get("non_finite", ()))}


def shard_stats(shards: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The manifest's ``stats``: ``num_tokens`` and ``num_supervised`` summed over ``shards``, and
    ``non_finite``: the samples dropped because the target produced NaN/Inf for them."""
    stats = {"num_tokens": 0, "num_supervised": 0, "non_finite": 0}
    for shard in shards:
        for key, value in shard_entry_stats(shard).items():
            stats[key] += value
    return stats


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Check ``manifest`` against the JSON schema and the cross-field rules.

    The schema is compiled once (``fastjsonschema``), so a call costs about as much as reading
    the manifest. Raises ``FormatVersionError`` for another ``format_version`` and ``ManifestError``
    listing every problem otherwise.
    """
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"a manifest must be a JSON object; got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"cache format_version {version!r} is not supported: this draftcache reads format_version "
            f"{FORMAT_VERSION}; use the draftcache version that wrote the cache, or precompute it again"
        )
    problems = _structure_problems(manifest)
    if not problems:
        problems = _rule_problems(manifest)
    if problems:
        raise ManifestError(f"invalid cache manifest ({len(problems)} problem(s)):", problems)


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and validate ``<cache_dir>/manifest.json``."""
    path = Path(cache_dir) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {cache_dir} is not a draftcache cache directory "
                                "(or its precompute never committed a manifest)") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); the file is damaged, precompute the cache again") from None
    validate_manifest(manifest)
    return manifest


class Manifest:
    """A validated manifest with typed accessors. ``data`` is the JSON dict (treat as read-only)."""

    def __init__(self, data: Mapping[str, Any]):
        validate_manifest(data)
        self.data: dict[str, Any] = copy.deepcopy(dict(data))

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(json.loads(text))

    def to_json(self) -> str:
        return dumps_json(self.data) + "\n"

    @classmethod
    def from_dir(cls, cache_dir: str | os.PathLike) -> "Manifest":
        return cls(read_manifest(cache_dir))

    @property
    def kind(self) -> str:
        """``eagle3`` | ``dflash``."""
        return self.data["kind"]

    @property
    def encoding(self) -> str:
        return self.data["supervision"]["encoding"]

    @property
    def topk(self) -> int | None:
        return self.data["supervision"]["topk"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def num_samples(self) -> int:
        return self.data["num_samples"]

    @property
    def shard_size(self) -> int:
        return self.data["shard_size"]

    @property
    def num_shards(self) -> int:
        return self.data["num_shards"]

    @property
    def seq_length(self) -> int:
        return self.data["seq_length"]

    @property
    def hidden_size(self) -> int:
        return self.data["target"]["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.data["target"]["vocab_size"]

    @property
    def engine(self) -> dict[str, str] | None:
        """``target.engine`` (``{"name", "version"}``): what ran the target; None in caches from before it was recorded."""
        engine = self.data["target"].get("engine")
        return dict(engine) if engine is not None else None

    @property
    def aux_dim(self) -> int:
        """``F = len(layer_ids) * hidden_size``: the width of ``aux_hidden_states``."""
        return len(self.data["capture"]["layer_ids"]) * self.hidden_size

    @property
    def selected_token_ids(self) -> list[int]:
        return self.data["draft_vocab"]["selected_token_ids"]

    @property
    def shards(self) -> list[ShardEntry]:
        return [ShardEntry.from_dict(s) for s in self.data["shards"]]

    @property
    def shard_boundaries(self) -> list[int]:
        """``[num_shards + 1]``: shard ``k`` holds global samples ``[b[k], b[k+1])``."""
        return self.data["shard_boundaries"]

    def shard_first_sample(self, index: int) -> int:
        return self.shard_boundaries[index]

    def shard_num_samples(self, index: int) -> int:
        """Samples in shard ``index`` (``shard_size`` or fewer)."""
        return self.shard_boundaries[index + 1] - self.shard_boundaries[index]


# Long lists of non-negative ints ([V] token counts, [Vd] ids): checked here in one pass, and
# shown to the schema validator as their first element only (every reader and DataLoader worker
# validates the manifest; a 128k-item list checked item by item is the bulk of the cost).
_INT_ARRAYS = (("token_counts",), ("draft_vocab", "selected_token_ids"))


class _SchemaValidators:
    """The manifest schema compiled once: the whole document (the fast path, one call for a valid
    manifest) and each top-level property on its own, so that an invalid manifest gets one
    problem per wrong section rather than only the first (``fastjsonschema`` stops at the first)."""

    def __init__(self) -> None:
        import fastjsonschema

        self.schema = _inline_refs(load_manifest_schema())
        # draft-07 keywords only (the schema uses no 2020-12 feature); nothing left to resolve remotely
        self.whole = fastjsonschema.compile({"$schema": "http://json-schema.org/draft-07/schema#", **self.schema},
                                            handlers={})
        self.parts = {key: fastjsonschema.compile(sub, handlers={}) for key, sub in self.schema["properties"].items()}

    def problems(self, instance: Mapping[str, Any]) -> list[str]:
        import fastjsonschema

        try:
            self.whole(instance)
            return []
        except fastjsonschema.JsonSchemaValueException:
            pass
        out = [f"$: required property {key!r} is missing" for key in self.schema.get("required", [])
               if key not in instance]
        if self.schema.get("additionalProperties") is False:
            out += [f"$: unexpected property {key!r}" for key in instance if key not in self.parts]
        for key, check in self.parts.items():
            if key in instance:
                try:
                    check(instance[key])
                except fastjsonschema.JsonSchemaValueException as exc:
                    name = exc.name or "data"  # fastjsonschema names the failing node data.x[0].y
                    where = f"$.{key}" + name[len("data"):]
                    out.append(f"{where}: {exc.message.removeprefix(name).strip()[:300]}")
        return out or ["$: does not match the manifest schema"]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every local ``{"$ref": "#/$defs/<name>"}`` replaced by its definition and
    ``$schema`` / ``$id`` / ``$defs`` dropped, so that each part compiles on its own."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                if not ref.startswith("#/$defs/") or ref[len("#/$defs/"):] not in defs:
                    raise ValueError(f"the manifest schema may only reference its own $defs; got {ref!r}")
                return walk(defs[ref[len("#/$defs/"):]])
            return {k: walk(v) for k, v in node.items() if k not in ("$schema", "$id", "$defs")}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_VALIDATORS: list[_SchemaValidators] = []  # compiled on first use, once per process


def _structure_problems(manifest: Mapping[str, Any]) -> list[str]:
    if not _VALIDATORS:
        _VALIDATORS.append(_SchemaValidators())
    instance, problems = _shorten_int_arrays(manifest)
    return problems + _VALIDATORS[0].problems(instance)


def _shorten_int_arrays(manifest: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    instance = dict(manifest)
    problems: list[str] = []
    for path in _INT_ARRAYS:
        parent = instance
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                break
            parent[key] = parent = dict(parent[key])
        else:
            values = parent.get(path[-1])
            if not isinstance(values, list):
                continue
            where = "$." + ".".join(path)
            bad = [i for i, v in enumerate(values) if type(v) is not int or v < 0]
            problems += [f"{where}[{i}]: {json.dumps(values[i])} is not a non-negative integer" for i in bad[:10]]
            if len(bad) > 10:
                problems.append(f"{where}: {len(bad) - 10} more entries are not non-negative integers")
            parent[path[-1]] = values[:1] if not bad else [0]  # problems already reported above
    return instance, problems


def _rule_problems(m: Mapping[str, Any]) -> list[str]:
    """Cross-field rules; assumes the structure is valid."""
    out: list[str] = []
    vocab_size = m["target"]["vocab_size"]
    num_samples, shard_size = m["num_samples"], m["shard_size"]
    bounds = m["shard_boundaries"]
    num_shards = len(bounds) - 1
    if m["num_shards"] != num_shards:
        out.append(f"num_shards is {m['num_shards']} but shard_boundaries describe {num_shards} shards")
    if bounds[0] != 0 or bounds[-1] != num_samples:
        out.append(f"shard_boundaries must run from 0 to num_samples {num_samples}; got {bounds[0]} .. {bounds[-1]}")
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if any(n < 1 or n > shard_size for n in sizes):
        out.append(f"shard_boundaries must be strictly increasing with at most shard_size {shard_size} samples per "
                   "shard")
    ids = m["draft_vocab"]["selected_token_ids"]
    if m["draft_vocab"]["size"] != len(ids):
        out.append(f"draft_vocab.size is {m['draft_vocab']['size']} but selected_token_ids has {len(ids)} ids")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        out.append("draft_vocab.selected_token_ids must be strictly ascending (sorted, no duplicates)")
    if ids and max(ids) >= vocab_size:
        out.append(f"draft_vocab.selected_token_ids has id {max(ids)} >= target.vocab_size {vocab_size}")
    if len(m["token_counts"]) != vocab_size:
        out.append(f"token_counts has {len(m['token_counts'])} entries but target.vocab_size is {vocab_size}")
    encoding, topk = m["supervision"]["encoding"], m["supervision"]["topk"]
    if encoding == "topk" and topk is None:
        out.append("supervision.topk must be an integer when supervision.encoding is 'topk'")
    if encoding != "topk" and topk is not None:
        out.append(f"supervision.topk must be null when supervision.encoding is {encoding!r}; got {topk}")
    if encoding == "topk" and topk is not None and topk > len(ids):
        out.append(f"supervision.topk {topk} exceeds the draft vocabulary size {len(ids)}")
    kind = m["kind"]
    if m["capture"]["shift"] != KIND_SHIFT[kind]:
        out.append(f"capture.shift must be {KIND_SHIFT[kind]!r} for a {kind!r} cache; got {m['capture']['shift']!r}")
    if encoding not in KIND_ENCODINGS[kind]:
        out.append(f"a {kind!r} cache cannot use supervision.encoding {encoding!r}: dflash caches store 'argmax' "
                   "or 'hidden' (argmax + the target's final hidden state), eagle3 caches 'probs', 'topk' or 'hidden'")
    layer_ids = m["capture"]["layer_ids"]
    if m["capture"]["hf_hidden_states_index"] != [i + 1 for i in layer_ids]:
        out.append(f"capture.hf_hidden_states_index {m['capture']['hf_hidden_states_index']} must be layer_ids + 1 "
                   f"= {[i + 1 for i in layer_ids]}")
    bad_layers = [i for i in layer_ids if i >= m["target"]["num_layers"]]
    if bad_layers:
        out.append(f"capture.layer_ids {bad_layers} are >= target.num_layers {m['target']['num_layers']}")
    for name, entry in m["files"].items():
        if entry["file"] != side_filename(name):
            out.append(f"files.{name}.file is {entry['file']!r}; expected {side_filename(name)!r}")
    previous = -1
    for pos, shard in enumerate(m["shards"]):
        where = f"shards[{pos}]"
        index = shard["index"]
        if index <= previous:
            out.append(f"{where}.index {index} is not greater than the previous entry's {previous}: keep shards sorted "
                       "by index, each once")
        previous = max(previous, index)
        if index >= num_shards:
            out.append(f"{where}.index {index} is beyond the planned num_shards {num_shards}")
            continue
        if shard["file"] != shard_filename(index):
            out.append(f"{where}.file is {shard['file']!r}; expected {shard_filename(index)!r}")
        if shard["first_sample"] != bounds[index]:
            out.append(f"{where}.first_sample is {shard['first_sample']}; expected shard_boundaries[{index}] = "
                       f"{bounds[index]}")
        expected = bounds[index + 1] - bounds[index]
        dropped = shard.get("non_finite", [])
        if shard["num_samples"] + len(dropped) != expected:
            out.append(f"{where}.num_samples is {shard['num_samples']} (+ {len(dropped)} non_finite); shard {index} "
                       f"must hold {expected} samples")
        if any(not bounds[index] <= i < bounds[index + 1] for i in dropped) or sorted(set(dropped)) != dropped:
            out.append(f"{where}.non_finite must list distinct ascending sample ids in [{bounds[index]}, "
                       f"{bounds[index + 1]})")
        if shard["num_supervised"] > shard["num_tokens"]:
            out.append(f"{where}.num_supervised {shard['num_supervised']} exceeds num_tokens {shard['num_tokens']}")
        if shard["num_tokens"] > shard["num_samples"] * m["seq_length"]:
            out.append(f"{where}.num_tokens {shard['num_tokens']} exceeds num_samples * seq_length")
    for key, total in shard_stats(m["shards"]).items():
        if m["stats"].get(key, 0) != total:  # non_finite: absent in caches written before it existed
            out.append(f"stats.{key} is {m['stats'][key]} but the shards sum to {total}")
    block = m.get("quantization", FP8_QUANTIZATION)
    why = block.get("final_hidden_why") if isinstance(block, dict) else None
    if (m["dtype"] == "fp8") != ("quantization" in m) or block != fp8_quantization(why if isinstance(why, str) else None):
        out.append(f"quantization must be {json.dumps(FP8_QUANTIZATION)} exactly when dtype is 'fp8' (absent "
                   "otherwise), or that without scales.final_hidden and with final_hidden_dtype 'bf16' and a string "
                   f"final_hidden_why; got dtype {m['dtype']!r} and quantization {json.dumps(m.get('quantization'))}")
    if m["complete"]:
        indices = [s["index"] for s in m["shards"]]
        if indices != list(range(num_shards)):
            out.append(f"complete is true but shards {sorted(set(range(num_shards)) - set(indices))[:10]} are missing")
        needed = ["target_embeddings"] + (["lm_head"] if encoding in LM_HEAD_ENCODINGS else [])
        for name in needed:
            if name not in m["files"]:
                out.append(f"complete is true but files.{name} is missing (the {encoding!r} encoding needs it)")
    return out
