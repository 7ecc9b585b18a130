"""MkDocs hook (mkdocs.yml ``hooks``): links from docs/ to repository files outside it.

The pages link to ``../README.md`` and other files of the repository, which work where the repository is
browsed but are not part of the site. For the site, such a link becomes its text and the file's path in the
repository (``From the README (`README.md`)``). Only links to files that exist are rewritten: a link to a
missing file, inside docs/ or outside it, is left for MkDocs to report (``make docs`` builds with --strict).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")


def _rewrite(text: str, page_dir: Path, docs: Path, repo: Path) -> str:
    def outside(m: re.Match[str]) -> str:
        label, target = m.group(1), m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):  # a URL, an anchor on the page, an absolute path
            return m.group(0)
        path = (page_dir / target.split("#", 1)[0]).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(repo) or not path.exists():
            return m.group(0)
        rel = path.relative_to(repo).as_posix()
        return f"`{rel}`" if label.strip("`") == rel else f"{label} (`{rel}`)"

    return _LINK.sub(outside, text)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = Path(config["config_file_path"]).resolve().parent
    page_dir = (docs / page.file.src_path).parent
    # fenced code blocks are left alone: the even pieces are prose, the odd ones code
    pieces = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(p if i % 2 else _rewrite(p, page_dir, docs, repo) for i, p in enumerate(pieces))
