"""Every relative link in the repository's own documentation points at a file that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _documents() -> list[Path]:
    return sorted([*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md")])


def test_relative_links_resolve_from_the_linking_file():
    broken = []
    for doc in _documents():
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert len(_documents()) > 10 and not broken, broken
