"""Cost of each analysis per image, relative to one plain forward pass of the same images.

Every row of :data:`ANALYSES` is a named callable ``run(model, baseline, data)`` over the
embedded fashion-scenes model (``models.load_default()``), a same-architecture model with
fresh random weights as the baseline, and ``data = (images, labels, masks)`` from
``data.load_default_eval(n, masks=True)`` (patching's corrupted images: the same images rolled
by one). Add a row to add an analysis: nothing else changes. The patching grids run one forward
pass per site, so they are timed on the first ``--grid-images`` images only (:data:`SMALL`).

Timing (``speedkit.timing``): each row alternates its call with the plain forward of the same
images (``torch.no_grad()``, batches of the analyses' default 32) for at least 5 timed rounds
after a warm-up round; the figures are medians per image with their interquartile ranges, and
the ratio is the ratio of medians with the interquartile range of the per-round ratios.

Writes ``benchmarks/results/analysis_cost.json`` (``--out``) and a Markdown table next to it,
and prints the table.

One torch thread by default: on a shared machine two threads made the forward's own time
swing 100-fold between rounds; with one thread the interquartile range of every ratio stayed
within about 25 % of the ratio.

Example:
    python benchmarks/analysis_cost.py --repeats 7  # the committed run: ~8 min, shared 2-core CPU
    python benchmarks/analysis_cost.py --images 32 --repeats 5 --out /tmp/cost.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from speedkit.render import environment
from speedkit.timing import Repeats, interleave, paired_ratio, summary, warm_up
from torch import nn

from class_space_saliency import analysis, data, models

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Analysis = Callable[[nn.Module, nn.Module, Data], object]
"""``run(model, baseline, (images, labels, masks))``: one analysis over all the images."""

BATCH_SIZE = 32
"""Images per forward pass, in the analyses (their default) and in the reference forward."""

ANALYSES: dict[str, Analysis] = {
    "identifiability (residual)": lambda m, b, d: analysis.identifiability(m, d[:2]),
    "logit_increment": lambda m, b, d: analysis.logit_increment(m, d[:2]),
    "logit_increment + baseline": lambda m, b, d: analysis.logit_increment(m, d[:2], baseline=b),
    "sublayer_changes": lambda m, b, d: analysis.sublayer_changes(m, d[:2]),
    "sublayer_changes (official)": lambda m, b, d: analysis.sublayer_changes(
        m, d[:2], official=True
    ),
    "residual_composition": lambda m, b, d: analysis.residual_composition(m, d[:2]),
    "context_identifiability": lambda m, b, d: analysis.context_identifiability(m, d),
    "context_identifiability (no attention change)": lambda m, b, d: (
        analysis.context_identifiability(m, d, attention_change=False)
    ),
    "context_identifiability (official)": lambda m, b, d: analysis.context_identifiability(
        m, d, official=True
    ),
    "context_identifiability + baseline": lambda m, b, d: analysis.context_identifiability(
        m, d, baseline=b
    ),
    "context_removal (both)": lambda m, b, d: analysis.context_removal(m, d),
    "knockout self_only: one forward pass inside": lambda m, b, d: knocked_forward(
        m, d, "self_only"
    ),
    "knockout no_cls: one forward pass inside": lambda m, b, d: knocked_forward(m, d, "no_cls"),
    "attention_knockout (unperturbed + 2 modes)": lambda m, b, d: analysis.attention_knockout(
        m, d[:2], progress=False
    ),
    "patch: one residual site": lambda m, b, d: analysis.patch(
        m, d[0], d[0].roll(1, 0), analysis.Site("residual", 3, tokens=0)
    ),
    "patching_grid block x head": lambda m, b, d: analysis.patching_grid(
        m, d[:2], d[0].roll(1, 0), grids="head", progress=False
    ),
    "patching_grid block x token": lambda m, b, d: analysis.patching_grid(
        m, d[:2], d[0].roll(1, 0), grids="token", progress=False
    ),
}
"""The rows: name -> analysis (see :data:`Analysis`)."""

SMALL = {"patching_grid block x head", "patching_grid block x token"}
"""Rows timed on the first ``--grid-images`` images (one forward pass per patched site)."""


def knocked_forward(model: nn.Module, data: Data, mode: str) -> None:
    """One forward pass of the images with the attention of every block knocked out."""
    with torch.no_grad(), analysis.knockout(model, mode):
        forward(model, data[0])


def forward(model: nn.Module, images: torch.Tensor) -> None:
    """The reference: the model's plain forward pass over ``images`` in batches."""
    with torch.no_grad():
        for start in range(0, len(images), BATCH_SIZE):
            model(images[start : start + BATCH_SIZE])


