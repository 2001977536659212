"""Write the analysis tables of the docs from the committed ``analyze`` runs, or check them.

Every table sits between two marker comments of a markdown page::

    <!-- analysis:MODEL/ANALYSIS:start -->
    ...
    <!-- analysis:MODEL/ANALYSIS:end -->

and is the markdown that ``analyze`` stored for that analysis in
``benchmarks/results/analysis_MODEL/analysis.json`` (the result's own ``table()``), preceded by
one line naming the run (images, baseline, seed). The text between the markers is replaced;
everything else is left alone.

Example:
    python benchmarks/analysis_tables.py            # rewrite the tables in docs/evidence/
    python benchmarks/analysis_tables.py --check    # exit 1 if a page differs from the JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "docs" / "evidence" / "analyses.md",)
MARKER = re.compile(
    r"(<!-- analysis:(?P<model>[\w.-]+)/(?P<name>\w+):start -->\n)(?P<body>.*?)"
    r"(<!-- analysis:(?P=model)/(?P=name):end -->)",
    re.DOTALL,
)


def table(model: str, name: str) -> str:
    """The stored table of analysis ``name`` of the committed run of ``model``."""
    path = ROOT / "benchmarks" / "results" / f"analysis_{model}" / "analysis.json"
    run = json.loads(path.read_text())
    config, stored = run["config"], run["analyses"]
    if name not in stored:
        raise KeyError(f"{path.relative_to(ROOT)} holds no analysis {name!r}")
    source = (
        f"*`{path.relative_to(ROOT)}`: {config['num_images'] or 'all'} images of the "
        f"{config['data']}, untrained baseline {'yes' if config['baseline'] else 'no'}, "
        f"seed {config['seed']}.*"
    )
    return f"{source}\n\n{stored[name]['table'].strip()}\n"


def render(text: str) -> str:
    """``text`` with every marked table rewritten."""
    return MARKER.sub(
        lambda m: m.group(1) + table(m["model"], m["name"]) + m.group(5),
        text,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        text = page.read_text()
        rendered = render(text)
        if rendered != text:
            stale.append(page)
            if not args.check:
                page.write_text(rendered)
    if args.check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(
            f"stale analysis tables in {names}: run benchmarks/analysis_tables.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
