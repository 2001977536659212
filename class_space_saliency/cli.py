"""Command line: ``class-space-saliency demo | attribute | ...`` (also ``python -m``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
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
    from .methods import list_methods
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
    columns = {f"layer {b}": per_layer[:, b] for b in range(per_layer.shape[1])}
    save_figure(saliency_grid(raw[rows], columns, titles), out / "class_space_layers.png")

    methods = [m for m in args.methods if m in list_methods()]
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


def _error(message: object) -> int:
    """Print a one-line user error and return exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _layer_methods() -> list[str]:
    """Registered methods (and variants) that take a ``layer`` option."""
    from .methods import list_methods, method_info

    return [name for name in list_methods() if "layer" in method_info(name).options]


def output_stems(paths: Sequence[Path]) -> list[str]:
    """Unique output names for input files: their paths relative to the inputs' common
    folder, with ``/`` as ``__`` (``a/cat.jpg`` -> ``a__cat``); the suffix is kept where
    two inputs differ only by it, and a file given twice is numbered.

    Example:
        >>> output_stems([Path("x/a/cat.jpg"), Path("x/b/cat.jpg")])
        ['a__cat', 'b__cat']
    """
    resolved = [Path(p).resolve() for p in paths]
    if not resolved:
        return []
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    relative = [p.relative_to(root) for p in resolved]
    stems = ["__".join(r.with_suffix("").parts) for r in relative]
    counts = Counter(stem for stem, _ in set(zip(stems, relative, strict=True)))
    stems = [
        "__".join(r.parts).replace(".", "_") if counts[stem] > 1 else stem
        for stem, r in zip(stems, relative, strict=True)
    ]
    seen: Counter = Counter()
    unique = []
    for stem in stems:
        seen[stem] += 1
        unique.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return unique


def _looks_unlike_embedded_data(image, input_size: Sequence[int], grey: bool) -> bool:
    """Whether a photo is unlike an embedded model's small clothing images.

    Any photo more than 4x the model's input size is; for the grey ``fashion`` model, so is
    a colourful one.
    """
    import numpy as np

    if min(image.size) > 4 * max(input_size[-2:]):
        return True
    array = np.asarray(image, dtype=np.float32)
    colour = float(
        np.abs(array[..., 0] - array[..., 1]).mean() + np.abs(array[..., 1] - array[..., 2]).mean()
    )
    return grey and colour > 20


