"""The README's main job on a base install (``pip install -e .``, no extras): nothing needs ``accelerate``.

``accelerate`` comes only with the ``devices`` (and ``dev``) extra. Each command runs in a subprocess
where it is made unimportable (``sys.modules["accelerate"] = None`` in a ``sitecustomize``: ``import``
raises and ``importlib.util.find_spec`` answers ``None``, as when it is not installed), on a small
slice of the embedded default: precompute, train, eval, each through the real CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCKER = 'import sys\nsys.modules["accelerate"] = None  # as if not installed\n'


def _env(blocker_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in [str(blocker_dir), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=300)


def test_main_job_runs_without_accelerate(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = _env(tmp_path / "site")
    check = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('accelerate'))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "None", check.stdout + check.stderr  # the blocker is in force

    cache, run = tmp_path / "cache", tmp_path / "draft"
    r = _run(env, "draftcache.precompute", "--output-dir", str(cache), "--num-samples", "8", "--seq-length", "128",
             "--quiet")
    assert r.returncode == 0, r.stderr
    r = _run(env, "draftcache.cli", "train", "--cached-target-path", str(cache), "--output-dir", str(run),
             "--max-steps", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    r = _run(env, "draftcache.cli", "eval", "--draft", str(run / "export"), "--num-prompts", "2",
             "--max-new-tokens", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lossless" in r.stdout


def test_device_map_without_accelerate_names_the_extra(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    r = _run(_env(tmp_path / "site"), "draftcache.precompute", "--output-dir", str(tmp_path / "cache"),
             "--device-map", "auto", "--quiet")
    assert r.returncode == 2, r.stderr
    assert "pip install 'draftcache[devices]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists()
