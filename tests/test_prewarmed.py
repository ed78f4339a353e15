"""``prewarmed.run_python`` returns what ``subprocess.run([sys.executable, ...], capture_output=True,
text=True)`` returns: each case runs both ways and the results must be equal (scripts that import
nothing heavy, so the fresh runs take milliseconds)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prewarmed import SUBPROCESS_ENV, run_python

CASES = {
    "exit code and both streams": "import sys\nprint('out', sys.argv[1:])\nprint('err', file=sys.stderr)\nsys.exit(3)\n",
    "uncaught exception": "def f():\n    raise ValueError('boom')\nf()\n",
    "exit with a message": "import sys\nsys.exit('bad input: say what to do')\n",
    "killed by a signal": "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "atexit and unflushed output": "import atexit, sys\natexit.register(lambda: print('atexit ran'))\n"
                                   "sys.stdout.write('no newline, no flush')\n",
    "cwd, argv and environment": "import os, sys\nprint(os.getcwd(), sys.argv, os.environ['OMP_NUM_THREADS'],\n"
                                 "      os.environ['PYTEST_CURRENT_TEST'].split('::')[-1])\n",
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_prewarmed_run_equals_a_fresh_interpreters(name, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(CASES[name])
    env = {**SUBPROCESS_ENV, "PYTEST_CURRENT_TEST": os.environ["PYTEST_CURRENT_TEST"]}  # run_python passes it on
    fresh = subprocess.run([sys.executable, str(script), "a", "b"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    warm = run_python([str(script), "a", "b"], cwd=tmp_path, timeout=60)

    def strip_runner_frames(stderr: str) -> str:  # the traceback's first frames are runpy's, not the script's
        return "\n".join(line for line in stderr.splitlines() if "<frozen runpy>" not in line
                         and 'File "<string>"' not in line and "runpy.run_path" not in line)

    assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout)
    assert strip_runner_frames(warm.stderr) == strip_runner_frames(fresh.stderr)


def test_a_module_runs_as_main_and_a_timeout_kills_it(tmp_path):
    r = run_python(["-m", "json.tool", "--compact"], cwd=tmp_path, timeout=60)  # stdin is /dev/null: no JSON
    fresh = subprocess.run([sys.executable, "-m", "json.tool", "--compact"], stdin=subprocess.DEVNULL,
                           env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr) != (0, "", "")
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(["-c", "import time; time.sleep(60)"], timeout=1)
