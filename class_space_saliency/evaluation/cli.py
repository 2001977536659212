"""The ``benchmark`` subcommand: run the faithfulness benchmark from the command line."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .datasets import ImageFolderDataset
from .protocols import PRESETS
from .runner import run_benchmark

DEFAULT_METHODS = ("class_space", "gradcam", "rollout", "chefer", "random", "sobel", "intensity")
EMBEDDED_MODELS = ("default",)
"""Models that ship their own evaluation set (``--data`` may be left out)."""


def add_benchmark_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``benchmark`` on a subparsers object.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.

    Returns:
        The ``benchmark`` parser (its ``func`` default is :func:`run_benchmark_command`).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_benchmark_command(parser.add_subparsers())
        >>> args = parser.parse_args(["benchmark", "--n", "10", "--out", "runs/a"])
        >>> exit_code = args.func(args)
    """
    parser = subparsers.add_parser(
        "benchmark",
        help="faithfulness benchmark (perturbation curves, AUCs, report)",
        description=(
            "Run saliency methods through perturbation protocols and write records "
            "(resumable JSONL) and a report (Markdown, CSV, PNG) to --out. Scale out with "
            "torchrun --nproc_per_node K -m class_space_saliency benchmark ..."
        ),
    )
    parser.add_argument("--model", default="default", help="model name or path")
    parser.add_argument("--weights", default=None, help="weights file for the model")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PRESETS),
        help="presets (chefer2021 rise2018 vilas2023 road2022) or curves such as rise2018/deletion",
    )
    parser.add_argument("--n", type=int, default=1000, help="evaluate the first N images")
    parser.add_argument(
        "--data",
        default=None,
        help="ImageFolder root (default: the embedded evaluation set of an embedded model; "
        "required for any other model)",
    )
    parser.add_argument("--out", default="benchmark_results", help="run folder (resumable)")
    parser.add_argument("--max-batch-size", type=int, default=256, help="inputs per forward")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random method and the bootstrap"
    )
    parser.set_defaults(func=run_benchmark_command)
    return parser


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Run ``benchmark`` from parsed arguments.

    Args:
        args: Parsed arguments of the ``benchmark`` subcommand.

    Returns:
        0 on success, 2 for invalid arguments or a run folder of another configuration.
    """
    from ..models import load_model

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if args.data is None and args.model not in EMBEDDED_MODELS:
        print(
            f"error: --model {args.model} has no embedded evaluation set; pass --data with an "
            f"ImageFolder of its images (embedded models: {', '.join(EMBEDDED_MODELS)})",
            file=sys.stderr,
        )
        return 2
    try:
        model, preprocessing = load_model(args.model, args.weights)
        if args.data is None:
            from ..data import load_default_eval

            dataset = load_default_eval(preprocessing=preprocessing)
        else:
            dataset = ImageFolderDataset(args.data, preprocessing)
        report = run_benchmark(
            model.to(device),
            dataset,
            args.methods,
            args.protocols,
            preprocessing.mean,
            preprocessing.std,
            args.out,
            max_batch_size=args.max_batch_size,
            batch_size=args.batch_size,
            n=args.n,
            seed=args.seed,
            method_kwargs={"random": {"seed": args.seed}} if "random" in args.methods else None,
            model_name=args.model if args.weights is None else f"{args.model}:{args.weights}",
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report is not None:
        print(f"clean accuracy {report.clean_accuracy:.4f} on {report.n_images} images")
        print("wrote " + ", ".join(str(path) for path in report.files))
    return 0
