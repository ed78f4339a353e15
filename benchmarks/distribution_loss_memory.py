"""DSpark's distribution term at a real vocabulary: peak memory of one forward + backward of
``soft-CE(draft logits, softmax(target logits))`` over ``N`` counted block slots, the path it replaced
against the trainer's, measured side by side in one run.

* ``old``: the target's logits of the packed row first (a ``hidden`` cache: ``[T, V]`` rebuilt from the
  final hidden states with the cache's lm_head when the batch was read), then ``softmax`` of the
  ``N`` counted slots' rows, ``[N, V]`` fp32 at once, handed to the vocabulary-chunked soft CE (kept
  here as it was: the same library function, given those probabilities).
* ``new``: what ``dflash_loss`` runs: ``chunked_soft_cross_entropy`` with ``to_probs =
  target_distribution(...)``: each chunk of slots gathers its rows, projects them (``hidden``) and
  takes their softmax inside the chunk; nothing ``[N, V]`` or ``[T, V]`` is built.

``--teacher logits`` measures the online case instead: the target's ``[T, V]`` logits come with the
batch in both paths (set-up, not counted), and only the ``[N, V]`` gather + softmax differs.

The draft side is reduced to what the term reads: ``rows [1, N, H]`` (a leaf with gradients, standing
for the draft's slot states) scored by a frozen ``[V, H]`` lm_head, gradients flowing to the rows.
Each path runs in a fresh subprocess: on CPU the resident high-water mark of the pass above the
resident size before it (``VmHWM`` reset after set-up, ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
tensors leave the resident set); on CUDA ``max_memory_allocated()`` above ``memory_allocated()``
before the pass. Losses are checked equal.

    python benchmarks/distribution_loss_memory.py    # CPU: V 128256, N 4096 slots, T 2048, H = H_t = 256
    python benchmarks/distribution_loss_memory.py --device cuda --hidden 4096 --rows 8192 --seq 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PATHS = ("old", "new")
GB = 1e9


def run_child(args: argparse.Namespace) -> dict:
    """One path: build the inputs (set-up), then measure one forward + backward."""
    import torch

    from _common import PeakMemory
    from draftcache.trainer.dflash.loss import target_distribution
    from draftcache.trainer.vocab_loss import LOGITS_CHUNK_ELEMENTS, chunked_soft_cross_entropy

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    v, n, t, h, ht = args.vocab, args.rows, args.seq, args.hidden, args.target_hidden or args.hidden
    import torch._dynamo  # noqa: F401  (set-up: torch's checkpoint imports it on first use)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    draft_head = torch.nn.Linear(h, v, bias=False).requires_grad_(False).to(device)  # the draft's frozen lm_head
    target_head = torch.nn.Linear(ht, v).requires_grad_(False).to(device)  # the cache's lm_head side file
    final_hidden = torch.randn(1, t, ht, generator=gen).to(device)  # [1, T, H_t]
    # counted slots read target rows in order, overlapping blocks reading a row more than once (N may exceed T)
    slots = torch.sort(torch.randint(0, t, (n,), generator=gen)).values.to(device)  # [N]
    rows = torch.randn(1, n, h, generator=gen).to(device).requires_grad_(True)  # [1, N, H]
    chunk = args.chunk_elements or LOGITS_CHUNK_ELEMENTS
    target_logits = None
    if args.teacher == "logits":  # online: the target's logits come with the batch
        with torch.no_grad():
            target_logits = target_head(final_hidden)  # [1, T, V]

    batch = []  # the old hidden-cache batch held its [1, T, V] logits until the step ended

    def old() -> torch.Tensor:
        logits = target_logits if target_logits is not None else target_head(final_hidden)  # [1, T, V]
        batch.append(logits)
        probs = torch.softmax(logits[0, slots].float(), dim=-1)  # [N, V]
        return chunked_soft_cross_entropy(rows, draft_head, probs[None], vocab_size=v, chunk_elements=chunk)[0]

    def new() -> torch.Tensor:
        given = ({"target_logits": target_logits} if target_logits is not None else
                 {"target_final_hidden": final_hidden, "target_lm_head": target_head})
        return chunked_soft_cross_entropy(rows, draft_head, slots[None], vocab_size=v, chunk_elements=chunk,
                                          to_probs=target_distribution(**given))[0]

    with PeakMemory(device) as measured:
        loss = (old if args.child == "old" else new)().sum() / n
        loss.backward()
    peak, method = measured.bytes, measured.method + " above the set-up"
    setup = sum(x.numel() * x.element_size() for x in (draft_head.weight, target_head.weight, final_hidden, rows,
                                                        *(() if target_logits is None else (target_logits,))))
    return {"path": args.child, "peak_bytes": peak, "setup_bytes": setup, "loss": float(loss),
            "grad_norm": float(rows.grad.norm()), "method": method}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256, help="V (Llama 3: 128256)")
    ap.add_argument("--rows", type=int, default=4096, help="N counted block slots (NeMo: 512 anchors x 16 = 8192)")
    ap.add_argument("--seq", type=int, default=2048, help="T, tokens of the packed row the slots read")
    ap.add_argument("--hidden", type=int, default=256, help="H, the draft's width (Llama-3.1-8B: 4096)")
    ap.add_argument("--target-hidden", type=int, default=None, help="H_t (default: --hidden)")
    ap.add_argument("--teacher", choices=("final_hidden", "logits"), default="final_hidden",
                    help="final_hidden: a --supervision hidden cache; logits: online training")
    ap.add_argument("--chunk-elements", type=int, default=None, help="logits per chunk (default: the trainer's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    results = {}
    for path in PATHS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", path]
        for flag in ("vocab", "rows", "seq", "hidden", "target_hidden", "teacher", "chunk_elements", "device",
                     "threads"):
            if (value := getattr(args, flag)) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{path} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    old, new = results["old"], results["new"]
    print(f"distribution term, teacher {args.teacher}: N={args.rows} slots, T={args.seq}, V={args.vocab}, "
          f"H={args.hidden}, H_t={args.target_hidden or args.hidden}, device={args.device} ({old['method']}; "
          f"set-up {old['setup_bytes'] / GB:.3f} GB not counted)")
    for r in (old, new):
        print(f"{r['path']:4s} peak {r['peak_bytes']:14,d} B = {r['peak_bytes'] / GB:7.3f} GB   loss {r['loss']:.6f}   "
              f"grad norm {r['grad_norm']:.6e}")
    tolerance = 1e-2 if args.device.startswith("cuda") else 1e-5
    for key in ("loss", "grad_norm"):
        if abs(old[key] - new[key]) > tolerance * abs(old[key]):
            sys.exit(f"old and new {key} differ: {old[key]} vs {new[key]}")
    print(f"ratio old/new peak memory {old['peak_bytes'] / max(new['peak_bytes'], 1):.2f}x "
          f"(full [N, V] fp32 = {args.rows * args.vocab * 4 / GB:.3f} GB)")


if __name__ == "__main__":
    main()
