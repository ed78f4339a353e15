"""Print the README's two set-up commands, one per line: the ```bash blocks under "## Set up".

``.ci/run`` runs exactly these, so CI cannot drift from what users are told to type. Exits 1,
naming the problem, unless the section holds exactly two blocks of one command line each.

    python3 .ci/readme_setup.py README.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## Set up"


def setup_commands(readme: str) -> list[str]:
    """The one-line commands of the ```bash blocks in the "## Set up" section, in order."""
    lines = readme.splitlines()
    try:
        start = lines.index(SECTION) + 1
    except ValueError:
        raise ValueError(f"README has no {SECTION!r} section") from None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "\n".join(lines[start:end])
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, flags=re.M | re.S)
    commands = [[line for line in block.splitlines() if line.strip()] for block in blocks]
    if len(commands) != 2 or any(len(c) != 1 for c in commands):
        raise ValueError(f"README's {SECTION!r} must hold exactly two ```bash blocks of one command line each "
                         f"(the main job, the tests); found {[len(c) for c in commands]} lines in {len(commands)} blocks")
    return [c[0].strip() for c in commands]


def main(argv: list[str]) -> int:
    try:
        commands = setup_commands(Path(argv[1] if len(argv) > 1 else "README.md").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(commands))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
