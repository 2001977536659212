"""What the command line needs before it imports anything heavy: argument types, the help
formatter, the ``benchmark`` parser and the names the commands offer.

``class-space-saliency --help`` parses with the standard library alone; torch, timm and
matplotlib are imported when a command runs. The names below mirror the registry, the
embedded models and the protocol presets (``tests/test_cli_startup.py`` keeps them equal);
``--methods`` values are checked against the registry itself, imported when one is given.
Both :mod:`.cli` and :mod:`.evaluation.cli` import from here, so imports flow one way:
``cli`` -> ``evaluation.cli`` -> ``_cli_common``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

BUILTIN_METHODS = (
    "class_space",
    "class_space_gradient",
    "class_space_contributions",
    "gradcam",
    "rollout",
    "chefer",
    "raw_attention",
    "random",
    "sobel",
    "intensity",
    "class_space_gradient_paper",
)
"""The methods a name alone builds, as shipped: ``list_methods(needs_fitting=False)``
(methods, then variants; ``linear_probe`` needs probes fitted first)."""

BUILTIN_VARIANTS = ("class_space_gradient_paper",)
"""The named variants among :data:`BUILTIN_METHODS`."""

EMBEDDED_MODELS = ("fashion-scenes", "fashion")
"""Names of the embedded models (``models.EMBEDDED_MODELS``)."""

DEFAULT_MODEL = "fashion-scenes"
"""``models.DEFAULT_MODEL``."""

PROTOCOL_PRESETS = ("chefer2021", "rise2018", "vilas2023", "road2022")
"""The protocol presets (``evaluation.PRESETS``), named before torch is imported."""

UPSAMPLE_MODES = ("bilinear", "nearest")
"""``--upsample`` choices (``methods.base.UPSAMPLE_MODES``), named before torch is imported."""

DEMO_METHODS = ("class_space", "class_space_gradient")
"""Methods the demo's side-by-side figure shows first."""

BENCHMARK_METHODS = ("class_space", "gradcam", "rollout", "chefer", "random", "sobel", "intensity")
"""The default selection of ``benchmark --methods``: the paper's map, the field's three
strongest simple baselines and the three controls."""

SANITY_METHODS = tuple(
    name for name in BUILTIN_METHODS if name not in BUILTIN_VARIANTS and name != "random"
)
"""``sanity.DEFAULT_METHODS``: every registered method but ``random``."""

COLORMAP_EXAMPLES = ("jet", "turbo", "viridis", "inferno", "magma", "hot", "bone")
"""A few OpenCV colormaps for ``--help`` (``--colormap`` takes any ``cv2.COLORMAP_*`` name)."""

CONTROL_CELL = 16
"""Pixels per map cell of the controls (random, sobel, intensity) on models without patches."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with the defaults there are (not ``None`` or ``False``, nor a second one
    where the help names it) and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def layer_spec(text: str) -> int | list[int] | str | list[str]:
    """Parse ``--layer``: block indices or, for Grad-CAM, module names.

    Example:
        >>> layer_spec("-1"), layer_spec("0,2,5"), layer_spec("all"), layer_spec("layer4")
        (-1, [0, 2, 5], 'all', 'layer4')
    """
    if text == "all":
        return text
    parts = [part.strip() for part in text.split(",")]
    numbers = [_as_int(part) for part in parts]
    if all(number is not None for number in numbers):
        return numbers[0] if len(numbers) == 1 else numbers
    if any(number is not None for number in numbers) or not all(_is_module_path(p) for p in parts):
        raise argparse.ArgumentTypeError(
            "expected a block index (-1), a comma-separated list (0,2,5), 'all', or module "
            f"names such as layer4 or blocks.3.norm1, got {text!r}"
        )
    return parts[0] if len(parts) == 1 else parts


def positive_int(text: str) -> int:
    """An ``int`` >= 1 (argparse type)."""
    value = _as_int(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _is_module_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() or part.isdigit() for part in text.split("."))


def add_prompts_argument(parser: argparse.ArgumentParser) -> None:
    """``--prompts TEXT ...``: the classes of an ``open_clip:`` model."""
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="for --model open_clip:ARCH[:TAG]: the text prompts that are the classes",
    )


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """``--data ROOT``: an ImageFolder, or the embedded evaluation set of an embedded model."""
    parser.add_argument(
        "--data",
        default=None,
        help="ImageFolder root (default: the embedded evaluation set of an embedded model; "
        "required for any other model)",
    )


def add_benchmark_parser(
    subparsers: argparse._SubParsersAction, run: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """Register ``benchmark`` on a subparsers object, with ``run`` as its ``func``.

    Args:
        subparsers: The result of ``parser.add_subparsers()``.
        run: What runs the parsed command (``evaluation.cli.run_benchmark_command``).

    Returns:
        The ``benchmark`` parser.
    """
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
    add_methods_argument(parser, BENCHMARK_METHODS, "methods to benchmark")
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=list(PROTOCOL_PRESETS),
        help=f"presets ({' '.join(PROTOCOL_PRESETS)}) or curves such as rise2018/deletion",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=1000,
        help="images to evaluate: a class-balanced sample drawn with --seed",
    )
    add_data_argument(parser)
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
    parser.set_defaults(func=run)
    return parser


def method_name(text: str) -> str:
    """A registered method's name (argparse type).

    The registry (and torch) is imported only when ``--methods`` is given, not for
    ``--help``; methods registered in the same process are accepted too.
    """
    from .methods import list_methods

    known = list_methods(needs_fitting=False)  # fitted methods need more than a name
    if text not in known:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(map(repr, known))})"
        )
    return text


def add_methods_argument(
    parser: argparse.ArgumentParser, default: tuple[str, ...] | list[str], help: str
) -> None:
    """``--methods NAME ...``, checked against the method registry."""
    parser.add_argument(
        "--methods",
        nargs="+",
        type=method_name,
        default=list(default),
        metavar="METHOD",
        help=f"{help}: one or more of {', '.join(sorted(BUILTIN_METHODS))}",
    )


def weights_unavailable_line(model: str, reason: str) -> str:
    """The command line's one-line refusal when pretrained weights cannot be had.

    Example:
        >>> weights_unavailable_line("test_vit", "offline")
        'cannot get the weights of test_vit (offline); pass --weights PATH (a local checkpoint)'
    """
    if model.startswith("hf:"):
        remedy = "give --model hf:FOLDER, a folder saved with save_pretrained()"
    else:
        remedy = "pass --weights PATH (a local checkpoint)"
    return f"cannot get the weights of {model} ({reason}); {remedy}"
