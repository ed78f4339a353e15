"""Training memory at real widths: one DFlash loss + backward, the unchunked path it replaced against
the trainer's (attention in checkpointed anchor chunks, vocabulary-chunked loss), and one EAGLE-3 TTT
forward + backward, at Llama-3.1-8B's widths and a 128,256-token vocabulary.

Every measurement runs in a fresh subprocess (nothing inherited from another's allocator):

* CPU: resident high-water mark of the loss + backward above the resident size before it. The mark
  is reset after set-up (``/proc/self/clear_refs``) and read from ``/proc/self/status`` (``VmHWM``);
  the child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the resident set.
  torch's CPU allocator is invisible to tracemalloc; the kernel's count is what the job pays.
* CUDA: ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()`` before the pass, under
  bf16 autocast as the trainers run.

Parameters, the frozen embeddings / lm_head and the batch are set-up, not counted (printed apart).

Both paths grow linearly with the anchors ``A`` (the unchunked one through the context scores
``[B, h, A, Bk, S]`` per layer and the logits ``[N, V]``, ``N = A * (Bk - 1)``; the chunked one
through its ``[A * Bk, H]`` activations and its chunk buffers), so on a CPU the script measures at
a few small ``A`` with every other size real and fits ``peak(A) = a + b * A`` (least squares) to
each path, printing the fit and its value at the target ``A`` (512). At a measured ``A`` the chunk
budgets are scaled by ``A / 512``, so the loss splits into as many chunks as it does at 512 and
its chunk buffers scale with ``A`` like every other term (at 512 the budgets are the trainer's).
The line holds for the unchunked path (its large terms are all proportional to ``A``); it
underestimates the chunked one, whose small-``A`` peaks are dominated by fixed costs (measured at
hidden 1024: fit 0.75 GB at A=512, direct ``--paths new --anchors 512`` 1.91 GB), so measure the
chunked path directly at 512 where the time allows (``--paths new --anchors 512``: ~3 CPU-minutes
at hidden 1024). On a GPU ``--anchors 512`` measures both paths at the real size directly.

    python benchmarks/scale_training.py                      # CPU: A = 8, 16, 32 at real widths
    python benchmarks/scale_training.py --device cuda --anchors 512 --eagle3-seq 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

__all__ = ["DFlashShape", "Eagle3Shape", "Row", "measure_training_memory", "main"]

GB = 1e9


@dataclass(frozen=True)
class DFlashShape:
    """One DFlash micro-batch: a packed row of ``seq`` tokens, ``anchors`` blocks of ``block``."""

    hidden: int = 4096          # draft width = the target's (Llama-3.1-8B)
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256         # the target's vocabulary (the frozen lm_head the loss projects with)
    target_layers: int = 1      # target layers concatenated into fc's input (one per draft layer by default)
    layers: int = 1             # draft layers (NeMo's recipe: 5; attention terms scale with it)
    seq: int = 4096
    block: int = 16
    anchors: int = 512


@dataclass(frozen=True)
class Eagle3Shape:
    """One EAGLE-3 micro-batch of ``seq`` tokens, ``ttt_steps`` chained steps."""

    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256         # target vocabulary (frozen embeddings)
    draft_vocab: int = 32000    # the draft's lm_head rows
    seq: int = 2048
    ttt_steps: int = 7


@dataclass(frozen=True)
class Row:
    """One result line: ``name value unit  note``."""

    name: str
    value: float
    unit: str
    note: str

    def format(self) -> str:
        return f"{self.name:<52s} {self.value:>10.3f} {self.unit:<4s} {self.note}"


# --------------------------------------------------------------------------------------------- children


def _unchunked_dflash_loss(model, target_hidden, input_ids, target_argmax, loss_mask, anchors, valid):
    """The DFlash loss as the trainer computed it before chunking (plain torch): every anchor's
    ``[B, h, A, Bk, S]`` context scores at once and the full ``[N, V]`` fp32 logits."""
    import torch
    import torch.nn.functional as F

    from draftcache.trainer.dflash.loss import dflash_block_labels, dflash_position_weights
    from draftcache.trainer.dflash.model import build_dflash_blocks
    from draftcache.trainer.layers import apply_rotary

    c = model.config
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    blocks = build_dflash_blocks(input_ids, anchors, valid, block_size=c.block_size, mask_token_id=c.mask_token_id)
    context = model.context(target_hidden)
    dtype = model.fc.weight.dtype
    ctx_cos, ctx_sin = model.rotary.cos_sin(positions, dtype)
    cos, sin = model.rotary.cos_sin(blocks.position_ids.reshape(batch, -1), dtype)
    x = model.embed_tokens(blocks.input_ids.reshape(batch, -1)).to(dtype)
    for layer in model.layers:
        attn = layer.self_attn
        ck, cv = attn.context_kv(context, ctx_cos, ctx_sin)
        h_in = layer.input_layernorm(x)
        slots, h, d, g = h_in.shape[1], attn.num_heads, attn.head_dim, attn.num_heads // attn.num_kv_heads

        def heads(t, n):
            return t.view(batch, -1, n, d).transpose(1, 2)

        q = apply_rotary(attn.q_norm(heads(attn.q_proj(h_in), h)), cos, sin)
        k = apply_rotary(attn.k_norm(heads(attn.k_proj(h_in), attn.num_kv_heads)), cos, sin).repeat_interleave(g, 1)
        v = heads(attn.v_proj(h_in), attn.num_kv_heads).repeat_interleave(g, 1)
        ck, cv = ck.repeat_interleave(g, 1), cv.repeat_interleave(g, 1)
        qb, kb, vb = (t.reshape(batch, h, -1, c.block_size, d) for t in (q, k, v))
        scores = torch.einsum("bhakd,bhsd->bhaks", qb, ck) / math.sqrt(d)
        scores = scores.masked_fill(~blocks.context_mask[:, None, :, None, :], float("-inf"))
        own = torch.einsum("bhakd,bhajd->bhakj", qb, kb) / math.sqrt(d)
        probs = torch.cat([scores, own], -1).float().softmax(-1).to(q.dtype)
        out = torch.einsum("bhaks,bhsd->bhakd", probs[..., :seq], cv)
        out = out + torch.einsum("bhakj,bhajd->bhakd", probs[..., seq:], vb)
        hh = x + attn.o_proj(out.reshape(batch, h, slots, d).transpose(1, 2).reshape(batch, slots, -1))
        x = hh + layer.mlp(layer.post_attention_layernorm(hh))
    hidden = model.norm(x).view(batch, anchors.shape[1], c.block_size, -1)
    labels, label_mask = dflash_block_labels(target_argmax, loss_mask, anchors, valid, block_size=c.block_size)
    w = dflash_position_weights(c.block_size).to(hidden.device).expand_as(label_mask)[label_mask]
    logits = model.compute_logits(hidden[label_mask]).float()  # [N, V]
    ce = F.cross_entropy(logits, labels[label_mask], reduction="none")
    return (ce * w).sum() / w.sum()


def _child_dflash(shape: DFlashShape, path: str, device, chunk_scale: float):
    import torch

    from draftcache.trainer.dflash.config import DFlashDraftConfig
    from draftcache.trainer.dflash.loss import dflash_loss, sample_anchors
    from draftcache.trainer.dflash.model import ATTENTION_CHUNK_ELEMENTS, DFlashDraftModel
    from draftcache.trainer.vocab_loss import LOGITS_CHUNK_ELEMENTS

    config = DFlashDraftConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, vocab_size=shape.vocab,
        target_hidden_size=shape.hidden, num_target_layers=32, target_layer_ids=list(range(1, 1 + shape.target_layers)),
        block_size=shape.block, mask_token_id=shape.vocab - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = DFlashDraftModel(config)
    gen = torch.Generator().manual_seed(1)
    s = shape.seq
    ids = torch.randint(0, shape.vocab - 1, (1, s), generator=gen).to(device)
    argmax = torch.randint(0, shape.vocab, (1, s), generator=gen).to(device)
    loss_mask = torch.ones(1, s, dtype=torch.long, device=device)
    feats = torch.randn(1, s, shape.target_layers * shape.hidden, generator=gen).to(device)
    anchors, valid = sample_anchors(loss_mask, num_anchors=shape.anchors, generator=gen)

    def run():
        if path == "old":
            return _unchunked_dflash_loss(model, feats, ids, argmax, loss_mask, anchors, valid)
        return dflash_loss(model, target_hidden=feats, input_ids=ids, target_argmax=argmax, loss_mask=loss_mask,
                           anchor_positions=anchors, anchor_valid=valid,
                           attention_chunk_elements=max(1, int(ATTENTION_CHUNK_ELEMENTS * chunk_scale)),
                           logits_chunk_elements=max(1, int(LOGITS_CHUNK_ELEMENTS * chunk_scale))).loss

    return run


def _child_eagle3(shape: Eagle3Shape, device):
    import torch

    from draftcache.trainer.eagle3.model import Eagle3DraftConfig, Eagle3DraftModel
    from draftcache.trainer.eagle3.ttt import ttt_forward

    config = Eagle3DraftConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=131072, target_hidden_size=shape.hidden, target_vocab_size=shape.vocab,
        draft_vocab_size=shape.draft_vocab, aux_layer_ids=[1, 2, 3])
    torch.manual_seed(0)
    with torch.device(device):
        model = Eagle3DraftModel(config)
    gen = torch.Generator().manual_seed(1)
    t, vd = shape.seq, shape.draft_vocab
    probs = torch.rand(1, t, vd, generator=gen)
    probs /= probs.sum(-1, keepdim=True)
    batch = dict(input_ids=torch.randint(0, vd, (1, t), generator=gen), attention_mask=torch.ones(1, t, dtype=torch.long),
                 loss_mask=torch.ones(1, t, dtype=torch.long),
                 aux_hidden_states=torch.randn(1, t, 3 * shape.hidden, generator=gen), target_probs=probs)
    batch = {k: v.to(device) for k, v in batch.items()}
    del probs
    return lambda: ttt_forward(model, **batch, ttt_steps=shape.ttt_steps).loss


def run_child(kind: str, shape: dict, device_name: str, chunk_scale: float = 1.0) -> dict:
    """One measurement in this (fresh) process: set up, then one loss + backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from _common import PeakMemory, rss_bytes
    from draftcache.trainer.optim import training_autocast

    device = torch.device(device_name)
    # checkpoint's first use imports torch._dynamo (~0.2 GB of host memory, once per process): not the loss's
    warm = torch.zeros(1, requires_grad=True)
    checkpoint(torch.sin, warm, use_reentrant=False).sum().backward()
    before_setup = rss_bytes()
    if kind == "eagle3":
        run = _child_eagle3(Eagle3Shape(**shape), device)
    else:
        run = _child_dflash(DFlashShape(**shape), kind.removeprefix("dflash-"), device, chunk_scale)
    if device.type == "cuda":
        torch.cuda.synchronize()
        setup = torch.cuda.memory_allocated()
    else:
        setup = rss_bytes() - before_setup
    t0 = time.perf_counter()
    with PeakMemory(device) as measured:
        with training_autocast(device):
            loss = run()
        loss.backward()
    peak, method = measured.bytes, measured.method + (", bf16 autocast" if device.type == "cuda" else ", fp32")
    return {"peak_bytes": peak, "setup_bytes": setup, "seconds": time.perf_counter() - t0, "loss": float(loss),
            "method": method}


