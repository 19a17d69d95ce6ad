"""The documentation's Python blocks: every block marked runnable runs, every other one at least compiles.

A block is runnable when the line right before its opening fence is the marker ``<!-- runnable -->``:

    <!-- runnable -->
    ```python
    ...
    ```

Each runnable block runs as a script in a fresh subprocess (this interpreter, an empty temporary directory as the
working directory, offline Hugging Face settings, a timeout), so it must be complete: imports, data, asserts. Its
file is padded with blank lines so that a traceback's line numbers are the Markdown file's own. Unmarked ```python
blocks are fragments (a GPU, a real checkpoint, names defined elsewhere); they are compiled with ``compile()`` so
that they cannot rot syntactically.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

MARKER = "<!-- runnable -->"
TIMEOUT_S = 120


def _repo_root() -> pathlib.Path:
    for folder in pathlib.Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file() and (folder / "README.md").is_file():
            return folder
    raise RuntimeError("test_docs: no repository root (pyproject.toml + README.md) above this file")


ROOT = _repo_root()


def _doc_files() -> list[pathlib.Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md",
             *sorted((ROOT / "tools" / "cuda_emu").glob("*.md"))]
    return [path for path in files if path.is_file()]


@dataclasses.dataclass(frozen=True)
class Block:
    path: pathlib.Path
    line: int  # 1-based line of the first code line (the one after the opening fence)
    language: str
    source: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def padded(self) -> str:
        """The source preceded by blank lines, so that its line numbers are the Markdown file's."""
        return "\n" * (self.line - 1) + self.source


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def parse_blocks(path: pathlib.Path) -> list[Block]:
    """Every fenced block of a Markdown file; a marker not followed by a ```python fence is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            if lines[index].strip() == MARKER and not (index + 1 < len(lines)
                                                       and re.match(r"^\s*```\s*python\b", lines[index + 1])):
                raise ValueError(f"{path.relative_to(ROOT)}:{index + 1}: {MARKER} must be followed by a ```python "
                                 f"fence on the next line")
            index += 1
            continue
        indent, fence, language = match.groups()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path.relative_to(ROOT)}:{index + 1}: unclosed code fence")
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[index + 1:end]]
        runnable = index > 0 and lines[index - 1].strip() == MARKER
        blocks.append(Block(path, index + 2, language.lower(), "\n".join(body) + "\n", runnable))
        index = end + 1
    return blocks


BLOCKS = [block for path in _doc_files() for block in parse_blocks(path) if block.language in ("python", "py")]
RUNNABLE = [block for block in BLOCKS if block.runnable]


def test_docs_have_runnable_blocks():
    """The quick start and the ops example are marked runnable (a lost marker would silently stop testing them)."""
    marked = {block.path.relative_to(ROOT).as_posix() for block in RUNNABLE}
    assert {"README.md", "docs/ops.md"} <= marked, f"runnable blocks found only in {sorted(marked)}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_python_block_compiles(block: Block):
    try:
        compile(block.padded(), str(block.path.relative_to(ROOT)), "exec")
    except SyntaxError as exc:
        pytest.fail(f"{block.path.relative_to(ROOT)}:{exc.lineno}: the Python block at {block.where} does not "
                    f"compile: {exc.msg}")


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_runnable_block_runs(block: Block, tmp_path: pathlib.Path):
    script = tmp_path / (block.path.name + ".py")  # tracebacks read "README.md.py", line <Markdown line>
    script.write_text(block.padded(), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    try:
        result = subprocess.run([sys.executable, str(script)], cwd=run_dir, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the runnable block took more than {TIMEOUT_S} s")
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        pytest.fail(f"{block.where}: the runnable block failed (exit status {result.returncode}); line numbers in "
                    f"the traceback are {block.path.relative_to(ROOT)}'s:\n{output}")
