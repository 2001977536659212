"""Command line: ``class-space-saliency demo | attribute | ...`` (also ``python -m``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEMO_METHODS = ("class_space", "class_space_gradient")


def _layer_spec(text: str) -> int | list[int] | str:
    """``"-1"`` -> -1, ``"0,2,5"`` -> [0, 2, 5], ``"all"`` -> ``"all"``."""
    if text == "all":
        return text
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layer must be an int, a comma-separated list of ints or 'all', got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _compute_maps(model, methods: Sequence[str], inputs, target, layer) -> dict:
    """``{method: (B, 1, h, w) maps}``; ``layer`` applies to the class-space method."""
    from .methods import create_method

    maps = {}
    for name in tqdm(methods, desc="methods", leave=False, disable=len(methods) < 2):
        options = {"layer": layer} if name == "class_space" and layer is not None else {}
        maps[name] = create_method(name, model, **options).attribute(inputs, target=target)
    return maps


def demo(args: argparse.Namespace) -> int:
    """Per-layer overlays, method comparison and identifiability on an embedded model."""
    from . import ClassSpaceSaliency, class_identifiability
    from .data import load_default_eval, load_default_eval_uint8, one_per_class
    from .methods import METHODS
    from .models import EMBEDDED_MODELS, load_default
    from .visualize import plot_identifiability, saliency_grid, save_figure

    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, prep = load_default(args.model)
    inputs, labels = load_default_eval(dataset=args.model, preprocessing=prep)
    raw, _ = load_default_eval_uint8(dataset=args.model)
    rows = one_per_class(labels, len(prep.class_names))
    x, y = inputs[rows], labels[rows]
    with torch.no_grad():
        probs = model(x).softmax(-1)
    predicted = probs.argmax(-1)
    titles = [
        f"{prep.class_name(int(t))}\npred {prep.class_name(int(p))}"
        for t, p in zip(y, predicted, strict=True)
    ]

    per_layer = ClassSpaceSaliency(model).attribute(x, target=y, layer="all", per_layer=True)
    columns = {f"block {b + 1}": per_layer[:, b] for b in range(per_layer.shape[1])}
    save_figure(saliency_grid(raw[rows], columns, titles), out / "class_space_layers.png")

    methods = [m for m in args.methods if m in METHODS]
    method_maps = _compute_maps(model, methods, x, y, None)
    save_figure(saliency_grid(raw[rows], method_maps, titles), out / "methods.png")

    result = class_identifiability(model, inputs, labels, max_batch_size=250, progress=True)
    save_figure(plot_identifiability(result), out / "identifiability.png")

    with torch.no_grad():
        accuracy = float((model(inputs).argmax(-1) == labels).float().mean())
    summary = dict(
        model=f"embedded {args.model} ViT (class_space_saliency/assets/"
        f"{EMBEDDED_MODELS[args.model].name})",
        eval_images=len(labels),
        eval_accuracy=round(accuracy, 4),
        examples=[
            dict(
                index=int(i),
                label=prep.class_name(int(t)),
                predicted=prep.class_name(int(p)),
                probability=round(float(probs[k, p]), 4),
            )
            for k, (i, t, p) in enumerate(zip(rows, y, predicted, strict=True))
        ],
        identifiability=result.to_dict(),
        methods=methods,
        seconds=round(time.time() - start, 1),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = f"eval accuracy {accuracy:.4f} on {len(labels)} images\n{result}\n"
    (out / "summary.txt").write_text(text)
    print(text, end="")
    print(f"wrote {out}/class_space_layers.png, methods.png, identifiability.png, summary.json")
    return 0


def attribute(args: argparse.Namespace) -> int:
    """Overlays for the user's own images; bad files are reported and skipped."""
    from .data import load_image
    from .models import load_model
    from .visualize import image_to_uint8, overlay

    try:
        model, prep = load_model(args.model, weights=args.weights)
        target = None if args.target is None else prep.class_index(args.target)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in tqdm(args.images, desc="images", disable=len(args.images) < 2):
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        x = prep(image).unsqueeze(0)
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        predicted = int(probs.argmax())
        chosen = predicted if target is None else target
        try:
            maps = _compute_maps(model, args.method, x, chosen, args.layer)
        except (ValueError, TypeError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            failures += 1
            continue
        # Whole-image resize keeps the geometry of the file; cropping transforms don't.
        background = image if prep.transform is None else prep.denormalize(x[0]).clamp(0, 1)
        written = []
        for name, saliency in maps.items():
            target_file = out / f"{Path(path).stem}_{name}.png"
            rgb = overlay(image_to_uint8(_as_array(background)), saliency[0], args.colormap)
            _write_png(target_file, rgb)
            written.append(target_file.name)
        print(
            f"{path}: predicted {prep.class_name(predicted)} ({probs[predicted]:.2f}), "
            f"target {prep.class_name(chosen)} -> {', '.join(written)}"
        )
    return 1 if failures else 0


def sanity(args: argparse.Namespace) -> int:
    """Cascading randomisation sanity check on the embedded model and evaluation images."""
    from .data import load_default_eval
    from .models import load_default
    from .sanity import cascading_randomization
    from .visualize import save_figure

    try:
        model, prep = load_default(args.model)
        inputs, labels = load_default_eval(args.n, dataset=args.model, preprocessing=prep)
        result = cascading_randomization(
            model, inputs, labels, args.methods, seed=args.seed, progress=True
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sanity.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "sanity.txt").write_text(f"{result}\n")
    save_figure(result.plot(), out / "sanity.png")
    print(result)
    print(f"wrote {out}/sanity.json, sanity.txt, sanity.png")
    return 0


def _as_array(image):
    import numpy as np

    return image if isinstance(image, torch.Tensor) else np.asarray(image)


def _write_png(path: Path, rgb) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``class-space-saliency``."""
    from .methods import METHODS

    parser = argparse.ArgumentParser(
        prog="class-space-saliency",
        description="Explain Vision Transformers in their class embedding space.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    from .models import DEFAULT_MODEL, EMBEDDED_MODELS

    demo_parser = commands.add_parser("demo", help="figures and summary on an embedded model")
    demo_parser.add_argument("--out", default="demo_out", help="output folder")
    demo_parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=list(EMBEDDED_MODELS),
        help="embedded model: fashion-scenes (natural backgrounds, the default) or fashion "
        "(black backgrounds: shows class space's failure mode on content-free regions)",
    )
    demo_parser.add_argument(
        "--methods",
        nargs="+",
        default=[m for m in (*DEMO_METHODS, *sorted(METHODS)) if m in METHODS],
        choices=sorted(METHODS),
        help="methods for the side-by-side figure",
    )
    demo_parser.set_defaults(func=demo)

    attr = commands.add_parser("attribute", help="saliency overlays for your own images")
    attr.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    attr.add_argument("--model", default="default", help="'default', a timm name or a .json")
    attr.add_argument("--weights", default=None, help="local weights for a timm model")
    attr.add_argument("--target", default=None, help="class index or name (default: predicted)")
    attr.add_argument("--layer", type=_layer_spec, default=None, help="block(s) or 'all'")
    attr.add_argument(
        "--method",
        nargs="+",
        default=["class_space"],
        choices=sorted(METHODS),
        help="one or more methods",
    )
    attr.add_argument("--colormap", default="jet", help="OpenCV colormap name")
    attr.add_argument("--out", default="saliency_out", help="output folder")
    attr.set_defaults(func=attribute)

    from .sanity import DEFAULT_METHODS as SANITY_METHODS

    check = commands.add_parser(
        "sanity", help="cascading randomisation sanity check (Adebayo et al. 2018)"
    )
    check.add_argument(
        "--methods",
        nargs="+",
        default=list(SANITY_METHODS),
        choices=sorted(METHODS),
        help="methods to check",
    )
    check.add_argument("--n", type=int, default=100, help="the first N evaluation images")
    check.add_argument(
        "--model", default=DEFAULT_MODEL, choices=list(EMBEDDED_MODELS), help="embedded model"
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation")
    check.add_argument("--out", default="sanity_out", help="output folder")
    check.set_defaults(func=sanity)

    from .evaluation.cli import add_benchmark_command

    add_benchmark_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