# ---------------------------------------------------------------------------------------------- parent


def _measure(kind: str, shape, device: str, chunk_scale: float = 1.0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-shape", json.dumps(asdict(shape)),
           "--device", device, "--chunk-scale", repr(chunk_scale)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b * x`` (``b = 0`` from one point)."""
    if len(xs) == 1:
        return ys[0], 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _describe(s: DFlashShape) -> str:
    return (f"S={s.seq} Bk={s.block} V={s.vocab} H={s.hidden} heads={s.heads}/{s.kv_heads} d={s.head_dim} "
            f"I={s.intermediate} layers={s.layers}")


def measure_training_memory(
    *,
    dflash: DFlashShape = DFlashShape(),
    anchors: tuple[int, ...] = (8, 16, 32),
    eagle3: Eagle3Shape | None = Eagle3Shape(seq=256),
    device: str = "cpu",
    paths: tuple[str, ...] = ("old", "new"),
    log=None,
) -> list[Row]:
    """Peak memory rows ``(name, value, unit, note)`` of one DFlash loss + backward per path at each
    anchor count in ``anchors`` (other sizes from ``dflash``), the fitted ``a + b * A`` per path and
    its value at ``dflash.anchors``, the old/new ratios, and one EAGLE-3 TTT step (``eagle3``; None
    skips it). Values in GB (1e9 bytes); each from a fresh subprocess."""
    rows: list[Row] = []
    peaks: dict[str, list[float]] = {p: [] for p in paths}
    target = dflash.anchors
    for a in anchors:
        shape = replace(dflash, anchors=a)
        for p in paths:
            # chunk budgets scaled by A / target: as many chunks as the run at the target A makes
            r = _measure(f"dflash-{p}", shape, device, a / target)
            peaks[p].append(r["peak_bytes"] / GB)
            rows.append(Row(f"dflash loss+backward peak, {p}, A={a}", r["peak_bytes"] / GB, "GB",
                            f"{r['method']}; {r['seconds']:.0f} s; set-up {r['setup_bytes'] / GB:.2f} GB; "
                            f"loss {r['loss']:.4f}"))
            if log:
                log(rows[-1].format())
        if set(paths) == {"old", "new"}:
            rows.append(Row(f"dflash old/new peak ratio, A={a}", peaks["old"][-1] / max(peaks["new"][-1], 1e-12),
                            "x", _describe(shape)))
            if log:
                log(rows[-1].format())
    if list(anchors) != [target]:
        at_target = {}
        for p in paths:
            a0, b0 = _fit(list(anchors), peaks[p])
            at_target[p] = a0 + b0 * target
            rows.append(Row(f"dflash loss+backward peak, {p}, A={target} (fit)", at_target[p], "GB",
                            f"peak(A) = {a0:.3f} + {b0 * 1000:.3f}e-3 * A GB, least squares over A={list(anchors)}; "
                            f"{_describe(dflash)}"))
        if set(paths) == {"old", "new"}:
            rows.append(Row(f"dflash old/new peak ratio, A={target} (fit)",
                            at_target["old"] / max(at_target["new"], 1e-12), "x",
                            "from the two fits"))
    if eagle3 is not None:
        r = _measure("eagle3", eagle3, device)
        rows.append(Row(f"eagle3 TTT step peak, T={eagle3.seq}", r["peak_bytes"] / GB, "GB",
                        f"{r['method']}; {r['seconds']:.0f} s; set-up {r['setup_bytes'] / GB:.2f} GB; "
                        f"K={eagle3.ttt_steps} V={eagle3.vocab} Vd={eagle3.draft_vocab} H={eagle3.hidden} "
                        f"heads={eagle3.heads}/{eagle3.kv_heads} I={eagle3.intermediate}"))
        if log:
            log(rows[-1].format())
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DFlashShape()
    for field, value in asdict(defaults).items():
        if field != "anchors":
            ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=value)
    ap.add_argument("--anchors", default="8,16,32", help="anchor counts measured (comma-separated)")
    ap.add_argument("--target-anchors", type=int, default=defaults.anchors, help="A the fit is evaluated at")
    ap.add_argument("--eagle3-seq", type=int, default=256, help="EAGLE-3 tokens per micro-batch (0 skips EAGLE-3)")
    ap.add_argument("--draft-vocab", type=int, default=Eagle3Shape.draft_vocab)
    ap.add_argument("--ttt-steps", type=int, default=Eagle3Shape.ttt_steps)
    ap.add_argument("--paths", default="old,new", help="DFlash paths: old (unchunked), new (the trainer's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-shape", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, json.loads(args.child_shape), args.device, args.chunk_scale)))
        return 0
    shape = DFlashShape(**{f: getattr(args, f) for f in asdict(defaults) if f != "anchors"},
                        anchors=args.target_anchors)
    eagle3 = None if args.eagle3_seq == 0 else Eagle3Shape(
        hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate=args.intermediate, vocab=args.vocab, draft_vocab=args.draft_vocab, seq=args.eagle3_seq,
        ttt_steps=args.ttt_steps)
    print(f"training memory on {args.device} ({_describe(shape)})")
    printed: list[str] = []

    def log(text: str) -> None:  # each measured row as soon as it is known
        printed.append(text)
        print(text, flush=True)

    rows = measure_training_memory(dflash=shape, anchors=tuple(int(a) for a in args.anchors.split(",")),
                                   eagle3=eagle3, device=args.device, paths=tuple(args.paths.split(",")), log=log)
    for row in rows:
        if row.format() not in printed:
            print(row.format())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
