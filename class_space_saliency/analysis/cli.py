"""The ``analyze`` subcommand: the paper's analyses of a model, as one report folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._cli_common import add_data_argument
from .report import ANALYSES


def add_analyze_command(
    subparsers: argparse._SubParsersAction, formatter_class: type[argparse.HelpFormatter]
) -> argparse.ArgumentParser:
    """Register ``analyze`` on a subparsers object.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.
        formatter_class: The CLI's help formatter.

    Returns:
        The ``analyze`` parser (its ``func`` default is :func:`run_analyze_command`).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> analyze = add_analyze_command(parser.add_subparsers(), argparse.HelpFormatter)
        >>> args = parser.parse_args(["analyze", "--num-images", "4", "--out", "runs/a",
        ...                           "--analyses", "identifiability"])
        >>> args.func(args)  # the embedded model on its first 4 evaluation images
        wrote runs/a/analysis.json, runs/a/identifiability.png, runs/a/report.md
        0
    """
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's analyses of a model (identifiability, knock-outs, context, ...)",
        formatter_class=formatter_class,
        description=(
            "Runs the paper's analyses of how a ViT builds its classes and writes report.md, "
            "analysis.json and one figure per analysis. The embedded models come with their "
            "evaluation images and object masks; for other models pass --data, an ImageFolder "
            "(one sub-folder per class; analyses that need masks are then skipped). Every "
            "analysis is compared with an untrained twin of the model (same architecture, "
            "random weights, seeded) unless --baseline none."
        ),
        epilog=(
            "example:\n  class-space-saliency analyze --model fashion-scenes --num-images 1000 "
            "--out analysis_scenes"
        ),
    )
    parser.add_argument(
        "--model",
        default="default",
        help="'default', an embedded name, a timm name, hf:..., open_clip:... or a .json",
    )
    parser.add_argument("--weights", default=None, help="local weights (state dict)")
    parser.add_argument(
        "--class-names", default=None, metavar="FILE", help="text file, one class name per line"
    )
    add_data_argument(parser)
    parser.add_argument(
        "--num-images", type=int, default=None, help="analyse the first N images (default: all)"
    )
    parser.add_argument(
        "--analyses",
        nargs="+",
        default=list(ANALYSES),
        choices=list(ANALYSES),
        metavar="NAME",
        help=f"one or more of {', '.join(ANALYSES)}",
    )
    parser.add_argument(
        "--baseline",
        default="untrained",
        choices=["untrained", "none"],
        help="compare with an untrained twin of the model, or not",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the untrained twin and the permutation tests"
    )
    parser.add_argument(
        "--probe-images",
        type=int,
        default=3000,
        help="embedded models: held-out images (test split from index 1,000 on) to fit the "
        "linear probes on; 0 skips the probes",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    parser.add_argument("--out", default="analysis_out", help="output folder (resumable)")
    parser.set_defaults(func=run_analyze_command)
    return parser


def run_analyze_command(args: argparse.Namespace) -> int:
    """Run ``analyze`` from parsed arguments.

    Returns:
        0 on success, 2 for invalid arguments or an output folder of another run, 130 when
        interrupted (finished analyses are kept; rerun to continue).
    """
    import torch

    from .._fingerprint import model_fingerprint
    from ..models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model
    from ..untrained import untrained_copy
    from .report import run_analyses

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedded = DEFAULT_MODEL if args.model == "default" else args.model
    if args.data is None and embedded not in EMBEDDED_MODELS:
        print(
            f"error: --model {args.model} has no embedded images; pass --data with an "
            f"ImageFolder of its images (embedded models: {', '.join(EMBEDDED_MODELS)})",
            file=sys.stderr,
        )
        return 2
    try:
        model, preprocessing = load_model(args.model, args.weights, class_names=args.class_names)
        model = model.to(device).eval()
        if args.data is None:
            from ..data import load_default_eval

            data = load_default_eval(
                args.num_images, dataset=embedded, masks=True, preprocessing=preprocessing
            )
            source = f"embedded {embedded} evaluation set"
        else:
            data = _image_folder(args.data, preprocessing)
            source = str(Path(args.data).resolve())
        baseline = None if args.baseline == "none" else untrained_copy(model, seed=args.seed)
        options = {}
        if args.data is None and args.probe_images > 0 and "linear_probes" in args.analyses:
            from ..data import load_default_held_out

            train = load_default_held_out(args.probe_images, embedded, preprocessing)
            options["linear_probes"] = {"train": train}
        report = run_analyses(
            model,
            data,
            args.out,
            analyses=args.analyses,
            baseline=baseline,
            has_masks=args.data is None,
            num_images=args.num_images,
            batch_size=args.batch_size,
            options=options,
            config={
                "model": args.model if args.weights is None else f"{args.model}:{args.weights}",
                "fingerprint": model_fingerprint(model),
                "data": source,
                "seed": args.seed,
                "probe_images": args.probe_images if "linear_probes" in options else 0,
            },
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished analyses are saved in {args.out}; rerun the same command "
            "to continue",
            file=sys.stderr,
        )
        return 130
    for name, reason in report.skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print("wrote " + ", ".join(str(path) for path in report.files))
    return 0


def _image_folder(root: str, preprocessing):
    """An ImageFolder of ``root`` (class folders matched to the model's class names)."""
    from ..evaluation.datasets import ImageFolderDataset, match_class_folders

    folders = [p.name for p in Path(root).iterdir() if p.is_dir()]
    names = getattr(preprocessing, "class_names", None)
    return ImageFolderDataset(root, preprocessing, match_class_folders(folders, names, False))
