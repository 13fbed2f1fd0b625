"""Write one benchmark's section into docs/benchmarks.md, leaving the other sections alone.

Each benchmark owns the text between `<!-- begin NAME -->` and `<!-- end NAME -->`;
a section not on the page yet is appended. Headings in a section are moved one level
down, so that a benchmark's own page title becomes a section of the shared page.
"""

from __future__ import annotations

from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Each section below is written by the benchmark it names, with the command that
produced it; run that command again to refresh the section rather than editing it.
"""


def _demote(markdown: str) -> str:
    lines = []
    for line in markdown.strip().splitlines():
        lines.append("#" + line if line.startswith("#") else line)
    return "\n".join(lines)


def write_section(name: str, markdown: str, page: Path = PAGE) -> Path:
    """Replace the section `name` of `page` with `markdown`, or append it; return the page."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{_demote(markdown)}\n{end}\n"
    text = page.read_text() if page.exists() else _HEADER
    if begin in text and end in text:
        before, _, rest = text.partition(begin)
        _, _, after = rest.partition(end + "\n")
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return page
