"""The README and docs/ pages stay navigable: links resolve, the README stays short, CI runs its command.

Plain linked markdown (no site generator): GitHub and any editor render it, and this test is the
"strict" build — every relative link and image in README.md and docs/*.md must name an existing
file (and, with `#anchor`, a heading of that page), every docs page must be reachable from the
README, and every source path quoted in backticks (`evaluation/champion.py`) must still exist, so
a module rename that forgets the docs fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 260

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
_SOURCE_PATH = re.compile(r"^[\w.\-/]+/[\w.\-]+\.py$")


def _prose(text: str) -> str:
    """The markdown without fenced blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation out, spaces → '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page (GitHub numbers repeats: slug, slug-1, …)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for match in _HEADING.finditer(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = _slug(match.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link or image of `page` whose file or heading does not exist, with why."""
    problems: list[str] = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{page.name}: link {target!r}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.name}: link {target!r}: no heading #{anchor} in {dest.name}")
    return problems


def stale_source_paths(page: Path) -> list[str]:
    """Each `dir/module.py` quoted in a code span that is neither under the repo nor src/."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    spans = {m.group(2).strip() for m in _CODE_SPAN.finditer(text)}
    roots = (ROOT, ROOT / "src", ROOT / "src" / "mammoflow")
    return [
        f"{page.name}: `{span}` names no file (renamed? update the page)"
        for span in sorted(spans)
        if _SOURCE_PATH.match(span) and not any((r / span).is_file() for r in roots)
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_source_paths_exist(page: Path) -> None:
    assert stale_source_paths(page) == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {
        (README.parent / t.partition("#")[0]).resolve()
        for t in _LINK.findall(_prose(README.read_text(encoding="utf-8")))
    }
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert orphans == [], f"docs pages the README's Reference list does not link: {orphans}"


def test_readme_stays_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines (at most {MAX_README_LINES}): move reference text to docs/"
    )


def test_ci_runs_the_readmes_test_command() -> None:
    """.ci/run's `make` targets are the README's commands, in a code block, and real Makefile targets."""
    targets = re.findall(r"^\s*make\s+([\w-]+)", (ROOT / ".ci" / "run").read_text(), re.M)
    assert targets, ".ci/run calls no make target"
    blocks = "\n".join(m.group(0) for m in _FENCE.finditer(README.read_text(encoding="utf-8")))
    makefile = (ROOT / "Makefile").read_text()
    for target in targets:
        assert re.search(rf"^make {re.escape(target)}\b", blocks, re.M), (
            f".ci/run calls `make {target}`, which no README code block shows"
        )
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), (
            f"Makefile has no {target} target"
        )


def test_the_checks_see_a_broken_link_and_a_renamed_module(tmp_path: Path) -> None:
    """The checkers themselves: a missing file, a missing heading and a stale path are reported."""
    (tmp_path / "other.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](other.md#real-heading) [self](#title) [web](https://example.org)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) `src/mammoflow/stages.py`\n"
        "```\n[in code](nowhere.md)\n```\n- item\n\n  ```bash\n  [indented](nowhere.md)\n  ```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 2
    assert "missing.md" in problems[0] and "#nope" in problems[1]
    assert stale_source_paths(page) == [
        "page.md: `src/mammoflow/stages.py` names no file (renamed? update the page)"
    ]
