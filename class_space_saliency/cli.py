"""Command line: ``class-space-saliency demo | attribute | sanity | benchmark`` (also
``python -m class_space_saliency``).

Parsing needs the standard library alone, so ``--help`` answers at once; each command
imports torch, timm and matplotlib when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cli_common import (
    COLORMAP_EXAMPLES,
    CONTROL_CELL,
    DEFAULT_MODEL,
    DEMO_METHODS,
    EMBEDDED_MODELS,
    SANITY_METHODS,
    HelpFormatter,
    add_benchmark_parser,
    add_methods_argument,
    add_prompts_argument,
    layer_spec,
    positive_int,
    weights_unavailable_line,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .methods import SaliencyMethod

__all__ = ["HelpFormatter", "build_parser", "main", "output_stems"]


def _error(message: object) -> int:
    """Print a one-line user error and return exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------- demo
def demo(args: argparse.Namespace) -> int:
    """Per-layer overlays, method comparison and identifiability on an embedded model."""
    import torch

    from . import ClassSpaceSaliency, class_identifiability
    from .data import load_default_eval, load_default_eval_uint8, one_per_class
    from .methods import create_method
    from .models import EMBEDDED_MODELS as EMBEDDED_FILES
    from .models import load_default
    from .visualize import plot_identifiability, saliency_grid, save_figure

    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, prep = load_default(args.model)
    inputs, labels = load_default_eval(dataset=args.model, preprocessing=prep)
    raw, _ = load_default_eval_uint8(dataset=args.model)
    rows = one_per_class(labels, len(prep.class_names))
    x, y = inputs[rows], labels[rows]
    with torch.inference_mode():
        probs = model(x).softmax(-1)
    predicted = probs.argmax(-1)
    titles = [_label_and_prediction(prep.class_name(int(t)), prep.class_name(int(p)))
              for t, p in zip(y, predicted, strict=True)]  # fmt: skip
    caption = "maps explain the label (target = label); ✗ = misclassified"

    per_layer = ClassSpaceSaliency(model).attribute(x, target=y, layer="all", per_layer=True)
    columns = {f"layer {b}": per_layer[:, b] for b in range(per_layer.shape[1])}
    figure = saliency_grid(raw[rows], columns, titles, caption=caption)
    save_figure(figure, out / "class_space_layers.png")

    method_maps = {name: create_method(name, model).attribute(x, target=y) for name in args.methods}
    save_figure(saliency_grid(raw[rows], method_maps, titles, caption=caption), out / "methods.png")

    result = class_identifiability(model, inputs, labels, max_batch_size=250, progress=True)
    save_figure(plot_identifiability(result), out / "identifiability.png")

    # The embedded models' heads read [CLS]: its top-1 class after the last block is the
    # model's prediction, so identifiability's pass gives the accuracy (no second forward).
    accuracy = float(result.cls_rate[-1]) / 100
    summary = dict(
        model=f"embedded {args.model} ViT (class_space_saliency/assets/"
        f"{EMBEDDED_FILES[args.model].name})",
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
        methods=list(args.methods),
        seconds=round(time.time() - start, 1),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = f"eval accuracy {accuracy:.4f} on {len(labels)} images\n{result}\n"
    (out / "summary.txt").write_text(text)
    print(text, end="")
    print(f"wrote {out}/class_space_layers.png, methods.png, identifiability.png, summary.json")
    return 0


def _label_and_prediction(label: str, predicted: str) -> str:
    """A row title that tells the label from the prediction (``✗`` where they differ)."""
    return f"label {label}\npred {predicted}" + ("" if label == predicted else " ✗")


# ----------------------------------------------------------------------------------- attribute
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


class _Refusal(Exception):
    """A user error the command reports in one line (exit code 2)."""


@dataclass
class _Explainer:
    """One ``--methods`` entry: the method, and the layers it is drawn at.

    Attributes:
        name: The method's registry name.
        method: The built method.
        panels: ``(label, layer)`` per panel where ``--layer`` names several layers.
        combined: The layer option of the one combined map (``None``: the method's own
            layer, or no combined map where ``panels`` are drawn by a one-layer method).
        single: Whether a single (or combined) overlay is written.
    """

    name: str
    method: SaliencyMethod
    panels: list[tuple[str, Any]] = field(default_factory=list)
    combined: Any = None
    single: bool = True

    def maps(self, x: torch.Tensor, target: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(single map (H, W) or None, per-layer maps (L, H, W) or None)`` for one image."""
        import torch

        options = {} if self.combined is None else {"layer": self.combined}
        single = (
            self.method.attribute(x, target, upsample=True, **options)[0, 0]
            if self.single
            else None
        )
        if not self.panels:
            return single, None
        layers = [layer for _, layer in self.panels]
        if "per_layer" in self.method.info.options:  # all blocks from one forward pass
            return single, self.method.attribute(
                x, target, upsample=True, layer=layers, per_layer=True
            )[0]
        stacked = [
            self.method.attribute(x, target, upsample=True, layer=layer)[0, 0] for layer in layers
        ]
        return single, torch.stack(stacked)


def _build_explainer(name: str, model: nn.Module, spec: Any, class_names) -> _Explainer:
    """Build ``name`` for ``--layer spec``; :class:`_Refusal` with the CLI's own wording."""
    from .adapters import UnsupportedModelError, find_adapter
    from .methods import create_method, method_info

    info = method_info(name)
    vit = find_adapter(model) is not None
    options: dict[str, Any] = {"class_names": class_names}
    if info.model_agnostic and not vit:
        options["patch_size"] = CONTROL_CELL
    modules = _modules(model, spec) if _names_modules(spec) else None
    several = spec == "all" or isinstance(spec, list)
    if modules:
        options["layer"] = modules[0]
    elif spec is not None and not several:
        options["layer"] = spec
    try:
        method = create_method(name, model, **options)
    except UnsupportedModelError as error:
        raise _Refusal(_refusal(name, model, error)) from None
    except TypeError as error:
        if modules:
            raise _Refusal(
                f"--layer {spec}: {name} takes block numbers, not module names"
            ) from None
        raise _Refusal(error) from None
    except ValueError as error:
        raise _Refusal(error) from None
    if not several:
        return _Explainer(name, method)
    if modules:
        panels = list(zip(spec, modules, strict=True))
    elif hasattr(method.anatomy, "resolve_layers"):
        try:
            panels = [(f"layer {b}", b) for b in method.anatomy.resolve_layers(spec)]
        except (TypeError, ValueError) as error:
            raise _Refusal(f"--layer: {error}") from None
    else:
        raise _Refusal(f"--layer {spec}: {type(model).__name__} has no blocks; name modules")
    try:  # methods that combine several layers in one map (class_space: mean, ...) draw it too
        method.replace_options(layer=[layer for _, layer in panels])
        return _Explainer(name, method, panels, combined=spec)
    except (TypeError, ValueError):
        return _Explainer(name, method, panels, single=False)


def _names_modules(spec: Any) -> bool:
    """Whether ``--layer`` named modules (``layer4``, ``blocks.3.norm1``)."""
    if isinstance(spec, list):
        return isinstance(spec[0], str)
    return isinstance(spec, str) and spec != "all"


def _modules(model: nn.Module, spec: str | list[str]) -> list[nn.Module]:
    names = [spec] if isinstance(spec, str) else spec
    found = []
    for name in names:
        try:
            found.append(model.get_submodule(name))
        except AttributeError:
            children = ", ".join(child for child, _ in model.named_children())
            raise _Refusal(
                f"--layer {name}: {type(model).__name__} has no module {name!r} "
                f"(its top-level modules: {children})"
            ) from None
    return found


def _refusal(name: str, model: nn.Module, error: Exception) -> str:
    """Why ``name`` cannot explain ``model``, in one line that names CLI options."""
    from .adapters import UnsupportedModelError, find_adapter
    from .anatomy import ViTAnatomy
    from .methods import GradCAM, method_info

    what = type(model).__name__
    info = method_info(name)
    if find_adapter(model) is None:
        if issubclass(info.method, GradCAM):
            return (
                f"--methods {name} on {what} (not a ViT) needs --layer MODULE, e.g. "
                f"--layer {_suggest_layer(model)}"
            )
        return (
            f"--methods {name} needs a Vision Transformer (timm, torchvision, Hugging Face, "
            f"open_clip; Swin), not {what}; on other models use gradcam --layer "
            f"{_suggest_layer(model)}, random, sobel or intensity"
        )
    try:
        readout = ViTAnatomy.from_model(model).readout
    except UnsupportedModelError:  # a family that lacks a part: the library's reason
        readout = None
    if readout is not None and info.needs_cls and readout.cls_index is None:
        return (
            f"--methods {name} needs a [CLS] token that the head reads; the head of {what} "
            "pools image tokens (use class_space)"
        )
    if readout is not None and info.needs_attention:
        kind = "differentiable attention" if info.needs_gradients else "attention"
        return f"--methods {name} cannot read {kind} from {what} (use class_space or gradcam)"
    return f"--methods {name}: {str(error).split('; ')[0][:200]}"


def _suggest_layer(model: nn.Module) -> str:
    """The last top-level module holding a convolution (ResNet: ``layer4``)."""
    from torch import nn

    convolutional = [
        child
        for child, module in model.named_children()
        if any(isinstance(m, nn.Conv2d) for m in module.modules())
    ]
    return convolutional[-1] if convolutional else "MODULE"


def attribute(args: argparse.Namespace) -> int:
    """Overlays (and raw maps) for the user's own images; bad files are reported and skipped."""
    from .data import expand_image_paths
    from .hub import WeightsUnavailableError
    from .methods import list_methods, method_info
    from .models import load_model
    from .visualize import colormap_names

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out} is an existing file; give a folder")
    layered = [n for n in list_methods(needs_fitting=False) if "layer" in method_info(n).options]
    without_layer = [m for m in args.methods if m not in layered]
    if args.layer is not None and without_layer:
        return _error(
            f"--layer does not apply to {', '.join(without_layer)} (it applies to "
            f"{', '.join(layered)})"
        )
    if args.colormap not in colormap_names():
        return _error(
            f"--colormap {args.colormap!r} is not an OpenCV colormap "
            f"({', '.join(colormap_names())})"
        )
    try:
        model, prep = load_model(
            args.model, weights=args.weights, class_names=args.class_names, prompts=args.prompts
        )
    except WeightsUnavailableError as error:
        return _error(weights_unavailable_line(args.model, error.reason))
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, ImportError) as error:
        return _error(error)
    try:
        target = None if args.target is None else prep.class_index(args.target)
        paths = expand_image_paths(args.images)
        explainers = [
            _build_explainer(n, model, args.layer, prep.class_names) for n in args.methods
        ]
    except (_Refusal, ValueError) as error:
        return _error(error)
    out.mkdir(parents=True, exist_ok=True)
    return _attribute_images(args, model, prep, explainers, target, paths)


