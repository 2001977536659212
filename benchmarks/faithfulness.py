"""Faithfulness and localisation benchmark of every method on an embedded model.

Two runs on the same first ``--num-images`` images of the model's embedded evaluation set, both
resumable (rerun the same command after an interruption) and shardable under ``torchrun``:

1. ``main``: every registered method and named variant (``list_methods()``) x the protocol
   presets chefer2021, rise2018, vilas2023 and road2022, plus localisation against the
   object masks where the evaluation set has them (fashion-scenes). Methods built from
   fitted parameters join with them: ``--probes PATH`` adds ``linear_probe`` with the
   probes saved there (``benchmarks/memories_probes.py`` fits them on generated images).
2. ``ablation``: class-space variants (block, multi-block, score) with ``random`` beside
   them, so that every variant is compared with the default and with random on the same
   images.

The main run adds the official random baseline of Vilas et al. to vilas2023 (``random_shared``:
the mean over ``--shared-random-orders`` token orders shared by all images; 0 leaves it out).

Each run folder ``faithfulness_<model>_<run>`` gets ``report.md``, ``report.csv`` and
``curves_<preset>.png``; ``benchmarks/results/faithfulness.json`` gets (or replaces) the
entry ``models[<model>][<run>]``, which ``benchmarks/readme_tables.py`` turns into README
tables. ``--upsample nearest`` runs the pixel protocols on patch-aligned maps instead of
bilinear ones, in folders ``faithfulness_<model>_<run>_nearest`` and entries ``<run>_nearest``
(``readme_tables.py``'s ``upsample-shift`` tables show which verdicts move).
``--summarize-only`` rewrites the entries from the run folders' records without running
anything (after a change of the report code).

Example:
    torchrun --nproc_per_node 8 benchmarks/faithfulness.py --model fashion-scenes
    torchrun --nproc_per_node 8 benchmarks/faithfulness.py --model fashion-scenes --upsample nearest
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from class_space_saliency.data import load_default_eval
from class_space_saliency.evaluation import (
    BenchmarkReport,
    load_config,
    load_records,
    resolve_protocols,
    run_benchmark,
    summarize,
)
from class_space_saliency.evaluation.distributed import shard_from_env
from class_space_saliency.evaluation.report import localisation_setting
from class_space_saliency.methods import create_method, list_methods
from class_space_saliency.methods.base import UPSAMPLE_MODES
from class_space_saliency.models import load_default
from class_space_saliency.probing import LinearProbes

MODELS = ("fashion", "fashion-scenes")
PROTOCOLS = ("chefer2021", "rise2018", "vilas2023", "road2022")
# name -> ClassSpaceSaliency options; "class_space" (the default: last block, logit) is the
# reference every variant is compared with. Layers are numbered from 0 in the names, as the
# API's layer= (the committed first run named them from 1: cs_block5 = cs_layer4).
ABLATION = {
    "class_space": {},
    "cs_layer4": {"layer": -2},
    "cs_layer3": {"layer": -3},
    "cs_layers3-5": {"layer": [-3, -2, -1]},
    "cs_all_blocks": {"layer": "all"},
    "cs_probability": {"score": "probability"},
    "cs_rank": {"score": "rank"},
}
RESULTS_FORMAT = 2


REFERENCES = ("random", "chefer", "class_space_gradient_paper")
"""Methods every method is also compared with, where the run has them (``rows_vs_<name>``):
the seeded random map, the field's strongest simple baseline and the paper's own map."""


def run_summary(
    report: BenchmarkReport, correct: BenchmarkReport, versus: dict[str, BenchmarkReport]
) -> dict:
    """The JSON entry of one run: accuracy, sections (tables), rows and missing pairs.

    Args:
        report: Every method against ``class_space`` (``rows``).
        correct: The same on the correctly classified images only (``rows_correct``).
        versus: Reference name -> the same records summarised with that reference
            (``rows_vs_<name>``).

    Returns:
        The entry; rows carry their verdict and whether it is fragile, ``localisation``
        says how maps were compared with masks.
    """

    def rows(summary: BenchmarkReport) -> list[dict]:
        return [dataclasses.asdict(row) for row in summary.rows]

    return {
        "clean_accuracy": report.clean_accuracy,
        "n_images": report.n_images,
        "n_correct": correct.n_images,
        "localisation": localisation_setting(report.config),
        "sections": [
            {
                "name": s.name,
                "higher_is_better": s.higher_is_better,
                "rule": s.rule,
                "derived": s.derived,
            }
            for s in report.sections
        ],
        "missing": [list(pair) for pair in report.missing],
        "rows": rows(report),
        "rows_correct": rows(correct),
        **{f"rows_vs_{name}": rows(summary) for name, summary in versus.items()},
    }


def summarize_folder(folder: Path) -> dict:
    """The JSON entry (:func:`run_summary`) of a run folder's records, with the run's seed."""
    config, records = load_config(folder), load_records(folder)

    def report(reference: str, subset: str = "all") -> BenchmarkReport:
        return summarize(records, config, reference=reference, seed=config["seed"], subset=subset)

    methods = {method["name"] for method in config["methods"]}
    versus = {name: report(name) for name in REFERENCES if name in methods}
    return run_summary(report("class_space"), report("class_space", "correct"), versus)


def run_protocols(run: str, upsample: str, shared_random_orders: int) -> list:
    """The protocols of a run: pixel ones with ``upsample`` (only those where it is not the
    default bilinear: the others do not upsample); the official random in main."""
    protocols = []
    for protocol in resolve_protocols(PROTOCOLS):
        if upsample != "bilinear" and protocol.unit != "pixel":
            continue
        if protocol.unit == "pixel":
            protocol = dataclasses.replace(protocol, upsample=upsample)
        if protocol.unit == "token" and run == "main":
            protocol = dataclasses.replace(protocol, shared_random_orders=shared_random_orders)
        protocols.append(protocol)
    return protocols


def update_results(path: Path, model: str, runs: dict[str, dict]) -> None:
    """Set ``models[model][run]`` of the results JSON at ``path`` for each of ``runs``.

    Other models and runs not given are kept.
    """
    results = {"format": RESULTS_FORMAT, "models": {}}
    if path.exists():
        results = json.loads(path.read_text())
        if results.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{path} has format {results.get('format')}, not {RESULTS_FORMAT}")
    results["models"].setdefault(model, {}).update(runs)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="fashion-scenes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument(
        "--runs", nargs="+", choices=("main", "ablation"), default=["main", "ablation"]
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: adaptive chunks")
    parser.add_argument("--max-batch-size", type=int, default=512)
    parser.add_argument(
        "--probes", type=Path, help="fitted LinearProbes (file or folder): adds linear_probe"
    )
    parser.add_argument("--upsample", choices=UPSAMPLE_MODES, default="bilinear")
    parser.add_argument("--shared-random-orders", type=int, default=10)
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    suffix = "" if args.upsample == "bilinear" else f"_{args.upsample}"
    folders = {run: args.out / f"faithfulness_{args.model}_{run}{suffix}" for run in args.runs}
    path = args.out / "faithfulness.json"
    if args.summarize_only:
        update_results(
            path, args.model, {run + suffix: summarize_folder(f) for run, f in folders.items()}
        )
        print(
            f"wrote models[{args.model!r}] of {path} from {', '.join(map(str, folders.values()))}"
        )
        return

    device = torch.device("cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.manual_seed(0)
    model, prep = load_default(args.model)
    model = model.to(device)
    data = load_default_eval(args.num_images, dataset=args.model, masks=True, preprocessing=prep)
    fitted = {}
    if args.probes is not None:
        probes = LinearProbes.load(args.probes)
        fitted["linear_probe"] = create_method("linear_probe", model, probes=probes)
    methods = {
        "main": {
            **{name: create_method(name, model) for name in list_methods(needs_fitting=False)},
            **fitted,
        },
        "ablation": {
            **{name: create_method("class_space", model, **kw) for name, kw in ABLATION.items()},
            "random": create_method("random", model),
        },
    }
    summary = {}
    # one process group for all runs: run_benchmark would otherwise set up and tear down a group
    # per run, and under torchrun a rank still tearing down races the next run's barrier
    with shard_from_env(device):
        for run, folder in folders.items():
            report = run_benchmark(
                model,
                data,
                methods[run],
                run_protocols(run, args.upsample, args.shared_random_orders),
                prep.mean,
                prep.std,
                folder,
                max_batch_size=args.max_batch_size,
                batch_size=args.batch_size,
                n=args.num_images,
                model_name=f"{args.model}/{run}",
            )
            if report is None:  # not rank 0
                continue
            summary[run + suffix] = summarize_folder(folder)
            print(f"{run}: clean accuracy {report.clean_accuracy:.4f} on {report.n_images} images")
    if summary:
        update_results(path, args.model, summary)
        print(f"wrote models[{args.model!r}] of {path}")


if __name__ == "__main__":
    main()
