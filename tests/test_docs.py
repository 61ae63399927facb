"""Every ```python block in docs/*.md and README.md runs, so the docs cannot rot.

Convention (also stated in docs/index.md):

* a fenced block whose info string starts with ``python`` is executed; the
  blocks of one file run in order, in one namespace, in a fresh interpreter
  whose working directory is an empty temporary directory;
* README.md is different: each of its ``python`` blocks runs **on its own**, in
  a fresh interpreter (a reader copies one block, not the whole page);
* ``python requires=torch`` (comma-separated modules) runs only where those
  modules are installed;
* ``text``, ``bash``, ``console``, ``toml``, ``ini``, ``cython`` ... blocks
  are not executed;
* a ```cython block must appear verbatim in a file under docs/examples/
  (docs quote the tested example package rather than code that never builds).

A failing block fails the test with the file name and the block's line number
(tracebacks point at lines of the Markdown file).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the first code line
    code: str
    requires: tuple[str, ...] = ()  # ```python requires=torch: skipped without torch


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text, with their language and position."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        words = m["info"].strip().split() or [""]
        lang = words[0].lower()
        requires = tuple(
            mod for w in words[1:] if w.startswith("requires=") for mod in w[9:].split(",") if mod
        )
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
        ):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence opened on line {i + 1}")
        blocks.append(Block(lang, i + 2, "\n".join(body) + "\n", requires))
        i = j + 1
    return blocks


def is_executed(block: Block) -> bool:
    if block.lang not in ("python", "py", "python3"):
        return False
    # a block that needs an optional package (```python requires=torch) runs where it is installed
    return all(importlib.util.find_spec(mod) is not None for mod in block.requires)


# Runs in the child: exec every python block of one file in one namespace.
_RUNNER = textwrap.dedent(
    """
    import json, sys
    path, blocks = sys.argv[1], json.loads(sys.stdin.read())
    ns = {"__name__": "__main__"}
    for line, code in blocks:
        # pad so that tracebacks show the Markdown file's line numbers
        exec(compile("\\n" * (line - 1) + code, path, "exec"), ns)
    print(f"ran {len(blocks)} blocks of {path}")
    """
)


def run_markdown(
    path: Path, cwd: Path, timeout: float = 300, only: Block | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the executed blocks of ``path`` in order in one fresh interpreter, or
    just the block ``only``."""
    import json

    chosen = [only] if only is not None else extract_blocks(path.read_text())
    blocks = [(b.line, b.code) for b in chosen if is_executed(b)]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, str(path)],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _markdown_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    if (ROOT / "README.md").exists():
        files.append(ROOT / "README.md")
    return files


def _readme_blocks() -> list[Block]:
    readme = ROOT / "README.md"
    if not readme.exists():
        return []
    return [b for b in extract_blocks(readme.read_text()) if b.lang in ("python", "py", "python3")]


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path: Path, tmp_path: Path) -> None:
    result = run_markdown(path, tmp_path)
    assert result.returncode == 0, (
        f"a ```python block in {path.relative_to(ROOT)} failed:\n{result.stderr[-4000:]}"
    )


@pytest.mark.parametrize("block", _readme_blocks(), ids=lambda b: f"README.md:{b.line}")
def test_each_readme_block_runs_on_its_own(block: Block, tmp_path: Path) -> None:
    if not is_executed(block):
        pytest.skip(f"needs {', '.join(block.requires)}")
    result = run_markdown(ROOT / "README.md", tmp_path, only=block)
    assert result.returncode == 0, (
        f"the ```python block at README.md:{block.line} fails when run on its own "
        f"(copy-pasted into a fresh interpreter):\n{result.stderr[-4000:]}"
    )


def test_readme_has_executed_blocks() -> None:
    assert sum(is_executed(b) for b in _readme_blocks()) >= 4


def test_docs_have_executed_blocks() -> None:
    # guard against the extractor silently finding nothing
    for name in ("derivations.md", "plugins.md", "api.md"):
        blocks = extract_blocks((DOCS / name).read_text())
        assert sum(is_executed(b) for b in blocks) >= 2, name


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_cython_blocks_quote_the_example_package(path: Path) -> None:
    sources = [p.read_text() for p in (DOCS / "examples").rglob("*.py*")]
    for block in extract_blocks(path.read_text()):
        if block.lang in ("cython", "pyx"):
            code = block.code.strip()
            assert any(code in s for s in sources), (
                f"{path.name}:{block.line}: this ```cython block is not a verbatim excerpt "
                f"of a file under docs/examples/ (update the excerpt)"
            )


