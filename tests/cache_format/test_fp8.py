"""fp8 caches: float8_e4m3fn hidden states with a float32 scale per row (one per token and captured
layer), dequantized by the reader on the training device; ``verify`` checks the scales."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open

from draftcache.cache_format import CacheBatchLoader, open_cache, read_manifest, verify_cache
from draftcache.cache_format.errors import CacheCorruptError
from draftcache.cache_format.fp8 import dequantize_rows, quantize_rows

from .synth import HIDDEN, LAYER_IDS, write_cache


def reference_fp8(x: torch.Tensor, groups: int) -> torch.Tensor:
    """What a reader must hand back for float rows ``x [R, groups*W]`` stored as fp8, written with
    plain torch ops: per part, scale = max|x| / 448 (1/448 for an all-zero part), values rounded
    to e4m3 after dividing by it, multiplied back in float32."""
    rows, width = x.shape
    out = torch.empty(rows, width)
    w = width // groups
    for r in range(rows):
        for g in range(groups):
            part = x[r, g * w:(g + 1) * w].float()
            amax = float(part.abs().max())
            scale = torch.tensor((amax if amax > 0 else 1.0) / 448.0, dtype=torch.float32)
            out[r, g * w:(g + 1) * w] = (part / scale).to(torch.float8_e4m3fn).float() * scale
    return out


def test_quantize_rows_matches_the_reference_and_its_error_bound():
    x = torch.randn(7, 3 * 16) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(16)  # very different layer scales
    x[2, :16] = 0  # an all-zero part keeps a positive scale
    q, scale = quantize_rows(x, 3)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (7, 3)
    assert bool((scale > 0).all())
    back = dequantize_rows(q, scale, torch.float32)
    assert torch.equal(back, reference_fp8(x, 3))
    # e4m3 keeps 3 mantissa bits: each value within 1/16 of itself (relative) or of the part's smallest normal
    amax = x.view(7, 3, 16).abs().amax(-1, keepdim=True).expand(7, 3, 16).reshape(7, 48)
    assert bool(((back - x).abs() <= x.abs() / 16 + amax * 2.0**-9 + 1e-30).all())


@pytest.mark.parametrize("encoding", ["probs", "topk", "hidden"])
def test_fp8_cache_reads_back_the_dequantized_rows(tmp_path, encoding):
    cache = write_cache(tmp_path / "c", encoding=encoding, dtype="fp8", topk=4 if encoding == "topk" else None)
    reader = open_cache(cache.path)
    assert reader.dtype == torch.bfloat16
    raw = reader.get_raw(3)
    assert raw["aux_hidden_states"].dtype == torch.float8_e4m3fn  # the stored bytes, not dequantized on the host
    assert raw["aux_hidden_states_scale"].shape == (raw["input_ids"].numel(), len(LAYER_IDS))
    for i, sample in enumerate(cache.samples):
        want = reference_fp8(sample.aux, len(LAYER_IDS)).to(torch.bfloat16)
        assert torch.equal(reader[i]["aux_hidden_states"], want), i
    if encoding == "hidden":
        rows = cache.samples[3].final_hidden[cache.samples[3].loss_mask.bool()]
        assert torch.equal(dequantize_rows(raw["final_hidden"], raw["final_hidden_scale"], torch.float32),
                           reference_fp8(rows, 1))
    # the loader path (preadv into one buffer, expand on the device) gives the same rows
    plan = [[0, 3, 5], [9, 1]]
    for indices, raw_batch in zip(plan, CacheBatchLoader(cache.path, plan, pin_memory=False)):
        batch = reader.expand_batch(raw_batch)
        for row, i in enumerate(indices):
            n = cache.samples[i].input_ids.numel()
            want = reference_fp8(cache.samples[i].aux, len(LAYER_IDS)).to(torch.bfloat16)
            assert torch.equal(batch["aux_hidden_states"][row, :n], want)


def test_fp8_stores_one_byte_per_hidden_value_plus_a_scale_per_row(tmp_path):
    bf16 = write_cache(tmp_path / "bf16", encoding="hidden", dtype="bf16")
    fp8 = write_cache(tmp_path / "fp8", encoding="hidden", dtype="fp8")

    def tensor_bytes(cache):
        with safe_open(cache.path / "shard-000000.safetensors", "pt") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}, \
                {name: f.get_tensor(name).nbytes for name in f.keys()}

    shapes, small = tensor_bytes(fp8)
    _, big = tensor_bytes(bf16)
    tokens, rows = shapes["aux_hidden_states"][0], shapes["final_hidden"][0]
    layers = len(LAYER_IDS)
    assert small["aux_hidden_states"] == tokens * layers * HIDDEN == big["aux_hidden_states"] // 2
    assert small["aux_hidden_states_scale"] == tokens * layers * 4  # float32, one per token and layer
    assert small["final_hidden"] + small["final_hidden_scale"] == rows * (HIDDEN + 4)
    assert big["final_hidden"] == rows * HIDDEN * 2
    manifest = read_manifest(fp8.path)
    assert manifest["dtype"] == "fp8" and manifest["quantization"]["scale_dtype"] == "float32"


def _damage(path, entry, tensor: str, row: int, value: bytes) -> None:
    """Overwrite the first element of ``tensor``'s row ``row`` in a shard and re-record its sha256,
    so only the content checks can notice."""
    shard = path / entry["file"]
    data = bytearray(shard.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8:8 + header_len])[tensor]
    row_bytes = (info["data_offsets"][1] - info["data_offsets"][0]) // info["shape"][0]
    at = 8 + header_len + info["data_offsets"][0] + row * row_bytes
    data[at:at + len(value)] = value
    shard.write_bytes(bytes(data))
    manifest = json.loads((path / "manifest.json").read_text())
    for e in manifest["shards"]:
        if e["file"] == entry["file"]:
            e["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("value,problem", [(struct.pack("<f", 0.0), "scales <= 0"),
                                           (struct.pack("<f", float("inf")), "NaN or Inf")])
def test_verify_refuses_a_bad_fp8_scale(tmp_path, value, problem):
    cache = write_cache(tmp_path / "c", encoding="probs", dtype="fp8")
    assert verify_cache(cache.path).ok
    entry = read_manifest(cache.path)["shards"][1]
    _damage(cache.path, entry, "aux_hidden_states_scale", 2, value)
    report = verify_cache(cache.path)
    assert not report.ok and any(f"{entry['file']}: aux_hidden_states_scale" in p and problem in p
                                 for p in report.problems), report.problems


@pytest.mark.parametrize("dtype,tensor,value", [("bf16", "aux_hidden_states", b"\x80\x7f"),   # bf16 +inf
                                                ("fp8", "aux_hidden_states", b"\x7f"),        # e4m3 NaN
                                                ("bf16", "target_probs", b"\xc0\x7f")])       # bf16 NaN
def test_a_non_finite_batch_is_refused_naming_the_shard(tmp_path, dtype, tensor, value):
    cache = write_cache(tmp_path / "c", encoding="probs", dtype=dtype)
    entry = read_manifest(cache.path)["shards"][1]  # samples 4..7
    _damage(cache.path, entry, tensor, 0, value)
    reader = open_cache(cache.path)
    clean = [0, 1, 2]
    reader.check_finite(raw := reader.get_raw_batch(clean), reader.expand_batch(raw))  # other shards train
    raw = reader.get_raw_batch([0, 4, 5])
    with pytest.raises(CacheCorruptError, match=rf"{entry['file']}: sample 4 holds NaN or Inf in {tensor}"):
        reader.check_finite(raw, reader.expand_batch(raw))
