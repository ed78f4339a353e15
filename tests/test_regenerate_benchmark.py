"""benchmarks/regenerate_throughput.py runs at its smallest size (embedded target, HF engine)."""

from __future__ import annotations

from pathlib import Path
from prewarmed import SUBPROCESS_ENV, run_python

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "regenerate_throughput.py"


def test_regenerate_throughput_smoke():
    r = run_python([str(SCRIPT), "--smoke"], env=SUBPROCESS_ENV,
                   timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("hf ")]
    assert len(rows) == 1
    _, prompts, tokens, seconds, tok_s = rows[0]
    assert int(prompts) == 4 and 0 < int(tokens) <= 4 * 8 and float(tok_s) > 0
