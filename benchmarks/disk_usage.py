"""Disk: bytes per real token of each supervision encoding, against the padded layout NeMo
AutoModel's ``precompute_eagle3`` writes, on the same data and target. Goals: ``auto`` <= 1/3 of
NeMo's bytes; with ``--dtype fp8`` (``--dtypes bf16,fp8``, the default) every encoding's shards
<= 0.52x its bf16 shards per token, and fp8 ``auto`` <= 0.10 of NeMo's bf16 layout at a draft
vocabulary of 8192.

Our bytes are measured: ``run_precompute`` writes a real cache per (draft vocabulary, encoding)
and the manifest's shard and side-file sizes are summed. To keep a CPU run short, the target's
forward outputs for each batch are computed once and replayed to the later runs (``ReplayTarget``);
the pipeline, encodings and writer run for real every time, and the outputs are the same tensors
a second forward would produce.

NeMo's bytes follow its layout (every sample padded to ``seq_length`` S; see
../shared/REFERENCE.md): per sample ``input_ids``, ``attention_mask``, ``loss_mask`` int64 [S],
``aux_hidden_states`` [S, 3H] and ``target_probs`` [S, Vd] in the storage dtype (b bytes),
``position_mask`` [S, 1] bool, so a shard of n samples holds

    data(n) = n * S * (3*8 + 3*H*b + 1 + Vd*b) bytes  (+ 8 + the JSON header)

The formula is checked by writing one such 2-sample shard with ``safetensors.torch.save_file``.
NeMo's ``target_embeddings.safetensors`` and our side files (embeddings; for ``hidden`` also the
lm_head, in the target's own dtype: fp32 on a CPU) are fixed costs, shown separately and as a
share of the shards of a ``--scale-samples`` dataset.

    python benchmarks/disk_usage.py                   # llama-3.2-1b dims, 32k vocab, ~2 min on CPU
    python benchmarks/disk_usage.py --vocab-size 128256 --draft-vocab-sizes 8192,32000
    python benchmarks/disk_usage.py --shape llama-3.1-8b --batch-size 1 --draft-vocab-sizes 8192 \
        --encodings topk,hidden,auto --no-embedded

Memory: the replay spills every batch's ``[B, S, V]`` logits to disk (8 chats at a 128k
vocabulary: 2.7 GB in fp32) and holds one batch's; the random-init target holds two ``[V, H]``
matrices (2.1 GB each at 8B width in fp32; ``--target-dtype bf16`` halves them, slow on a CPU
without bf16 instructions). ``--encodings`` skips encodings already measured. The peak RSS is
printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODEL_SHAPES, ChatLengths, build_llama, build_word_tokenizer, hwm_bytes, line, load_embedded, write_chats,
)

from draftcache.data import load_conversations  # noqa: E402
from draftcache.precompute import PrecomputeConfig, run_precompute, tokenize_conversations  # noqa: E402
from draftcache.targets import HFEagle3TargetModel  # noqa: E402
from draftcache.targets.capture import TargetForward  # noqa: E402

_STORAGE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class ReplayTarget:
    """An ``HFEagle3TargetModel`` whose ``forward_capture`` runs the real target once per distinct
    batch (always capturing the final hidden state) and returns the stored outputs afterwards.

    The ``[B, S, V]`` logits (2.7 GB in fp32 for 8 chats at a 128k vocabulary) are spilled to
    ``.npy`` files in ``spill_dir`` and read back per batch, so the process holds one batch's."""

    def __init__(self, target: HFEagle3TargetModel, spill_dir: Path):
        self._target = target
        self._spill_dir = spill_dir
        self._outputs: dict[str, tuple[Path, torch.Tensor, torch.Tensor]] = {}  # key -> (logits file, aux, final)
        self.forwards = 0

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def forward_capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                        capture_final_hidden: bool = False, **kwargs) -> TargetForward:
        if kwargs:
            raise ValueError(f"ReplayTarget replays plain padded batches only; got {sorted(kwargs)}")
        key = hashlib.sha256(input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes()
                             + str(tuple(input_ids.shape)).encode()).hexdigest()
        if key not in self._outputs:
            out = self._target.forward_capture(input_ids, attention_mask, capture_final_hidden=True)
            path = self._spill_dir / f"logits-{key}.npy"
            logits = out.logits.detach().cpu()
            if logits.dtype == torch.bfloat16:  # numpy has no bfloat16: store the bits
                np.save(path, logits.view(torch.int16).numpy())
            else:
                np.save(path, logits.numpy())
            self._outputs[key] = (path, out.aux_hidden_states, out.final_hidden)
            self.forwards += 1
            del out, logits
        path, aux, final = self._outputs[key]
        logits = torch.from_numpy(np.load(path))
        if logits.dtype == torch.int16:
            logits = logits.view(torch.bfloat16)
        return TargetForward(logits=logits, aux_hidden_states=aux, final_hidden=final if capture_final_hidden else None)


