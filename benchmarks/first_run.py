"""Re-score the committed first faithfulness run with today's AUC rules, for comparison.

The first run of ``benchmarks/faithfulness.py`` (``benchmarks/results/faithfulness_main``,
the ``fashion`` model, 1,000 images) broke ties in its perturbation orders in raster order;
the rerun breaks them at random. Its per-image curves are summarised here with today's code
(so vilas2023 uses today's N normaliser) and stored as ``models["fashion"]["main_raster_ties"]``
of ``benchmarks/results/faithfulness.json``; ``readme_tables.py`` shows the difference to the
rerun (``fashion/main/tie-shift``). Only the curves both runs have are compared.

Example:
    python benchmarks/first_run.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from faithfulness import summarize_folder, update_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("benchmarks/results/faithfulness_main"))
    parser.add_argument(
        "--results", type=Path, default=Path("benchmarks/results/faithfulness.json")
    )
    args = parser.parse_args()
    update_results(args.results, "fashion", {"main_raster_ties": summarize_folder(args.run)})
    print(f"wrote models['fashion']['main_raster_ties'] of {args.results}")


if __name__ == "__main__":
    main()
