"""Precompute throughput with 1 and 2 processes (``torchrun --nproc_per_node=2``) in one run.

Each configuration is precomputed twice into fresh directories: once by ``python -m
draftcache.precompute`` and once by ``torchrun --standalone --nproc_per_node=N -m
draftcache.precompute`` with the same flags; the caches are checked to be identical (fp32 on the
CPU), and one line per run reports samples/s and tokens/s. Rates use the precompute's own wall
time (from the summary: settings check to completed manifest, model loading excluded) and, in
``e2e``, the whole command including interpreter start, imports, data loading and model loading.

On the CPU every rank gets ``--threads-per-rank`` intra-op threads (default 1), so N ranks use N
cores, as N GPUs would: the ratio shows how the work scales with processes. (Giving one process
several threads instead measures OpenMP, and on shared, busy cores spinning threads make that
number meaningless.) On GPUs (``--device cuda``) each rank takes ``cuda:<LOCAL_RANK>``.

Configurations: the embedded default target and chats, and with ``--big`` a random-init
Llama-shaped target (``MODEL_SHAPES["1024-32k"]``, ``--big-layers`` layers) over synthetic chats
with a word-level tokenizer (nothing is downloaded).

    python benchmarks/precompute_scaling.py                      # embedded default, 1 vs 2 ranks
    python benchmarks/precompute_scaling.py --big --nproc 2 4    # plus a bigger target
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ChatLengths, build_llama, build_word_tokenizer, line, write_chats  # noqa: E402

_SUMMARY = {
    "samples": re.compile(r"^samples\s+(\d+)", re.M),
    "tokens": re.compile(r"^tokens\s+(\d+)", re.M),
    "wall": re.compile(r"^wall time\s+([\d.]+) s", re.M),
}


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _run(nproc: int, per_rank: int, args: list[str]) -> dict:
    """One precompute command; its summary numbers and end-to-end seconds."""
    module = ["-m", "draftcache.precompute", *args]
    if nproc == 1:
        cmd = [sys.executable, *module]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]
    env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "MKL_NUM_THREADS": str(per_rank),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    e2e = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    found = {key: pattern.search(proc.stdout) for key, pattern in _SUMMARY.items()}
    missing = [key for key, m in found.items() if m is None]
    if missing:
        raise SystemExit(f"could not read {missing} from the summary:\n{proc.stdout}")
    samples, tokens, wall = int(found["samples"][1]), int(found["tokens"][1]), float(found["wall"][1])
    return {"samples": samples, "tokens": tokens, "wall": wall, "e2e": e2e, "threads_per_rank": per_rank}


def _big_target(root: Path, layers: int, num_samples: int, seq_length: int) -> tuple[str, str]:
    """A random-init 1024-wide, 32k-vocabulary Llama with its word tokenizer, and synthetic chats."""
    import torch

    torch.manual_seed(0)
    model_dir, data = root / "big_target", root / "big_chats.jsonl"
    model = build_llama("1024-32k", num_layers=layers)
    tokenizer = build_word_tokenizer(model.config.vocab_size)
    model.config.pad_token_id, model.config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_chats(data, num_samples, vocab_size=model.config.vocab_size,
                lengths=ChatLengths(median=seq_length // 2, max_tokens=seq_length))
    return str(model_dir), str(data)


def _aux_ids(layers: int) -> str:
    if layers < 3:
        raise SystemExit(f"--big-layers must be >= 3 (three distinct aux layers); got {layers}")
    return f"0,{layers // 2},{layers - 1}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="CPU intra-op threads of each rank")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--num-samples", type=int, default=600, help="embedded chats (600 is all of them)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--big", action="store_true", help="also a random-init 1024-wide 32k-vocabulary target")
    parser.add_argument("--big-layers", type=int, default=3)
    parser.add_argument("--big-samples", type=int, default=32)
    args = parser.parse_args()

    common = ["--device", args.device, "--seq-length", str(args.seq_length), "--shard-size", str(args.shard_size),
              "--batch-size", str(args.batch_size), "--quiet"]
    if args.device == "cpu":
        common += ["--dtype", "fp32"]  # exact on the CPU, so the 1- and N-process caches must be identical
    with tempfile.TemporaryDirectory(prefix="precompute-scaling-") as tmp:
        root = Path(tmp)
        configs = [("embedded", ["--num-samples", str(args.num_samples)])]
        if args.big:
            target, data = _big_target(root, args.big_layers, args.big_samples, args.seq_length)
            configs.append((f"1024-32k-L{args.big_layers}", ["--target-model", target, "--input-data", data,
                                                             "--draft-vocab-size", "8192",
                                                             "--aux-layer-ids", _aux_ids(args.big_layers)]))
        for name, extra in configs:
            results = {}
            for nproc in [1, *args.nproc]:
                out = root / f"{name}-{nproc}"
                r = results[nproc] = _run(nproc, args.threads_per_rank, ["--output-dir", str(out), *common, *extra])
                print(line(f"{name} nproc={nproc}", samples=r["samples"], tokens=r["tokens"],
                           threads_per_rank=r["threads_per_rank"], wall_s=r["wall"],
                           samples_per_s=r["samples"] / r["wall"], tokens_per_s=r["tokens"] / r["wall"],
                           e2e_s=r["e2e"], e2e_tokens_per_s=r["tokens"] / r["e2e"]), flush=True)
            reference = _digests(root / f"{name}-1")
            for nproc in args.nproc:
                same = _digests(root / f"{name}-{nproc}") == reference
                print(line(f"{name} {nproc} vs 1 process", throughput_ratio=results[1]["wall"] / results[nproc]["wall"],
                           e2e_ratio=results[1]["e2e"] / results[nproc]["e2e"],
                           identical_cache=same if args.device == "cpu" else "n/a (bf16 on GPU)"), flush=True)


if __name__ == "__main__":
    main()
