"""Suite-wide rule: no silent skips.

Every skip is reported (``-rs`` in pyproject's addopts), and the run fails on a skipped test whose
node id is not in ``tests/skip_allowlist.txt`` (the tests that need hardware this machine may lack,
each with its reason). Under ``DRAFTCACHE_ENGINE_TIER=1`` (``scripts/engine_env.sh``) nothing may
skip: a skipped engine test there is a failure.

Skips are collected from the reports the session logs (``pytest_runtest_logreport``,
``pytest_collectreport``), which pytest-xdist replays on the controller, so the rule holds for
``pytest -n 2`` (README's test command) as for a single process.

One torch thread per process unless the caller says otherwise: the suite runs two workers on two
cores, and OpenMP threads that spin-wait beside another busy process made small forwards up to 10x
slower. Set here, before any test module imports torch; subprocesses inherit it.

CLI runs that need their own process but not a fresh interpreter go through
``prewarmed.run_python`` (``tests/prewarmed.py``): a child forked from an interpreter that has
already imported torch and transformers, with ``prewarmed.SUBPROCESS_ENV`` as its environment.

Under ``-n`` the workers split the suite in two contiguous halves and steal from each other's tail
(pytest-xdist's ``worksteal``) rather than take tests dealt round-robin (``load``): most of this
suite's time is module fixtures (a precompute, a 2-rank run, a regenerated reference), and a
module whose tests were dealt to both workers built its fixtures twice. (``loadscope`` keeps
modules whole too, but deals them largest test count first, so the slow few-test modules start
last; on this suite it measured the same as ``worksteal``, 756 s against 764 s.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

ALLOWLIST = Path(__file__).with_name("skip_allowlist.txt")


def read_allowlist(path: Path = ALLOWLIST) -> dict[str, str]:
    """``{node id: reason}`` from lines ``NODE_ID | reason`` (``#`` comments and blank lines ignored)."""
    allowed = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        node, sep, reason = (part.strip() for part in line.partition("|"))
        if not sep or not node or not reason:
            raise pytest.UsageError(f"{path}:{number}: expected 'NODE_ID | reason', got {line!r}")
        allowed[node] = reason
    return allowed


def _engine_tier() -> bool:
    return os.environ.get("DRAFTCACHE_ENGINE_TIER") == "1"


_SKIPPED: list[str] = []  # node ids skipped in this session
_ENGINE_DESELECTED: list[int] = [0]  # engine tests deselected by a pytest-xdist worker (each collects all)


def pytest_configure(config):
    _SKIPPED.clear()
    _ENGINE_DESELECTED[0] = 0
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "load":
        config.option.dist = "worksteal"  # -n without --dist: a module's tests (and fixtures) stay together


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import (pytest.skip(allow_module_level=True))
        _SKIPPED.append(report.nodeid)


def _unexpected_skips() -> list[str]:
    allowed = {} if _engine_tier() else read_allowlist()
    return sorted({node for node in _SKIPPED if node not in allowed})


def pytest_sessionfinish(session, exitstatus):
    workeroutput = getattr(session.config, "workeroutput", None)  # set on a pytest-xdist worker
    if workeroutput is not None:
        workeroutput["engine_deselected"] = getattr(session.config, "_draftcache_engine_deselected", 0)
    if _unexpected_skips() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist, on the controller: a worker's count of deselected engine tests."""
    _ENGINE_DESELECTED[0] = max(_ENGINE_DESELECTED[0], getattr(node, "workeroutput", {}).get("engine_deselected", 0))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_draftcache_engine_deselected", 0) or _ENGINE_DESELECTED[0]
    if count:  # tests/engine/conftest.py deselects them where vLLM is not importable
        terminalreporter.write_line(f"engine tier: {count} tests deselected (vLLM is not importable here); "
                                    "scripts/engine_env.sh runs them in their own venv")
    unexpected = _unexpected_skips()
    if unexpected:
        where = ("DRAFTCACHE_ENGINE_TIER=1: no test may skip" if _engine_tier()
                 else f"not in {ALLOWLIST.relative_to(ALLOWLIST.parents[1])}")
        terminalreporter.write_sep("=", f"{len(unexpected)} skipped test(s) fail the run ({where})", red=True)
        for node in unexpected:
            terminalreporter.write_line(f"SKIPPED {node}")
