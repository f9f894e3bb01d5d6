"""The README is where a user starts: it links every page under docs/, and every relative
link in it and in docs/ points at a file of the repository (never outside it)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown [text](target)


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if "://" not in t and not t.startswith("#")]


def test_readme_links_every_doc_page():
    linked = {(REPO / t.split("#")[0]).resolve() for t in _links(REPO / "README.md")}
    pages = sorted(p.resolve() for p in (REPO / "docs").rglob("*.md"))
    missing = [str(p.relative_to(REPO)) for p in pages if p not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_relative_links_resolve_inside_the_repository():
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for target in _links(page):
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(REPO), f"{page.name} links outside the repository: {target}"
            assert path.exists(), f"{page.relative_to(REPO)} links a missing file: {target}"