# ------------------------------------------------------- the runner can fail
def test_runner_reports_a_failing_block(tmp_path: Path) -> None:
    md = tmp_path / "broken.md"
    md.write_text(
        "# t\n\n```python\nx = 1\n```\n\ntext\n\n```text\nnot python at all\n```\n\n"
        "```python\nassert x == 2, 'x is not 2'\n```\n"
    )
    result = run_markdown(md, tmp_path)
    assert result.returncode != 0
    assert "x is not 2" in result.stderr
    assert "broken.md" in result.stderr and "line 14" in result.stderr


def test_runner_shares_one_namespace_and_skips_other_languages(tmp_path: Path) -> None:
    md = tmp_path / "ok.md"
    md.write_text(
        "```python\nvalue = 41\n```\n\n```bash\nexit 1\n```\n\n```console\n$ false\n```\n\n"
        "  ```python\n  value += 1\n  ```\n\n```python\nassert value == 42\nprint('done')\n```\n"
    )
    result = run_markdown(md, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ran 3 blocks" in result.stdout


def test_runner_runs_one_block_alone(tmp_path: Path) -> None:
    md = tmp_path / "alone.md"
    md.write_text("```python\nvalue = 41\n```\n\n```python\nvalue += 1\n```\n")
    first, second = extract_blocks(md.read_text())
    assert run_markdown(md, tmp_path, only=first).returncode == 0
    alone = run_markdown(md, tmp_path, only=second)
    assert alone.returncode != 0 and "NameError" in alone.stderr and "line 6" in alone.stderr


def test_extract_blocks_positions() -> None:
    blocks = extract_blocks("a\n```python title\nx = 1\ny = 2\n```\n```text\nz\n```\n")
    assert [(b.lang, b.line, b.code) for b in blocks] == [
        ("python", 3, "x = 1\ny = 2\n"),
        ("text", 7, "z\n"),
    ]
    with pytest.raises(ValueError, match="unclosed"):
        extract_blocks("```python\nx = 1\n")


# ------------------------------------------------ docs/examples/bias_before_bn.py
def _run_bias_script(tmp_path: Path, *args: str) -> dict[str, object]:
    import json

    result = subprocess.run(
        [sys.executable, str(DOCS / "examples" / "bias_before_bn.py"), "--json", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, MPLBACKEND="Agg"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_bias_before_bn_only_bias_updated(tmp_path: Path) -> None:
    data = _run_bias_script(tmp_path, "--steps", "12", "--no-plot")
    exact, naive = data["exact"], data["naive"]
    assert isinstance(exact, dict) and isinstance(naive, dict)
    # the exact gradient of a bias before BatchNorm is zero: it never moves
    assert max(exact["bias_grad"]) < 1e-12
    assert max(exact["drift"]) < 1e-12
    # the naive gradient is the same every step (the output does not change), so
    # the bias moves linearly and without bound while the loss stays put
    drift = naive["drift"]
    assert drift[1] > 1e-3
    for t in range(1, len(drift)):
        assert drift[t] == pytest.approx(t * drift[1], rel=1e-6)
    losses = naive["loss"]
    assert max(losses) - min(losses) < 1e-12
    assert max(abs(a - b) for a, b in zip(losses, exact["loss"], strict=True)) < 1e-12
    assert not (tmp_path / "bias_before_bn.png").exists()


def test_bias_before_bn_train_all_with_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    data = _run_bias_script(tmp_path, "--steps", "25", "--train-all", "--plot", str(out))
    exact, naive = data["exact"], data["naive"]
    assert isinstance(exact, dict) and isinstance(naive, dict)
    assert max(exact["drift"]) < 1e-12
    drift = naive["drift"]
    assert all(b > a for a, b in zip(drift[:-1], drift[1:], strict=True)), (
        drift
    )  # grows step after step
    # the losses of the two runs agree (the bias has no effect) and training works
    assert max(abs(a - b) for a, b in zip(naive["loss"], exact["loss"], strict=True)) < 1e-10
    assert exact["loss"][-1] < exact["loss"][0]
    assert data["plot"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
