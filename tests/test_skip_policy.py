"""The suite's no-silent-skip rule (tests/conftest.py): a skip not on tests/skip_allowlist.txt fails
the run, and under DRAFTCACHE_ENGINE_TIER=1 every skip does. Run as a plugin on a scratch test file."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _suite_conftest():
    """tests/conftest.py by its path ("conftest" in sys.modules is whichever conftest pytest loaded last)."""
    spec = importlib.util.spec_from_file_location("draftcache_suite_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

SCRATCH = '''
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="a reason nobody listed")
def test_skipped():
    pass
'''


def _pytest(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_scratch.py").write_text(SCRATCH, encoding="utf-8")
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), *args, str(tmp_path / "test_scratch.py")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": path, **env},
                          capture_output=True, text=True, timeout=120)


def test_unlisted_skip_fails_the_run(tmp_path):
    proc = _pytest(tmp_path, DRAFTCACHE_ENGINE_TIER="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "1 skipped test(s) fail the run (not in tests/skip_allowlist.txt)" in proc.stdout
    assert "SKIPPED test_scratch.py::test_skipped" in proc.stdout


def test_unlisted_skip_fails_the_run_with_xdist_workers(tmp_path):
    """README's test command runs two pytest-xdist workers: the workers' skips must still count."""
    proc = _pytest(tmp_path, "-n", "2", DRAFTCACHE_ENGINE_TIER="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "SKIPPED test_scratch.py::test_skipped" in proc.stdout


def test_engine_tier_fails_on_every_skip(tmp_path):
    proc = _pytest(tmp_path, DRAFTCACHE_ENGINE_TIER="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DRAFTCACHE_ENGINE_TIER=1: no test may skip" in proc.stdout


def test_allowlist_names_existing_tests_with_reasons():
    allowed = _suite_conftest().read_allowlist()
    assert allowed
    for node, reason in allowed.items():
        path, _, name = node.partition("::")
        function = name.split("[")[0]
        tree = ast.parse((TESTS.parent / path).read_text(encoding="utf-8"))
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert function in names, f"{node}: no such test"
        assert len(reason) > 10, node
