"""benchmarks/scale_training.py at its smallest size: the CLI in a subprocess (its result lines, not
its numbers) and ``measure_training_memory``'s rows as the scale report imports them."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale_training.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
TINY = dict(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, vocab=256, seq=48, block=4)


def test_cli_measures_the_unchunked_and_the_chunked_dflash_loss_side_by_side():
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    r = subprocess.run([sys.executable, str(SCRIPT), *flags, "--anchors", "8", "--target-anchors", "8",
                        "--eagle3-seq", "0"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    losses = [float(m) for m in re.findall(r"^dflash loss\+backward peak, (?:old|new), A=8 +[0-9.]+ GB +[^;]*, "
                                           r"fp32;.* loss ([0-9.]+)$", out, re.M)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4, out  # the same loss on both paths
    assert re.search(r"^dflash old/new peak ratio, A=8 +[0-9.]+ x +S=48 Bk=4 V=256 ", out, re.M), out


def test_measure_training_memory_fits_the_anchor_line_and_measures_eagle3():
    spec = importlib.util.spec_from_file_location("scale_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_training"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    rows = module.measure_training_memory(
        dflash=module.DFlashShape(**TINY, anchors=16), anchors=(2, 4), paths=("new",),
        eagle3=module.Eagle3Shape(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, vocab=256,
                                  draft_vocab=64, seq=16, ttt_steps=2))
    names = [r.name for r in rows]
    assert names == ["dflash loss+backward peak, new, A=2", "dflash loss+backward peak, new, A=4",
                     "dflash loss+backward peak, new, A=16 (fit)", "eagle3 TTT step peak, T=16"], names
    assert all(r.unit == "GB" for r in rows)
    assert rows[2].note.startswith("peak(A) = ") and "least squares over A=[2, 4]" in rows[2].note
