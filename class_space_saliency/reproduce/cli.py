"""The ``reproduce`` subcommand: the paper's experiments on its seven models, one report."""

from __future__ import annotations

import argparse
import sys

from ..analysis import ANALYSES
from ..paper import PAPER_MODELS
from .plan import DEFAULT_GPU_TFLOPS, STEPS


def add_reproduce_command(
    subparsers: argparse._SubParsersAction, formatter_class: type[argparse.HelpFormatter]
) -> argparse.ArgumentParser:
    """Register ``reproduce`` on a subparsers object.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.
        formatter_class: The CLI's help formatter.

    Returns:
        The ``reproduce`` parser (its ``func`` default is :func:`run_reproduce_command`).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = add_reproduce_command(parser.add_subparsers(), argparse.HelpFormatter)
        >>> args = parser.parse_args(["reproduce", "--dry-run", "--models", "vit_b_32"])
        >>> args.func(args)  # doctest: +ELLIPSIS
        reproduce --dry-run: nothing is downloaded, loaded or computed
        ...
        0
    """
    models = ", ".join(f"{m.key} ({m.name})" for m in PAPER_MODELS.values())
    parser = subparsers.add_parser(
        "reproduce",
        help="the paper's analyses and token-removal test on its seven models, one report",
        formatter_class=formatter_class,
        description=(
            "Runs, per model of the paper, every analysis (identifiability, attention "
            "knock-outs, context, sublayers, memories, probes: whatever this version has) "
            "against an untrained twin, the vilas2023 token-removal test with the paper's "
            "map, Chefer's and a random one, and the notebook's value-vector classes; then "
            "writes OUT/report.md and OUT/report.json with our numbers beside the paper's "
            "(each with its notebook cell). Resumable: rerun the same command after an "
            "interruption. --dry-run lists the models, weights, data and an estimated GPU "
            f"time without the network. Models: {models}."
        ),
        epilog=(
            "examples:\n"
            "  class-space-saliency reproduce --imagenet-s /data/ImageNet-S --dry-run\n"
            "  class-space-saliency reproduce --imagenet-s /data/ImageNet-S --cifar100 "
            "/data/cifar --cifar100-checkpoint vit_base_patch16_224-CIFAR100.pt "
            "--device cuda --out paper_run"
        ),
    )
    parser.add_argument(
        "--imagenet-s",
        metavar="ROOT",
        default=None,
        help="ImageNet-S folder (ImageNetS919/ with validation/, validation-segmentation/; "
        "test/ for the probes; the authors' validation_stim_info.csv if you have it)",
    )
    parser.add_argument(
        "--cifar100", metavar="ROOT", default=None, help="CIFAR-100 (torchvision's layout)"
    )
    parser.add_argument(
        "--cifar100-checkpoint",
        metavar="FILE",
        default=None,
        help="the authors' vit_base_patch16_224-CIFAR100.pt (official README, step 2.3)",
    )
    parser.add_argument(
        "--refinement-checkpoint",
        metavar="FILE",
        default=None,
        help="a local deit_base_trm.pth (default: downloaded from its official release)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(PAPER_MODELS),
        choices=list(PAPER_MODELS),
        metavar="KEY",
        help=f"one or more of {', '.join(PAPER_MODELS)}",
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
        "--steps", nargs="+", default=list(STEPS), choices=list(STEPS), help="steps per model"
    )
    parser.add_argument(
        "--stimuli",
        default="auto",
        choices=["auto", "paper", "rule"],
        help="the authors' stimulus list (paper), the first 5 images per class by file name "
        "(rule), or the list where it is in the ImageNet-S folder (auto)",
    )
    parser.add_argument(
        "--probe-split",
        default="test",
        help="ImageNet-S split the linear probes are fitted on (official: test, 10 per class)",
    )
    parser.add_argument(
        "--num-images", type=int, default=None, help="the first N stimuli only (a quick look)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes")
    parser.add_argument("--seed", type=int, default=0, help="untrained twins, random maps")
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=DEFAULT_GPU_TFLOPS,
        help="sustained float32 TFLOP/s of your GPU, for the --dry-run estimate",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would run and its cost; run nothing"
    )
    parser.add_argument("--out", default="reproduce_out", help="output folder (resumable)")
    parser.set_defaults(func=run_reproduce_command)
    return parser


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Run ``reproduce`` from parsed arguments.

    Returns:
        0 when every step that could run finished (models without their data or checkpoint
        are reported as not run), 1 when a step or model failed, 2 for invalid arguments or
        an output folder of another run, 130 when interrupted (finished steps are kept;
        rerun the same command to continue).
    """
    from .plan import plan_reproduction
    from .run import reproduce

    options = dict(
        imagenet_s=args.imagenet_s,
        cifar100=args.cifar100,
        models=args.models,
        checkpoints={
            "vit_cifar_16": args.cifar100_checkpoint,
            "deit_ensemble_16": args.refinement_checkpoint,
        },
        analyses=args.analyses,
        steps=args.steps,
        stimuli=args.stimuli,
        probe_split=args.probe_split,
        num_images=args.num_images,
    )
    try:
        if args.dry_run:
            print(plan_reproduction(args.out, gpu_tflops=args.gpu_tflops, **options))
            return 0
        if args.imagenet_s is None and args.models != ["vit_cifar_16"]:
            raise ValueError("--imagenet-s is required (the ImageNet-S folder); see --dry-run")
        report = reproduce(
            args.out,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            seed=args.seed,
            **options,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished steps are saved in {args.out}; rerun the same command to "
            "continue",
            file=sys.stderr,
        )
        return 130
    failed = [
        f"{key} {step}: {entry['reason']}"
        for key, model in report.models.items()
        for step, entry in model["steps"].items()
        if entry["status"] == "failed"
    ]
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    print(f"wrote {report.files[0]}, {report.files[1]}")
    return 1 if failed else 0