def attribute(args: argparse.Namespace) -> int:
    """Overlays (and raw maps) for the user's own images; bad files are reported and skipped."""
    import numpy as np
    from PIL import Image

    from .data import expand_image_paths, load_image
    from .methods import create_method
    from .models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model
    from .visualize import display_range, image_to_uint8, overlay, with_colorbar

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out} is an existing file; give a folder")
    without_layer = [m for m in args.methods if m not in _layer_methods()]
    if args.layer is not None and without_layer:
        return _error(
            f"--layer does not apply to {', '.join(without_layer)} "
            f"(it applies to {', '.join(_layer_methods())})"
        )
    try:
        model, prep = load_model(
            args.model, weights=args.weights, class_names=args.class_names, prompts=args.prompts
        )
        target = None if args.target is None else prep.class_index(args.target)
        paths = expand_image_paths(args.images)
        options = {} if args.layer is None else {"layer": args.layer}
        explainers = {name: create_method(name, model, **options) for name in args.methods}
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, ImportError) as error:
        return _error(error)
    out.mkdir(parents=True, exist_ok=True)
    failures, records, warned = 0, [], False
    embedded = DEFAULT_MODEL if args.model == "default" else args.model
    embedded = embedded if embedded in EMBEDDED_MODELS else None
    for path, stem in tqdm(
        list(zip(paths, output_stems(paths), strict=True)), desc="images", disable=len(paths) < 2
    ):
        try:
            image = load_image(path)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        if max(image.size) > args.max_size:
            image.thumbnail((args.max_size, args.max_size), Image.LANCZOS)
        if (
            embedded is not None
            and not warned
            and _looks_unlike_embedded_data(image, prep.input_size, embedded == "fashion")
        ):
            print(
                f"warning: the embedded model {embedded!r} is a 10-class Fashion-MNIST ViT "
                f"({prep.input_size[-1]}x{prep.input_size[-2]} clothing images); on other photos "
                "its predictions mean little. Use --model TIMM_NAME --weights FILE for your own "
                "model.",
                file=sys.stderr,
            )
            warned = True
        x = prep(image).unsqueeze(0)
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        predicted = int(probs.argmax())
        chosen = predicted if target is None else target
        try:
            maps = {
                name: explainer.attribute(x, target=chosen, upsample=True)[0, 0]
                for name, explainer in explainers.items()
            }
        except (ValueError, TypeError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            failures += 1
            continue
        box = prep.crop_box(*image.size)
        written, scaling = [], {}
        for name, saliency in maps.items():
            rgb = overlay(image_to_uint8(_as_array(image)), saliency, args.colormap, box=box)
            _write_png(out / f"{stem}_{name}.png", with_colorbar(rgb, saliency, args.colormap))
            written.append(f"{stem}_{name}.png")
            scaling[name] = display_range(saliency)[2]
            if args.save_maps:
                np.save(out / f"{stem}_{name}.npy", saliency.cpu().numpy().astype(np.float32))
        top = probs.topk(min(5, probs.numel()))
        records.append(
            dict(
                image=str(path),
                name=stem,
                top5=[
                    dict(index=int(i), name=prep.class_name(int(i)), probability=round(float(p), 6))
                    for p, i in zip(top.values, top.indices, strict=True)
                ],
                target=dict(index=chosen, name=prep.class_name(chosen)),
                methods=list(maps),
                layer=args.layer,
                maps={name: f"{stem}_{name}.npy" for name in maps} if args.save_maps else None,
                overlay_scaling=scaling,
            )
        )
        print(
            f"{path}: predicted {prep.class_name(predicted)} ({probs[predicted]:.2f}), "
            f"target {prep.class_name(chosen)} -> {', '.join(written)}"
        )
    if args.save_maps:
        (out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {len(records)} predictions and raw maps (.npy) to {out}")
    return 1 if failures else 0


def sanity(args: argparse.Namespace) -> int:
    """Cascading randomisation sanity check on the embedded model and evaluation images."""
    from .data import load_default_eval
    from .models import load_default
    from .sanity import cascading_randomization
    from .visualize import save_figure

    try:
        model, prep = load_default(args.model)
        inputs, labels = load_default_eval(args.num_images, dataset=args.model, preprocessing=prep)
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with defaults and examples kept as written."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _colormaps() -> list[str]:
    import cv2

    return sorted(name[9:].lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``class-space-saliency``."""
    from .methods import list_methods

    names = sorted(list_methods(needs_fitting=False))  # fitted methods need more than a name

    parser = argparse.ArgumentParser(
        prog="class-space-saliency",
        description="Explain Vision Transformers in their class embedding space.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    from .models import DEFAULT_MODEL, EMBEDDED_MODELS

    demo_parser = commands.add_parser(
        "demo",
        help="figures and summary on an embedded model",
        formatter_class=HelpFormatter,
        epilog="example:\n  class-space-saliency demo --model fashion --out demo_fashion",
    )
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
        default=list(
            dict.fromkeys(
                (*DEMO_METHODS, *sorted(list_methods(variants=False, needs_fitting=False)))
            )
        ),
        choices=names,
        help="methods for the side-by-side figure",
    )
    demo_parser.set_defaults(func=demo)

    attr = commands.add_parser(
        "attribute",
        help="saliency overlays (and raw maps) for your own images",
        formatter_class=HelpFormatter,
        description=(
            "Overlays of saliency maps on your images: the whole photo, with the map on the "
            "region the model saw (centre crop of timm models) and a colour bar. Layers are "
            "numbered from 0 (first block); negative numbers count from the last block."
        ),
        epilog=(
            "example:\n  class-space-saliency attribute photos/ --model vit_small_patch16_224 "
            "--weights pets.pth --class-names pets.txt --target tabby --methods class_space "
            "chefer --save-maps --out maps/"
        ),
    )
    attr.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...) and/or folders")
    attr.add_argument("--model", default="default", help="'default', a timm name or a .json")
    attr.add_argument("--weights", default=None, help="local weights (state dict) for a timm model")
    from .evaluation.cli import add_prompts_argument

    add_prompts_argument(attr)
    attr.add_argument(
        "--class-names",
        default=None,
        metavar="FILE",
        help="text file with one class name per line (own checkpoints)",
    )
    attr.add_argument(
        "--target",
        default=None,
        help="class index or name, any synonym, case-insensitive (default: predicted class)",
    )
    attr.add_argument(
        "--layer",
        type=_layer_spec,
        default=None,
        help="block(s) from 0, e.g. -1, 0,2,5 or all (methods with layers only; "
        "default: each method's own)",
    )
    attr.add_argument(
        "--methods",
        nargs="+",
        default=["class_space"],
        choices=names,
        metavar="METHOD",
        help=f"one or more of {', '.join(names)}",
    )
    attr.add_argument("--colormap", default="jet", choices=_colormaps(), metavar="NAME",
                      help="OpenCV colormap: " + ", ".join(_colormaps()))  # fmt: skip
    attr.add_argument("--out", default="saliency_out", help="output folder")
    attr.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each raw map (.npy, float32, model-input size) and predictions.json",
    )
    attr.add_argument(
        "--max-size",
        type=_positive_int,
        default=1024,
        help="downscale larger images to this longest side (pixels) for the output",
    )
    attr.set_defaults(func=attribute)

    from .sanity import DEFAULT_METHODS as SANITY_METHODS

    check = commands.add_parser(
        "sanity",
        help="cascading randomisation sanity check (Adebayo et al. 2018)",
        formatter_class=HelpFormatter,
        epilog="example:\n  class-space-saliency sanity --num-images 100 --methods class_space",
    )
    check.add_argument(
        "--methods",
        nargs="+",
        default=list(SANITY_METHODS),
        choices=names,
        help="methods to check",
    )
    check.add_argument("--num-images", type=int, default=100, help="the first N evaluation images")
    check.add_argument(
        "--model", default=DEFAULT_MODEL, choices=list(EMBEDDED_MODELS), help="embedded model"
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation")
    check.add_argument("--out", default="sanity_out", help="output folder")
    check.set_defaults(func=sanity)

    from .evaluation.cli import add_benchmark_command

    add_benchmark_command(commands)

    from .analysis.cli import add_analyze_command

    add_analyze_command(commands, HelpFormatter)

    from .reproduce.cli import add_reproduce_command

    add_reproduce_command(commands, HelpFormatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
