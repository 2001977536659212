"""Cost per image of the attention interventions, relative to one forward pass.

Each row is a named callable over the embedded fashion-scenes model and a batch of its
evaluation images (corrupted images: the same batch rolled by one); its time per image is
divided by that of a plain ``torch.no_grad()`` forward pass of the same images. Timing
(``speedkit.timing``): a warm-up round, then rounds that alternate the row with the forward
pass, reported as the median with the interquartile range of the per-round ratios. What to
expect: a knock-out costs one forward pass with the fused attention kernel off;
``attention_knockout`` one forward pass per run (unperturbed + each mode) plus the
class-space projection of every token; ``patch`` two passes; ``patching_grid`` one pass per
site (block x token: blocks x tokens; block x head: blocks x heads) plus two.

Writes ``benchmarks/results/intervention_cost.json`` (``--out``) and prints a table.

Example:
    python benchmarks/intervention_cost.py            # ~3 min on an idle 2-core CPU
    python benchmarks/intervention_cost.py --quick --out /tmp/intervention_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from speedkit.timing import Repeats, interleave, paired_ratio, summary, warm_up

from class_space_saliency import analysis, data, models
from class_space_saliency.analysis import Site

Row = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], object]
"""``f(model, images, labels, corrupted)``: one call of an analysis on a batch."""


def knocked_forward(mode: str) -> Row:
    def row(model, images, labels, corrupted):
        with torch.no_grad(), analysis.knockout(model, mode):
            return model(images)

    return row


ROWS: dict[str, tuple[Row, bool]] = {
    "knockout self_only: one forward pass inside": (knocked_forward("self_only"), False),
    "knockout no_cls: one forward pass inside": (knocked_forward("no_cls"), False),
    "attention_knockout (unperturbed + 2 modes, residual)": (
        lambda model, images, labels, corrupted: analysis.attention_knockout(
            model, (images, labels), progress=False
        ),
        False,
    ),
    "patch: one residual site": (
        lambda model, images, labels, corrupted: analysis.patch(
            model, images, corrupted, Site("residual", 3, tokens=0)
        ),
        False,
    ),
    "patching_grid block x head": (
        lambda model, images, labels, corrupted: analysis.patching_grid(
            model, (images, labels), corrupted, grids="head", progress=False
        ),
        True,
    ),
    "patching_grid block x token": (
        lambda model, images, labels, corrupted: analysis.patching_grid(
            model, (images, labels), corrupted, grids="token", progress=False
        ),
        True,
    ),
}
"""Name -> (call, whether it runs on the small batch of ``--grid-images``)."""


def measure(model, images, labels, row: Row, repeats: Repeats) -> dict:
    """One row: per-image milliseconds of the row and of the forward pass, and their ratio."""
    corrupted = images.roll(1, 0)

    def forward():
        with torch.no_grad():
            return model(images)

    calls = {"row": lambda: row(model, images, labels, corrupted), "forward": forward}
    round_s, _ = warm_up(calls)
    times = interleave(calls, repeats.count(round_s))
    per_image = 1000 / images.shape[0]
    return dict(
        images=images.shape[0],
        rounds=len(times["row"]),
        ms_per_image=asdict(summary(times["row"]).scaled(per_image)),
        forward_ms_per_image=asdict(summary(times["forward"]).scaled(per_image)),
        relative_to_forward=asdict(paired_ratio(times["row"], times["forward"])),
    )


def render(result: dict) -> str:
    lines = [
        f"cost per image relative to one forward pass ({result['model']}, "
        f"{result['threads']} CPU threads)",
        "",
        "| analysis | images | ms / image | x forward (IQR) |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        ratio = row["relative_to_forward"]
        lines.append(
            f"| {name} | {row['images']} | {row['ms_per_image']['value']:.3g} | "
            f"{ratio['value']:.3g} ({ratio['low']:.3g}-{ratio['high']:.3g}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="batch of the cheap rows")
    parser.add_argument("--grid-images", type=int, default=8, help="batch of patching_grid")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds, small batches")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "intervention_cost.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = models.load_default()
    repeats = Repeats(fixed=2) if args.quick else Repeats(budget_s=20.0, least=3, most=10)
    sizes = (8, 2) if args.quick else (args.images, args.grid_images)
    images, labels = data.load_default_eval(max(sizes))
    rows = {}
    for name, (row, small) in ROWS.items():
        n = sizes[1] if small else sizes[0]
        rows[name] = measure(model, images[:n], labels[:n], row, repeats)
        print(f"{name}: {rows[name]['relative_to_forward']['value']:.3g} x forward", flush=True)
    result = dict(
        benchmark="intervention_cost",
        model="fashion-scenes",
        device="cpu",
        threads=args.threads,
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
