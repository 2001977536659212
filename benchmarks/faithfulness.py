"""Faithfulness benchmark of every method on the embedded model (committed results).

Two runs, both resumable (rerun the same command after an interruption):

1. ``main``: every registered method x the three protocol presets on the embedded
   evaluation subset (default 1,000 images).
2. ``ablation``: class-space variants (block, score, multi-block mean) on the first
   ``--ablation-num-images`` images, to choose the default layer and score.

Each run folder gets ``report.md``, ``report.csv`` and ``curves_<preset>.png``; this script
also writes ``benchmarks/results/faithfulness.json`` with every AUC.

Example:
    torchrun --nproc_per_node 2 benchmarks/faithfulness.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from class_space_saliency.data import load_default_eval
from class_space_saliency.evaluation import run_benchmark
from class_space_saliency.methods import create_method
from class_space_saliency.models import load_default

MAIN_METHODS = (
    "class_space",
    "class_space_gradient",
    "gradcam",
    "rollout",
    "chefer",
    "raw_attention",
    "random",
    "sobel",
    "intensity",
)
# name -> ClassSpaceSaliency options; "class_space" (the default: last block, logit) is the
# reference every variant is compared with.
ABLATION = {
    "class_space": {},
    "cs_block5": {"layer": -2},
    "cs_block4": {"layer": -3},
    "cs_blocks4-6": {"layer": [-3, -2, -1]},
    "cs_all_blocks": {"layer": "all"},
    "cs_probability": {"score": "probability"},
    "cs_rank": {"score": "rank"},
}
PROTOCOLS = ("chefer2021", "rise2018", "vilas2023")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--ablation-num-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-batch-size", type=int, default=512)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, prep = load_default()
    dataset = load_default_eval(preprocessing=prep)
    runs = {
        "main": ({m: create_method(m, model) for m in MAIN_METHODS}, args.num_images),
        "ablation": (
            {name: create_method("class_space", model, **kw) for name, kw in ABLATION.items()},
            args.ablation_num_images,
        ),
    }
    summary = {}
    for run, (methods, n) in runs.items():
        report = run_benchmark(
            model,
            dataset,
            methods,
            PROTOCOLS,
            prep.mean,
            prep.std,
            args.out / f"faithfulness_{run}",
            max_batch_size=args.max_batch_size,
            batch_size=args.batch_size,
            n=n,
            model_name=f"default/{run}",
        )
        if report is None:  # not rank 0
            continue
        summary[run] = dict(
            clean_accuracy=report.clean_accuracy,
            n_images=report.n_images,
            rows=[vars(row) for row in report.rows],
        )
        print(f"{run}: clean accuracy {report.clean_accuracy:.4f} on {report.n_images} images")
    if summary:
        path = args.out / "faithfulness.json"
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
