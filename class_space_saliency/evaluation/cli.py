"""The ``benchmark`` subcommand: run the faithfulness benchmark from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from .._cli_common import (
    BENCHMARK_METHODS,
    add_benchmark_parser,
    add_prompts_argument,
    weights_unavailable_line,
)
from ..hub import WeightsUnavailableError
from .datasets import ImageFolderDataset, as_dataset, balanced_order, match_class_folders
from .protocols import resolve_protocols
from .runner import run_benchmark

DEFAULT_METHODS = BENCHMARK_METHODS
"""The default selection of ``--methods`` (any of ``list_methods()`` may be chosen): the paper's
map, the field's three strongest simple baselines and the three controls."""

__all__ = [
    "DEFAULT_METHODS",
    "add_benchmark_command",
    "add_prompts_argument",
    "run_benchmark_command",
]


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
    return add_benchmark_parser(subparsers, run_benchmark_command)


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
    except WeightsUnavailableError as error:
        print(f"error: {weights_unavailable_line(args.model, error.reason)}", file=sys.stderr)
        return 2
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
