"""The docs site (mkdocs.yml): links resolve, every page is in the nav, the docstring
reference covers the public API, and ``mkdocs build --strict`` succeeds.

The build itself needs the ``docs`` extra (``pip install -e ".[docs]"``); .ci/run
installs it and runs this file, elsewhere that one test skips.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nnrt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [p for p in files if p.exists() and ".venv" not in p.parts]


def _links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline Markdown link outside code blocks and code spans."""
    out = []
    in_code = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        out.extend((n, m.group(1)) for m in LINK.finditer(line))
    return out


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link (README into docs/, docs into the repository) names a file
    or folder that exists; a Markdown target's #anchor names one of its headings."""
    bad = []
    for line, target in _links(path):
        if _is_external(target) or target.startswith("#"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve()
        if not dest.exists():
            bad.append(f"{path.relative_to(ROOT)}:{line}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {target} (no heading #{anchor})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
    # Python-Markdown's toc slugify: lowercase, drop punctuation, spaces to '-'
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"`", "", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_link_checker_catches_a_broken_link(tmp_path: Path) -> None:
    md = tmp_path / "page.md"
    md.write_text(
        "see [a](missing.md) and [b](https://example.org) and `[c](nope.md)`\n"
        "```text\n[d](nope.md)\n```\n[e](page.md#title) [f](page.md#nothing)\n# Title\n"
    )
    assert _links(md) == [(1, "missing.md"), (1, "https://example.org"), (5, "page.md#title"),
                          (5, "page.md#nothing")]  # fmt: skip
    assert _anchors(md) == {"title"}


def _mkdocs_config() -> str:
    return (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def test_every_page_is_in_the_nav() -> None:
    config = _mkdocs_config()
    nav = set(re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", config, re.M))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages <= nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav <= pages, f"nav entries without a page: {sorted(nav - pages)}"


def test_reference_page_covers_the_public_api() -> None:
    """docs/reference.md is generated from docstrings; it must name all of nnrt.__all__."""
    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    directives = set(re.findall(r"^:::\s+(\S+)\s*$", text, re.M))
    missing = sorted(f"nnrt.{name}" for name in nnrt.__all__ if f"nnrt.{name}" not in directives)
    assert not missing, f"add '::: <name>' lines to docs/reference.md for: {missing}"
    for target in directives:  # and every directive names something that exists
        module, _, attr = target.rpartition(".")
        try:
            if importlib.util.find_spec(target) is not None:
                continue
        except ModuleNotFoundError:  # the parent is a module, not a package: an attribute
            pass
        assert hasattr(__import__(module, fromlist=[attr]), attr), target


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason='mkdocs/mkdocstrings not installed (pip install -e ".[docs]")',
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in ("index.html", "api/index.html", "reference/index.html", "plugins/index.html"):
        assert (site / page).exists(), page
    # the reference page was rendered from the docstrings: an anchor per public name,
    # carrying that object's docstring text
    html = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for name in nnrt.__all__:
        assert f'id="nnrt.{name}"' in html, name
    first_line = (nnrt.Sequential.__doc__ or "").strip().splitlines()[0]
    assert first_line and first_line in html
    shutil.rmtree(site)