def random_baseline(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with fresh random weights (timm's ``init_weights``), eval mode."""
    baseline = copy.deepcopy(model)
    torch.manual_seed(seed)
    baseline.init_weights()
    return baseline.eval()


def measure(
    analyses: Mapping[str, Analysis],
    model: nn.Module,
    baseline: nn.Module,
    data: Data,
    small: Data,
    repeats: Repeats,
) -> list[dict]:
    """Time every analysis against the forward pass of the same images.

    Returns:
        One row per analysis: name, images, rounds, and per-image milliseconds (median and
        quartiles) of the analysis and the forward pass, and their paired ratio.
    """
    rows = []
    for name, run in analyses.items():
        batch = small if name in SMALL else data
        images = len(batch[0])
        calls = {
            "analysis": lambda run=run, batch=batch: run(model, baseline, batch),
            "forward": lambda batch=batch: forward(model, batch[0]),
        }
        round_s, _ = warm_up(calls)
        times = interleave(calls, repeats.count(round_s))
        per_image = {key: summary(value).scaled(1000 / images) for key, value in times.items()}
        rows.append(
            dict(
                name=name,
                images=images,
                rounds=len(times["analysis"]),
                analysis_ms_per_image=dataclasses.asdict(per_image["analysis"]),
                forward_ms_per_image=dataclasses.asdict(per_image["forward"]),
                ratio=dataclasses.asdict(paired_ratio(times["analysis"], times["forward"])),
            )
        )
        print(f"{name}: {rows[-1]['ratio']['value']:.2f} x forward", flush=True)
    return rows


def render(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (medians with interquartile ranges)."""

    def spread(figure: dict, digits: int) -> str:
        value, low, high = (f"{figure[key]:.{digits}f}" for key in ("value", "low", "high"))
        return f"{value} [{low}, {high}]"

    lines = [
        "Cost per image on the embedded fashion-scenes model (images with masks, batches of "
        f"{BATCH_SIZE}; median [interquartile range])",
        "",
        "| analysis | images | ms / image | forward ms / image | × forward | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['images']} | {spread(row['analysis_ms_per_image'], 3)} | "
            f"{spread(row['forward_ms_per_image'], 3)} | {spread(row['ratio'], 2)} | "
            f"{row['rounds']} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=128, help="images (with masks), <= 1000")
    parser.add_argument(
        "--grid-images", type=int, default=8, help="images of the patching-grid rows"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed rounds per row after the warm-up (default: ~3 s worth, 5 to 20)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--only", nargs="+", choices=list(ANALYSES), help="measure these rows only")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "analysis_cost.json",
        help="JSON path; the Markdown goes next to it as .md",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure, print the table, write the JSON and Markdown."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = models.load_default()
    baseline = random_baseline(model)
    batch = data.load_default_eval(args.images, masks=True)
    small = tuple(tensor[: args.grid_images] for tensor in batch)
    analyses = {name: ANALYSES[name] for name in args.only} if args.only else ANALYSES
    repeats = Repeats(fixed=args.repeats) if args.repeats else Repeats()
    rows = measure(analyses, model, baseline, batch, small, repeats)
    table = render(rows)
    print(table)
    report = dict(
        environment=environment(args.threads),
        images=args.images,
        grid_images=args.grid_images,
        repeats=args.repeats,
        batch_size=BATCH_SIZE,
        model="fashion-scenes (embedded)",
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
