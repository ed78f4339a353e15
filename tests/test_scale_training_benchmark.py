"""benchmarks/scale_training.py at its smallest size: ``measure_training_memory``'s rows as the scale
report imports them (its CLI's result lines are checked by the ``gpu_check.sh --dry-run`` test,
whose training-memory step is that CLI at this size)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale_training.py"
TINY = dict(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, vocab=256, seq=48, block=4)


def test_measure_training_memory_fits_the_anchor_line():
    """The fit from two anchor counts, as the scale report imports it (``eagle3=None``: the EAGLE-3
    row comes from the same function in the gpu_check dry run's CLI step)."""
    spec = importlib.util.spec_from_file_location("scale_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_training"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    rows = module.measure_training_memory(
        dflash=module.DFlashShape(**TINY, anchors=16), anchors=(2, 4), paths=("new",), eagle3=None)
    names = [r.name for r in rows]
    assert names == ["dflash loss+backward peak, new, A=2", "dflash loss+backward peak, new, A=4",
                     "dflash loss+backward peak, new, A=16 (fit)"], names
    assert all(r.unit == "GB" for r in rows)
    assert rows[2].note.startswith("peak(A) = ") and "least squares over A=[2, 4]" in rows[2].note
