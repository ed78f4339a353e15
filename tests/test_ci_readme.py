""".ci/run runs the README's set-up commands as the README states them: .ci/readme_setup.py reads them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "readme_setup.py"


def _run(readme: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(readme)], capture_output=True, text=True, timeout=60)


def test_the_readme_states_the_main_job_and_the_tests():
    proc = _run(REPO / "README.md")
    assert proc.returncode == 0, proc.stderr
    main_job, tests = proc.stdout.splitlines()
    assert main_job.startswith("pip install -e . && precompute-eagle3 ")
    assert "draftcache train " in main_job and "draftcache eval " in main_job
    assert tests.startswith('pip install -e ".[dev]" && python -m pytest')


def test_a_third_block_or_a_second_line_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Set up\n\n```bash\npip install -e .\n```\n\n```bash\na\nb\n```\n\n## Next\n",
                      encoding="utf-8")
    proc = _run(readme)
    assert proc.returncode == 1 and "exactly two ```bash blocks of one command line each" in proc.stderr
    readme.write_text("# x\n\n## Set up\n\n```bash\na\n```\n```bash\nb\n```\n```bash\nc\n```\n", encoding="utf-8")
    proc = _run(readme)
    assert proc.returncode == 1 and "in 3 blocks" in proc.stderr
