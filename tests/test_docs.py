"""Every Python block of the README and the docs runs, offline, in page order.

The blocks of one page share a namespace and run one after the other in an empty working
folder, as a reader would paste them. A block that needs the network is marked by the line
``<!-- network: REASON -->`` right above it and skipped; the block right after it must be its
offline twin (same API, a tiny or embedded model), which runs.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(
    r"(?P<marker><!-- network: [^>]+ -->\n)?(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)"
    r"(?P=indent)```",
    re.DOTALL,
)


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, needs network)`` of every fenced Python block of ``page``."""
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        indent = match["indent"]
        code = "\n".join(line.removeprefix(indent) for line in match["code"].splitlines())
        line = text.count("\n", 0, match.start("code"))
        blocks.append((line, code, match["marker"] is not None))
    return blocks


def test_pages_are_found_and_marked_blocks_have_twins():
    assert ROOT / "README.md" in PAGES and len(PAGES) > 1
    for page in PAGES:
        blocks = python_blocks(page)
        for index, (line, _, network) in enumerate(blocks):
            if network:
                follows = index + 1 < len(blocks) and not blocks[index + 1][2]
                assert follows, (
                    f"{page.name}:{line}: a network block needs an offline twin after it"
                )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    blocks = [(line, code) for line, code, network in python_blocks(page) if not network]
    if not blocks:
        pytest.skip("no Python blocks")
    monkeypatch.chdir(tmp_path)
    from class_space_saliency.methods import registry

    tables = (registry._REGISTRY, registry.METHODS, registry.VARIANTS)
    saved = [dict(table) for table in tables]  # pages may register methods: undone below
    # a real module, so that what the blocks define (dataclasses, registered methods) has one
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), module.__dict__)
            except Exception as error:  # name the block that failed
                raise AssertionError(
                    f"{page.relative_to(ROOT)}, block at line {line}: {error!r}"
                ) from error
    finally:
        for table, copy in zip(tables, saved, strict=True):
            table.clear()
            table.update(copy)