def _attribute_images(args, model, prep, explainers, target, paths) -> int:
    """Write the overlays of every image; returns the exit code."""
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from .adapters.hf import hf_logits
    from .data import load_image
    from .models import DEFAULT_MODEL, EMBEDDED_MODELS

    out = Path(args.out)
    failures, records, warned = 0, [], False
    embedded = DEFAULT_MODEL if args.model == "default" else args.model
    embedded = embedded if embedded in EMBEDDED_MODELS else None
    pairs = list(zip(paths, output_stems(paths), strict=True))
    for path, stem in tqdm(pairs, desc="images", disable=len(paths) < 2):
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
                "its predictions mean little. Use --model NAME --weights FILE for your own "
                "model.",
                file=sys.stderr,
            )
            warned = True
        x = prep(image).unsqueeze(0)
        with torch.no_grad():
            probs = hf_logits(model(x)).softmax(-1)[0]  # Hugging Face outputs: .logits
        predicted = int(probs.argmax())
        chosen = predicted if target is None else target
        try:
            maps = {e.name: e.maps(x, chosen) for e in explainers}
        except (ValueError, TypeError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            failures += 1
            continue
        titles = (
            f"target {prep.class_name(chosen)}\npred {prep.class_name(predicted)} "
            f"({probs[predicted]:.2f})",
            f"one panel per layer; the maps explain the target ({prep.class_name(chosen)})",
        )
        box = prep.crop_box(*image.size)
        record = _write_maps(args, out, stem, image, box, explainers, maps, titles)
        top = probs.topk(min(5, probs.numel()))
        record.update(
            image=str(path),
            name=stem,
            top5=[
                dict(index=int(i), name=prep.class_name(int(i)), probability=round(float(p), 6))
                for p, i in zip(top.values, top.indices, strict=True)
            ],
            target=dict(index=chosen, name=prep.class_name(chosen)),
            methods=[e.name for e in explainers],
            layer=args.layer,
        )
        records.append(record)
        print(
            f"{path}: predicted {prep.class_name(predicted)} ({probs[predicted]:.2f}), "
            f"target {prep.class_name(chosen)} -> {', '.join(record.pop('written'))}"
        )
    if args.save_maps:
        (out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
        print(f"wrote {len(records)} predictions and raw maps (.npy) to {out}")
    return 1 if failures else 0


def _write_maps(args, out: Path, stem: str, image, box, explainers, maps, titles) -> dict:
    """Overlays, per-layer panels (and ``.npy`` maps) of one image; its record's map fields.

    Args:
        args: The parsed ``attribute`` arguments.
        out: The output folder.
        stem: The image's output name.
        image: The (downscaled) photo.
        box: The region of the photo that the model saw.
        explainers: The :class:`_Explainer` of every method.
        maps: ``{method: (single map or None, per-layer maps or None)}``.
        titles: ``(row title, caption)`` of the per-layer panels.
    """
    import numpy as np

    from .visualize import (
        display_range,
        image_to_uint8,
        overlay,
        saliency_grid,
        save_figure,
        with_colorbar,
    )

    rgb = image_to_uint8(np.asarray(image))
    written, scaling, files, layer_files = [], {}, {}, {}
    for explainer in explainers:
        name = explainer.name
        single, per_layer = maps[name]
        if single is not None:
            heat = overlay(rgb, single, args.colormap, box=box)
            _write_png(out / f"{stem}_{name}.png", with_colorbar(heat, single, args.colormap))
            written.append(f"{stem}_{name}.png")
            scaling[name] = display_range(single)[2]
            if args.save_maps:
                files[name] = f"{stem}_{name}.npy"
                np.save(out / files[name], single.cpu().numpy().astype(np.float32))
        if per_layer is not None:
            labels = [label for label, _ in explainer.panels]
            columns = {label: per_layer[k][None] for k, label in enumerate(labels)}
            row, caption = titles
            figure = saliency_grid([rgb], columns, [row], args.colormap, boxes=[box],
                                   caption=f"{name}: {caption}")  # fmt: skip
            save_figure(figure, out / f"{stem}_{name}_layers.png")
            written.append(f"{stem}_{name}_layers.png")
            if args.save_maps:
                layer_files[name] = dict(file=f"{stem}_{name}_layers.npy", layers=labels)
                array = per_layer.cpu().numpy().astype(np.float32)
                np.save(out / layer_files[name]["file"], array)
    return dict(written=written, overlay_scaling=scaling, maps=files or None,
                layer_maps=layer_files or None)  # fmt: skip


def _write_png(path: Path, rgb) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


# -------------------------------------------------------------------------------------- sanity
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
        return _error(error)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sanity.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "sanity.txt").write_text(f"{result}\n")
    save_figure(result.plot(), out / "sanity.png")
    print(result)
    print(f"wrote {out}/sanity.json, sanity.txt, sanity.png")
    return 0


def benchmark(args: argparse.Namespace) -> int:
    """``benchmark``: see :func:`~class_space_saliency.evaluation.cli.run_benchmark_command`."""
    from .evaluation.cli import run_benchmark_command

    return run_benchmark_command(args)


# -------------------------------------------------------------------------------------- parser
class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser; with ``register``, a deferred one.

    ``register(subparsers)`` adds the real parser (``analysis.cli``'s ``analyze``, ...) and
    imports what it needs; it runs when the command is used, not when ``--help`` lists the
    commands, so the list costs no heavy import.
    """

    def __init__(self, *args: Any, register: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._register = register

    def parse_known_args(self, args=None, namespace=None):
        if self._register is None:
            return super().parse_known_args(args, namespace)
        holder = argparse.ArgumentParser(prog=self.prog.rsplit(" ", 1)[0]).add_subparsers()
        real = self._register(holder)
        return real.parse_known_args(args, namespace)


def _register_analyze(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .analysis.cli import add_analyze_command

    return add_analyze_command(subparsers, HelpFormatter)


def _register_reproduce(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .reproduce.cli import add_reproduce_command

    return add_reproduce_command(subparsers, HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``class-space-saliency`` (standard library only)."""
    parser = argparse.ArgumentParser(
        prog="class-space-saliency",
        description="Explain Vision Transformers in their class embedding space.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

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
        choices=EMBEDDED_MODELS,
        help="embedded model: fashion-scenes (natural backgrounds, the default) or fashion "
        "(black backgrounds: shows class space's failure mode on content-free regions)",
    )
    demo_methods = dict.fromkeys((*DEMO_METHODS, *sorted((*SANITY_METHODS, "random"))))
    add_methods_argument(demo_parser, list(demo_methods), "methods for the side-by-side figure")
    demo_parser.set_defaults(func=demo)

    attr = commands.add_parser(
        "attribute",
        help="saliency overlays (and raw maps) for your own images",
        formatter_class=HelpFormatter,
        description=(
            "Overlays of saliency maps on your images: the whole photo, with the map on the "
            "region the model saw (centre crop of timm and torchvision models) and a colour "
            "bar. Layers are "
            "numbered from 0 (first block); negative numbers count from the last block. "
            "Several layers (0,2,5 or all) give one panel per layer "
            "(IMAGE_METHOD_layers.png), and the combined map where the method has one."
        ),
        epilog=(
            "examples:\n"
            "  class-space-saliency attribute photos/ --model vit_small_patch16_224 "
            "--weights pets.pth --class-names pets.txt --target tabby --methods class_space "
            "chefer --save-maps --out maps/\n"
            "  class-space-saliency attribute cat.jpg --model hf:google/vit-base-patch16-224 "
            "--layer all\n"
            "  class-space-saliency attribute cat.jpg --model torchvision:resnet50 "
            "--weights r50.pth --methods gradcam sobel --layer layer4"
        ),
    )
    attr.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...) and/or folders")
    attr.add_argument(
        "--model",
        default="default",
        help="'default', an embedded model, a .json config, a timm name, torchvision:NAME, "
        "hf:ORG/NAME or hf:FOLDER, open_clip:ARCH[:TAG]",
    )
    attr.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="local weights (state dict) of a timm, torchvision or open_clip model "
        "(without: pretrained weights, which need the network)",
    )
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
        type=layer_spec,
        default=None,
        help="block(s) from 0: -1, 0,2,5 or all (several: one panel per layer); for gradcam "
        "also module names, e.g. layer4 on a CNN (default: each method's own)",
    )
    add_methods_argument(attr, ["class_space"], "methods")
    attr.add_argument(
        "--colormap",
        default="jet",
        metavar="NAME",
        help=f"an OpenCV colormap, e.g. {', '.join(COLORMAP_EXAMPLES)}",
    )
    attr.add_argument("--out", default="saliency_out", help="output folder")
    attr.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each raw map (.npy, float32, model-input size) and predictions.json",
    )
    attr.add_argument(
        "--max-size",
        type=positive_int,
        default=1024,
        help="downscale larger images to this longest side (pixels) for the output",
    )
    attr.set_defaults(func=attribute)

    check = commands.add_parser(
        "sanity",
        help="cascading randomisation sanity check (Adebayo et al. 2018)",
        formatter_class=HelpFormatter,
        epilog="example:\n  class-space-saliency sanity --num-images 100 --methods class_space",
    )
    add_methods_argument(check, SANITY_METHODS, "methods to check")
    check.add_argument("--num-images", type=int, default=100, help="the first N evaluation images")
    check.add_argument(
        "--model", default=DEFAULT_MODEL, choices=EMBEDDED_MODELS, help="embedded model"
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation")
    check.add_argument("--out", default="sanity_out", help="output folder")
    check.set_defaults(func=sanity)

    add_benchmark_parser(commands, benchmark)
    commands.add_parser(
        "analyze",
        help="the paper's analyses of a model (identifiability, knock-outs, context, ...)",
        register=_register_analyze,
    )
    commands.add_parser(
        "reproduce",
        help="the paper's analyses and token-removal test on its seven models, one report",
        register=_register_reproduce,
    )
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
