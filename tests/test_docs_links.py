"""Every relative link and image in README.md and docs/*.md points at a file that exists (and a
link to a Markdown heading, at a heading that exists)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md):
    return {slug(h) for h in re.findall(r"^#+ (.+)$", md.read_text(), re.M)}


def broken(md, text=None):
    text = md.read_text() if text is None else text
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # not inside code blocks
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (md.parent / path).resolve() if path else md
        if not file.exists():
            bad.append(f"{md.name}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{md.name}: {target} (no such heading)")
    return bad


def test_readme_and_docs_links_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    assert [b for md in pages for b in broken(md)] == []


def test_a_broken_link_is_caught():
    md = ROOT / "docs" / "course.md"
    text = "![x](hacking.png) [y](../README.md#results) ![z](no_such.png) [w](../README.md#no-such) [u](https://a.b)"
    assert broken(md, text) == ["course.md: no_such.png (no such file)",
                                "course.md: ../README.md#no-such (no such heading)"]
