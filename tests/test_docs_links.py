"""Every relative link in README.md, ARCHITECTURE.md and docs/*.md resolves: the file or folder exists, and an
``#anchor`` names a heading of the target (GitHub's heading ids). Links inside code are not links; web links are
not followed (tests never use the network). The README stays short enough to read in five minutes (issue 18).
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 244  # "under 245" (issue 18: under about 250, the rest in docs/)

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def documents() -> list[Path]:
    return [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's id for a heading: link targets and emphasis reduced to their text, lower case, punctuation
    dropped (letters, digits, ``-``, ``_`` and spaces kept), spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def site_slug(heading: str) -> str:
    """The id that MkDocs (Python-Markdown's ``toc``, its default slugify) gives the same heading: accents and
    other non-ASCII characters dropped, and runs of spaces and ``-`` made one ``-`` (GitHub keeps ``---``)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


@cache
def site_anchors(path: Path) -> frozenset[str]:
    """The heading ids of a page of the MkDocs site (repeated headings get ``_1``, ``_2``, ...)."""
    seen: dict[str, int] = {}
    ids = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        ids.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if match:
            base = site_slug(match.group(2))
            ids.add(base if base not in seen else f"{base}_{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return frozenset(ids)


@cache
def anchors(path: Path) -> frozenset[str]:
    """The heading ids of a Markdown file (repeated headings get ``-1``, ``-2``, ... as on GitHub), and explicit
    ``<a name=...>`` anchors."""
    seen: dict[str, int] = {}
    ids = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        ids.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        ids.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return frozenset(ids)


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub("", line)  # `[x](y)` in code is not a link
        found += [(n, target) for target in _LINK.findall(line)]
        ref = _REFERENCE.match(line)
        if ref:
            found.append((n, ref.group(1)))
    return found


def broken(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: target: why`` for each relative link of ``path`` that does not resolve inside ``root``."""
    problems = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file or folder {dest}")
        elif not dest.is_relative_to(root):
            problems.append(f"{where}: points outside the repository")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{where}: no heading '#{anchor}' in {dest.relative_to(root)} (has: {sorted(anchors(dest))})")
        elif (anchor and dest.suffix == ".md" and path.parent == root / "docs" and dest.parent == root / "docs"
              and unquote(anchor) not in site_anchors(dest)):
            problems.append(f"{where}: '#{anchor}' is GitHub's id of the heading, not the site's (`make docs`, "
                            f"--strict), which differs for '---' and non-ASCII: link a heading whose ids agree")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert links(path) or path.name != "README.md", "the README links into docs/"
    problems = broken(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short_and_links_into_docs():
    readme = REPO / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES, (
        "the README is read in five minutes: move detail into docs/")
    targets = {(REPO / t.partition("#")[0]).resolve() for _, t in links(readme) if not re.match(r"^[a-z]+:", t)}
    assert (REPO / "ARCHITECTURE.md").resolve() in targets and any(t.parent == REPO / "docs" for t in targets)


def test_the_checker_finds_broken_links(tmp_path):
    doc = tmp_path / "a.md"  # as the README: read on GitHub, not a page of the site
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text(
        "# Coming from `torchmeta`\n## Many GPUs, and nodes (DDP)\n## Many GPUs, and nodes (DDP)\n")
    doc.write_text(
        "# Title\n[ok](docs/b.md#coming-from-torchmeta) [ok](docs/b.md#many-gpus-and-nodes-ddp-1) [ok](#title) "
        "[web](https://x.org/y)\n[gone](docs/c.md) [bad anchor](docs/b.md#nope) `[code](nowhere.md)`\n```\n"
        "[fenced](nowhere.md)\n```\n[ref]: missing.md\n"
    )
    problems = broken(doc, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["docs/c.md", "docs/b.md#nope", "missing.md"], problems


def test_the_checker_finds_anchors_that_only_github_has(tmp_path):
    """GitHub's id of "Adapt (`--adapt-steps N`)" keeps "---"; the site's collapses it, and `make docs --strict`
    fails on a link that GitHub follows (found by a review, 2026-12-05)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Adapt (`--adapt-steps N`)\n## Plain words\n")
    doc = tmp_path / "docs" / "a.md"
    doc.write_text("[site and GitHub](b.md#plain-words) [GitHub only](b.md#adapt---adapt-steps-n)\n")
    assert [p.split(": ")[1] for p in broken(doc, root=tmp_path)] == ["b.md#adapt---adapt-steps-n"]
    assert site_slug("Adapt (`--adapt-steps N`)") == "adapt-adapt-steps-n" and slug("Adapt (`--adapt-steps N`)") == "adapt---adapt-steps-n"
