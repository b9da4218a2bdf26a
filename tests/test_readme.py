"""The README's ```bash and ```python blocks run, in order, as written.

The blocks run in a temporary folder whose ``../shared/data/cxr/images`` holds the first
`IMAGES` sample radiographs (linked), so the README's jobs on all of them run on a few; the
test skips, saying why, where ../shared/data/cxr is absent. ```python blocks run with this
interpreter; the shell commands are the README's own, with two substitutions:

- installing: ``python3 -m venv``, ``. .venv/bin/activate`` and ``pip install`` are left out,
  and the commands run in this interpreter's environment instead (its bin folder first on PATH,
  so ``primis`` and ``python`` are those of the environment the tests run in);
- the test command (``python -m pytest``) only collects the suite (``--collect-only``), in this
  checkout: running it would run this test again, and `.ci/run` runs it whole.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cxr_images

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 3
INSTALL = ("python3 -m venv ", ". .venv/bin/activate", "pip install ")
TEST_COMMAND = "python -m pytest"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of each ```bash and ```python block of README.md, in order."""
    return BLOCK.findall((ROOT / "README.md").read_text())


def shell_commands(block: str) -> list[str]:
    """A bash block's commands (split at ``&&``), installation steps left out."""
    joined = block.replace("\\\n", " ")
    commands = [c.strip() for line in joined.splitlines() for c in line.split(" && ")]
    return [c for c in commands if c and not c.startswith(INSTALL)]


def test_readme_blocks_split_into_the_commands_they_run():
    blocks = readme_blocks()
    assert blocks and all(language in ("bash", "python") for language, _ in blocks)
    first = shell_commands(blocks[0][1])
    assert first and all(c.startswith("primis ") for c in first)


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    images = cxr_images()[:IMAGES]
    sample = tmp_path / "shared" / "data" / "cxr" / "images"
    sample.mkdir(parents=True)
    for image in images:
        (sample / image.name).symlink_to(image)
    work = tmp_path / "work"
    work.mkdir()
    environment = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    output = ""
    blocks = readme_blocks()
    ambiguate_runs = sum(
        c.startswith("primis ambiguate ") for _, code in blocks for c in shell_commands(code)
    )
    for language, code in blocks:
        if language == "python":
            runs = [([sys.executable, "-c", code], work)]
        else:
            runs = [
                (["bash", "-c", f"{c} --collect-only -q"], ROOT)
                if c == TEST_COMMAND
                else (["bash", "-c", c], work)
                for c in shell_commands(code)
            ]
        for command, folder in runs:
            done = subprocess.run(
                command, cwd=folder, env=environment, capture_output=True, text=True
            )
            assert done.returncode == 0, f"{command[-1]} failed:\n{done.stdout}\n{done.stderr}"
            output += done.stdout + done.stderr
    # Every ambiguate shares every image: none skips the outputs of one before it.
    shared = re.findall(r"^ambiguate: [1-9][0-9]* done, 0 failed$", output, re.MULTILINE)
    assert len(shared) == ambiguate_runs, output
