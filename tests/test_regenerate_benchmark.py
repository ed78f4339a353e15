"""benchmarks/regenerate_throughput.py runs at its smallest size (embedded target, HF engine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "regenerate_throughput.py"


def test_regenerate_throughput_smoke():
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("hf ")]
    assert len(rows) == 1
    _, prompts, tokens, seconds, tok_s = rows[0]
    assert int(prompts) == 4 and 0 < int(tokens) <= 4 * 8 and float(tok_s) > 0
