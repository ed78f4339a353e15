"""A ``torchrun`` worker for test_scale and test_fp8_final_hidden: the precompute CLI with rank 1
made to disagree.

Rank 1's hidden-rebuild tolerance is set below any measurement, so a rank that measured on its
own would choose ``probs`` where rank 0 chooses ``hidden`` (or, for ``--supervision hidden``, refuse
where rank 0 stores ``final_hidden`` in bf16). Every rank counts its target forwards (EAGLE-3 or DFlash)
into ``<COUNT_DIR>/forwards-rank<R>.json``. Usage: ``torchrun ... dist_encoding_job.py COUNT_DIR ARGS...``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import draftcache.precompute.pipeline as pipeline
from draftcache.precompute.cli import app
from draftcache.targets import HFDFlashTargetModel, HFEagle3TargetModel


def main() -> None:
    count_dir, args = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    if rank == 1:
        pipeline.REBUILD_PROB_TOLERANCE = -1.0
    calls = [0]

    def counted(cls):
        real = cls.forward_capture

        def counting(target, *a, **k):
            calls[0] += 1
            return real(target, *a, **k)

        cls.forward_capture = counting

    counted(HFEagle3TargetModel)
    counted(HFDFlashTargetModel)
    try:
        app(args, prog_name="precompute-eagle3")
    finally:
        (count_dir / f"forwards-rank{rank}.json").write_text(json.dumps(calls[0]))


if __name__ == "__main__":
    main()