def nemo_shard_bytes(num_samples: int, seq_length: int, hidden: int, draft_vocab: int, dtype: str) -> int:
    """Data bytes of one NeMo shard of ``num_samples`` samples (header excluded; formula above)."""
    b = _STORAGE_BYTES[dtype]
    return num_samples * seq_length * (3 * 8 + 3 * hidden * b + 1 + draft_vocab * b)


def check_nemo_formula(tmp: Path, seq_length: int, hidden: int, draft_vocab: int, dtype: str) -> str:
    """Write one 2-sample shard in NeMo's layout with safetensors and compare its data bytes."""
    from safetensors.torch import save_file

    n, dt = 2, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tensors = {
        "input_ids": torch.zeros(n, seq_length, dtype=torch.int64),
        "attention_mask": torch.zeros(n, seq_length, dtype=torch.int64),
        "loss_mask": torch.zeros(n, seq_length, dtype=torch.int64),
        "aux_hidden_states": torch.zeros(n, seq_length, 3 * hidden, dtype=dt),
        "position_mask": torch.zeros(n, seq_length, 1, dtype=torch.bool),
        "target_probs": torch.zeros(n, seq_length, draft_vocab, dtype=dt),
    }
    path = tmp / "nemo-shard-000000.safetensors"
    save_file(tensors, str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    path.unlink()
    want = nemo_shard_bytes(n, seq_length, hidden, draft_vocab, dtype)
    got = size - 8 - header
    return line("NeMo layout check (2 samples)", file_bytes=size, data_bytes=got, formula=want, header=8 + header,
                match=got == want)


def measure(name: str, target, tokenizer, data_path: str, args, draft_vocab_sizes, tmp: Path) -> None:
    conversations = load_conversations(data_path, num_samples=args.num_samples)
    base = PrecomputeConfig(output_dir=str(tmp / "cache"), seq_length=args.seq_length, batch_size=args.batch_size,
                            shard_size=args.shard_size, dtype=args.dtype, progress=False,
                            aux_layer_ids=tuple(args.aux_layer_ids) if args.aux_layer_ids else None)
    samples = tokenize_conversations(base, tokenizer, conversations)
    tokens = sum(len(s.input_ids) for s in samples)
    supervised = sum(int(s.loss_mask.sum()) for s in samples)
    spill = tmp / "replay"
    spill.mkdir(exist_ok=True)
    replay = ReplayTarget(target, spill)
    hidden = target.hidden_size
    print(line(name, samples=len(samples), tokens=tokens, mean_tokens=tokens / len(samples),
               supervised_pct=100 * supervised / tokens, hidden=hidden, vocab=target.vocab_size,
               seq_length=args.seq_length, dtype=args.dtype))
    for vd in draft_vocab_sizes:
        size = vd or target.vocab_size
        nemo = nemo_shard_bytes(len(samples), args.seq_length, hidden, size, args.dtype)
        print(line(f"  NeMo padded layout, Vd={size}", bytes_per_token=nemo / tokens, shard_MB=nemo / 1e6,
                   per_sample_MB=nemo / len(samples) / 1e6))
        for encoding in args.encodings:
            first_shards = None  # the first dtype's shard bytes (bf16 by default), for the fp8 ratio
            for dtype in args.dtypes:
                out = tmp / f"cache-{size}-{encoding}-{dtype}"
                cfg = PrecomputeConfig(**{**base.as_dict(), "output_dir": str(out), "draft_vocab_size": vd,
                                          "supervision": encoding, "dtype": dtype,
                                          "target_probs_topk": args.topk if encoding == "topk" else 0,
                                          "aux_layer_ids": base.aux_layer_ids})
                summary = run_precompute(cfg, target=replay, tokenizer=tokenizer, conversations=conversations,
                                         samples=samples, model_id=name, log=lambda msg: None)
                manifest = json.loads((out / "manifest.json").read_text())
                shards = sum(e["bytes"] for e in manifest["shards"])
                side = sum(e["bytes"] for e in manifest["files"].values())
                label = f"auto -> {summary.encoding}" if encoding == "auto" else encoding
                if encoding == "topk":
                    label += f" k={args.topk}"
                if len(args.dtypes) > 1:
                    label += f" {dtype}"
                ratio = shards / nemo
                extra = {}
                if encoding == "auto" and dtype != "fp8":
                    extra = {"goal": "<=0.333", "met": ratio <= 1 / 3}
                if dtype == "fp8" and first_shards is not None:
                    extra["fp8_over_" + args.dtypes[0]] = shards / first_shards
                    extra["goal"] = "<=0.52"
                    extra["met"] = shards / first_shards <= 0.52
                    if encoding == "auto" and size == 8192:
                        extra.update(nemo_goal="<=0.10", nemo_met=ratio <= 0.10)
                first_shards = first_shards or shards
                at_scale = 100 * side / (args.scale_samples * shards / len(samples))
                print(line(f"  ours {label}, Vd={size}", bytes_per_token=shards / tokens, shard_MB=shards / 1e6,
                           ratio_to_nemo=ratio, nemo_over_ours=nemo / shards, side_files_MB=side / 1e6,
                           side_pct_at_scale=at_scale, **extra))
                shutil.rmtree(out)
    print(line("  target forwards run", batches=replay.forwards, peak_rss_GB=hwm_bytes() / 1e9))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--num-layers", type=int, default=3, help="decoder layers (bytes do not depend on it)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="target vocabulary (the shape's: 0)")
    parser.add_argument("--intermediate-size", type=int, default=1024,
                        help="MLP width (bytes do not depend on it; the shape's: 0)")
    parser.add_argument("--draft-vocab-sizes", default="8192,32000", help="comma-separated; 0 = full vocabulary")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--encodings", default="probs,topk,hidden,auto", help="comma-separated, in this order")
    parser.add_argument("--target-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="the random-init target's dtype (bf16 halves its weights and the replayed logits)")
    parser.add_argument("--num-samples", type=int, default=8, help="lengths are the distribution's quantiles, so "
                        "a few samples already have its mean length")
    parser.add_argument("--scale-samples", type=int, default=68_000,
                        help="dataset size for side_pct_at_scale: side files as a share of the shards (ShareGPT: 68k)")
    parser.add_argument("--seq-length", type=int, default=2048, help="NeMo's default")
    parser.add_argument("--median-tokens", type=float, default=512)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="NeMo's storage dtype, and ours unless --dtypes says otherwise")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated storage dtypes of our caches, the first the baseline of the fp8 ratio "
                             "(default: '<--dtype>,fp8')")
    parser.add_argument("--no-embedded", dest="embedded", action="store_false")
    parser.add_argument("--no-synthetic", dest="synthetic", action="store_false")
    parser.add_argument("--embedded-target", default=None)
    parser.add_argument("--embedded-data", default=None)
    args = parser.parse_args(argv)
    args.dtypes = (args.dtypes or f"{args.dtype},fp8").split(",")
    args.encodings = args.encodings.split(",")
    unknown = sorted(set(args.encodings) - {"probs", "topk", "hidden", "auto"})
    if unknown:
        parser.error(f"--encodings: unknown {unknown}; choose from probs, topk, hidden, auto")
    draft_vocab_sizes = [int(v) or None for v in args.draft_vocab_sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="draftcache-disk-") as tmp_name:
        tmp = Path(tmp_name)
        if args.synthetic:
            vocab = args.vocab_size or MODEL_SHAPES[args.shape]["vocab_size"]
            model = build_llama(args.shape, num_layers=args.num_layers, vocab_size=vocab,
                                intermediate_size=args.intermediate_size or None,
                                dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.target_dtype])
            layers = args.num_layers
            args.aux_layer_ids = None if layers >= 8 else [0, layers // 2, layers - 1]
            lengths = ChatLengths(args.median_tokens, args.sigma, max_tokens=args.seq_length)
            print(f"-- random-init {args.shape} dims ({layers} layers, vocab {vocab}, {args.target_dtype}), chats {lengths} "
                  f"(mean {lengths.mean():.0f}), truncated to {args.seq_length}")
            print(check_nemo_formula(tmp, args.seq_length, model.config.hidden_size,
                                     draft_vocab_sizes[0] or vocab, args.dtype))
            write_chats(tmp / "chats.jsonl", args.num_samples, vocab_size=vocab, lengths=lengths)
            measure(f"{args.shape} x{layers}", HFEagle3TargetModel(model, aux_layer_ids=args.aux_layer_ids),
                    build_word_tokenizer(vocab), str(tmp / "chats.jsonl"), args,
                    [v if v is None or v <= vocab else None for v in draft_vocab_sizes], tmp)
            del model
        if args.embedded:
            model, tokenizer, data = load_embedded(args.embedded_target, args.embedded_data)
            embedded = argparse.Namespace(**{**vars(args), "num_samples": None, "aux_layer_ids": None})
            print("-- embedded default target and all of its chats (short, templated conversations)")
            measure("embedded default", HFEagle3TargetModel(model), tokenizer, data, embedded, [None], tmp)


if __name__ == "__main__":
    main()
