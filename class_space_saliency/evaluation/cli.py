"""The ``benchmark`` subcommand: run the faithfulness benchmark from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from ..methods.base import UPSAMPLE_MODES
from .datasets import ImageFolderDataset, as_dataset, balanced_order, match_class_folders
from .protocols import PRESETS, resolve_protocols
from .runner import run_benchmark

DEFAULT_METHODS = ("class_space", "gradcam", "rollout", "chefer", "random", "sobel", "intensity")
"""The default selection of ``--methods`` (any of ``list_methods()`` may be chosen): the paper's
map, the field's three strongest simple baselines and the three controls."""


def add_prompts_argument(parser: argparse.ArgumentParser) -> None:
    """``--prompts TEXT ...``: the classes of an ``open_clip:`` model."""
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="for --model open_clip:ARCH[:TAG]: the text prompts that are the classes",
    )


def add_benchmark_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``benchmark`` on a subparsers object.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.

    Returns:
        The ``benchmark`` parser (its ``func`` default is :func:`run_benchmark_command`).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> benchmark = add_benchmark_command(parser.add_subparsers())
        >>> args = parser.parse_args(["benchmark", "--num-images", "2", "--methods", "sobel",
        ...                           "--protocols", "chefer2021/positive", "--out", "runs/a"])
        >>> args.func(args)  # the embedded model on its first 2 evaluation images
        clean accuracy 1.0000 on 2 images
        wrote runs/a/report.md, runs/a/report.csv, runs/a/curves_chefer2021.png
        0
    """
    from ..cli import HelpFormatter
    from ..methods import list_methods

    names = sorted(list_methods())

    parser = subparsers.add_parser(
        "benchmark",
        help="faithfulness benchmark (perturbation curves, AUCs, report)",
        formatter_class=HelpFormatter,
        description=(
            "Run saliency methods through perturbation protocols and write records "
            "(resumable JSONL) and a report (Markdown, CSV, PNG) to --out. Rerun the same "
            "command to resume; a run can grow in its folder (more --num-images, --methods, "
            "--protocols). Class folders of --data are matched to the model's class names."
        ),
        epilog=(
            "examples:\n"
            "  class-space-saliency benchmark --num-images 200 --methods class_space chefer "
            "random --out runs/a\n"
            "  torchrun --nproc_per_node 2 -m class_space_saliency benchmark --data val/ "
            "--model vit_base_patch16_224 --weights b16.pth --out runs/b16"
        ),
    )
    parser.add_argument("--model", default="default", help="model name or path")
    parser.add_argument("--weights", default=None, help="weights file for the model")
    add_prompts_argument(parser)
    parser.add_argument(
        "--class-names", default=None, metavar="FILE", help="class names, one per line"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=names,
        metavar="METHOD",
        help=f"any of {', '.join(names)}",
    )
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PRESETS),
        help="presets (chefer2021 rise2018 vilas2023 road2022) or curves such as rise2018/deletion",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=1000,
        help="images to evaluate: a class-balanced sample drawn with --seed",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="ImageFolder root (default: the embedded evaluation set of an embedded model; "
        "required for any other model)",
    )
    parser.add_argument(
        "--labels-by-index",
        action="store_true",
        help="number --data class folders in sorted order instead of matching class names",
    )
    parser.add_argument("--out", default="benchmark_results", help="run folder (resumable)")
    parser.add_argument("--max-batch-size", type=int, default=256, help="inputs per forward")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per chunk, saved together (default: one image, more once images prove "
        "fast: as many as take about 10 s)",
    )
    parser.add_argument(
        "--upsample",
        choices=UPSAMPLE_MODES,
        default="bilinear",
        help="how pixel protocols upsample patch maps: bilinear (Chefer et al.) or nearest "
        "(patch-aligned)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sample, the random method, the bootstrap"
    )
    parser.set_defaults(func=run_benchmark_command)
    return parser


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Run ``benchmark`` from parsed arguments.

    Args:
        args: Parsed arguments of the ``benchmark`` subcommand.

    Returns:
        0 on success, 2 for invalid arguments or a run folder of another configuration,
        130 when interrupted (the records written so far are kept; rerun to resume).
    """
    from torch.utils.data import Subset

    from ..models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model
    from .store import load_records

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    embedded_names = ("default", *EMBEDDED_MODELS)
    model_name = DEFAULT_MODEL if args.model == "default" else args.model
    if args.weights is not None:
        model_name = f"{model_name}:{args.weights}"
    if args.data is None and args.model not in embedded_names:
        print(
            f"error: --model {args.model} has no embedded evaluation set; pass --data with an "
            f"ImageFolder of its images (embedded models: {', '.join(embedded_names)})",
            file=sys.stderr,
        )
        return 2
    try:
        model, preprocessing = load_model(
            args.model, args.weights, class_names=args.class_names, prompts=args.prompts
        )
        if args.data is None:
            from ..data import load_default_eval

            embedded = DEFAULT_MODEL if args.model == "default" else args.model
            images, labels, masks = load_default_eval(
                dataset=embedded, masks=True, preprocessing=preprocessing
            )  # with masks: localisation is scored too
            dataset, labels = as_dataset((images, labels, masks)), labels.tolist()
        else:
            folders = [p.name for p in Path(args.data).iterdir() if p.is_dir()]
            names = getattr(preprocessing, "class_names", None)
            class_to_idx = match_class_folders(folders, names, args.labels_by_index)
            dataset = ImageFolderDataset(args.data, preprocessing, class_to_idx)
            labels = dataset.labels
        dataset = Subset(dataset, balanced_order(labels, args.seed))
        protocols = [
            dataclasses.replace(p, upsample=args.upsample) if p.unit == "pixel" else p
            for p in resolve_protocols(args.protocols)
        ]
        report = run_benchmark(
            model.to(device),
            dataset,
            args.methods,
            protocols,
            preprocessing.mean,
            preprocessing.std,
            args.out,
            max_batch_size=args.max_batch_size,
            batch_size=args.batch_size,
            n=args.num_images,
            seed=args.seed,
            method_kwargs={"random": {"seed": args.seed}} if "random" in args.methods else None,
            model_name=model_name,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = len({r["image"] for r in load_records(args.out)}) if Path(args.out).is_dir() else 0
        print(
            f"interrupted: records of {done} of {args.num_images} images are saved in "
            f"{args.out}; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    if report is not None:
        print(f"clean accuracy {report.clean_accuracy:.4f} on {report.n_images} images")
        names = getattr(preprocessing, "class_names", None)
        classes = getattr(model, "num_classes", None) or len(names or ()) or len(set(labels))
        if report.clean_accuracy < 2 / max(classes, 1):
            print(
                f"warning: clean accuracy {report.clean_accuracy:.4f} is below twice chance "
                f"({2 / classes:.4f} with {classes} classes): check that the labels match the "
                "model's classes (folder names, --class-names, --labels-by-index)",
                file=sys.stderr,
            )
        print("wrote " + ", ".join(str(path) for path in report.files))
    return 0
