"""Model loading: the embedded Fashion-MNIST ViT, any timm model, and their preprocessing."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from .classes import class_index, imagenet_class_names, read_class_names
from .clip import zero_shot_clip  # noqa: F401  (re-exported: models.zero_shot_clip)
from .hub import WeightsUnavailableError, cached_only_when_offline, unavailable_reason

ASSETS = Path(__file__).parent / "assets"
#: The embedded models by name: their JSON config (weights next to it, ``.safetensors``).
EMBEDDED_MODELS = {
    "fashion-scenes": ASSETS / "fashion_scenes_vit.json",
    "fashion": ASSETS / "fashion_vit.json",
}
DEFAULT_MODEL = "fashion-scenes"


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its images: size, normalisation and class names.

    Calling it turns a PIL image, a uint8/float array or a [0, 1] tensor into the model's
    normalised (C, H, W) float tensor. Without a ``transform``, images are converted to the
    model's channel count (grey replicated to RGB, RGB averaged to grey) and resized to the
    input size (bilinear, whole image, no crop).

    Attributes:
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.
        input_size: (C, H, W) the model expects.
        class_names: Names of the classes, where known.
        transform: Optional PIL -> tensor transform (timm's eval transform) used instead.
        crop_pct: With ``transform``: timm's centre-crop fraction (the shorter side is
            resized to ``H / crop_pct``, then the centre (H, W) is cropped); ``None`` for a
            transform that keeps the whole image.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None
    transform: Callable | None = None
    crop_pct: float | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (..., C, H, W) -> normalised model inputs."""
        return (images - self._stat(self.mean, images)) / self._stat(self.std, images)

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised model inputs (..., C, H, W) -> [0, 1] images (not clipped)."""
        return inputs * self._stat(self.std, inputs) + self._stat(self.mean, inputs)

    @staticmethod
    def _stat(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocess one image into a normalised (C, H, W) float tensor."""
        channels, height, width = self.input_size
        if self.transform is not None:
            return self.transform(_to_pil(image).convert("RGB"))
        pil = _to_pil(image).convert("RGB" if channels == 3 else "L")
        pil = pil.resize((width, height), Image.BILINEAR)
        array = np.asarray(pil, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).reshape(height, width, -1).permute(2, 0, 1)
        return self.normalize(tensor)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region ``(left, top, right, bottom)`` of a ``width`` x ``height`` image that
        the model sees after preprocessing (the whole image unless a centre crop is used).

        Example:
            >>> prep = Preprocessing((0.5,) * 3, (0.5,) * 3, (3, 224, 224),
            ...                      transform=lambda image: image, crop_pct=0.875)  # timm's
            >>> prep.crop_box(640, 480)  # shorter side to 256, then the centre 224 x 224
            (110.0, 30.0, 530.0, 450.0)
        """
        if self.transform is None or self.crop_pct is None:
            return (0.0, 0.0, float(width), float(height))
        _, crop_h, crop_w = self.input_size
        scale = math.floor(min(crop_h, crop_w) / self.crop_pct) / min(width, height)
        box_w, box_h = crop_w / scale, crop_h / scale
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return (left, top, left + box_w, top + box_h)

    def class_name(self, index: int) -> str:
        """Name of class ``index`` (its number where names are unknown)."""
        if self.class_names is None or not 0 <= index < len(self.class_names):
            return str(index)
        return self.class_names[index]

    def class_index(self, name_or_index: str | int) -> int:
        """Class index from a number, a name or one synonym of a name (case-insensitive).

        ImageNet descriptions list synonyms: ``"tabby"`` finds ``"tabby, tabby cat"``.

        Raises:
            ValueError: For an unknown or ambiguous name (candidates listed, at most 10), or
                a number outside the known classes.
        """
        return class_index(name_or_index, self.class_names)


def _to_pil(image: Image.Image | np.ndarray | torch.Tensor) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                "float images must be in [0, 1]; denormalise model inputs first "
                "(Preprocessing.denormalize) or pass uint8"
            )
        array = (array * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def load_default(
    name: str = DEFAULT_MODEL, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Preprocessing]:
    """One of the embedded ViTs, in eval mode, with its preprocessing.

    Args:
        name: ``"fashion-scenes"`` (default: Fashion-MNIST objects on natural photos, 32x32
            RGB) or ``"fashion"`` (plain Fashion-MNIST, 28x28, black background).
        device: Where to put the model.

    Returns:
        ``(model in eval mode, Preprocessing)``.

    Raises:
        ValueError: For an unknown name (the message lists the embedded names).

    Example:
        >>> model, preprocessing = load_default()
        >>> preprocessing.input_size, preprocessing.class_names[0]
        ((3, 32, 32), 'T-shirt/top')
    """
    return _load_config(_embedded_config(name), device)


def embedded_preprocessing(name: str = DEFAULT_MODEL) -> Preprocessing:
    """The preprocessing of an embedded model, without loading its weights."""
    return _config_preprocessing(json.loads(_embedded_config(name).read_text()))


def _embedded_config(name: str) -> Path:
    """The JSON config of the embedded model ``name``; ValueError listing the names."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"name must be one of {list(EMBEDDED_MODELS)} (embedded models), got {name!r}"
        )
    return EMBEDDED_MODELS[name]


def _config_preprocessing(config: dict) -> Preprocessing:
    return Preprocessing(
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        input_size=tuple(config["input_size"]),
        class_names=tuple(config["class_names"]),
    )


def _load_config(config_path: Path, device: str | torch.device) -> tuple[nn.Module, Preprocessing]:
    from safetensors.torch import load_file

    config = json.loads(Path(config_path).read_text())
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **config["kwargs"])
    weights = Path(config_path).with_suffix(".safetensors")
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), _config_preprocessing(config)


def load_model(
    name_or_path: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    prompts: Sequence[str] | None = None,
) -> tuple[nn.Module, Preprocessing]:
    """Load a model and its preprocessing.

    Args:
        name_or_path: ``"default"`` (the default embedded model), an embedded model's name
            (``"fashion-scenes"``, ``"fashion"``), a JSON config written by
            ``benchmarks/train_default_model.py`` (weights next to it), a timm model name,
            ``"hf:ORG/NAME"`` (a Hugging Face hub image classifier, needs the network, or
            ``"hf:FOLDER"`` saved with ``save_pretrained``), ``"torchvision:NAME"`` (a
            torchvision classifier, see :func:`~class_space_saliency.hub.load_torchvision`)
            or ``"open_clip:ARCH[:TAG]"`` (a CLIP zero-shot classifier over ``prompts``; the
            tag's weights need the network, or pass ``weights``).
        weights: For timm and torchvision names: a local ``.safetensors``/``.pth`` state
            dict, e.g. your own fine-tuned checkpoint. Without it, pretrained weights are
            downloaded (needs the network; offline, cached weights load at once and others
            fail at once, without the hub's minute of retries).
        device: Where to put the model.
        num_classes: Classes of the head. Default: inferred from ``weights`` (the shape of
            its head), else from ``class_names``, else the model's default (1000 for timm).
        class_names: Names of the classes in index order, or a text file with one per line.
        prompts: For ``open_clip:`` models: the text prompts that are the classes.
            Default: the ImageNet names for a 1000-class timm model, else none (numbers).

    Returns:
        ``(model in eval mode, Preprocessing)``.

    Raises:
        ValueError: For an unknown name, or weights, ``num_classes`` and ``class_names``
            that disagree.
        FileNotFoundError: For a missing weights or class-names file.
        WeightsUnavailableError: (a ``RuntimeError``) If pretrained weights cannot be
            downloaded (offline) and no ``weights`` file was given.

    Example:
        >>> import timm
        >>> pets = timm.create_model("vit_tiny_patch16_224", num_classes=37)  # a fine-tune
        >>> torch.save(pets.state_dict(), "pets.pth")
        >>> model, prep = load_model("vit_tiny_patch16_224", weights="pets.pth")
        >>> model.num_classes, prep.input_size
        (37, (3, 224, 224))
    """
    if isinstance(class_names, (str, Path)):
        class_names = read_class_names(class_names)
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name_or_path.startswith("open_clip:"):  # CLIP zero-shot (optional extra)
        from .hub import load_open_clip

        return load_open_clip(name_or_path.removeprefix("open_clip:"), prompts, weights, device)
    if name_or_path.startswith("hf:"):  # Hugging Face hub (optional extra)
        from .hub import load_hf

        return load_hf(name_or_path[3:], device)
    if name_or_path.startswith("torchvision:"):
        from .hub import load_torchvision

        name = name_or_path.removeprefix("torchvision:")
        return load_torchvision(
            name, weights, device, num_classes=num_classes, class_names=class_names
        )
    if name_or_path in ("default", *EMBEDDED_MODELS) or name_or_path.endswith(".json"):
        model, preprocessing = (
            _load_config(Path(name_or_path), device)
            if name_or_path.endswith(".json")
            else load_default(DEFAULT_MODEL if name_or_path == "default" else name_or_path, device)
        )
        _check_class_count(len(preprocessing.class_names), num_classes, class_names, "the model")
        if class_names is not None:
            preprocessing = dataclasses.replace(preprocessing, class_names=class_names)
        return model, preprocessing
    if not timm.is_model(name_or_path):
        raise ValueError(
            f"model must be 'default', one of {list(EMBEDDED_MODELS)}, a .json config or a "
            f"timm model name, got "
            f"{name_or_path!r} (see timm.list_models())"
        )
    if weights is not None:
        state, options = read_checkpoint(weights, num_classes, class_names)
        model = timm.create_model(name_or_path, pretrained=False, **options)
        _load_state(model, state, name_or_path, Path(weights))
    else:
        count = num_classes or (len(class_names) if class_names else None)
        _check_class_count(count, num_classes, class_names, "num_classes")
        options = {} if count is None else {"num_classes": count}
        with cached_only_when_offline() as offline:
            try:
                model = timm.create_model(name_or_path, pretrained=True, **options)
            except Exception as error:  # network or hub failures surface as many types
                raise WeightsUnavailableError(
                    name_or_path,
                    unavailable_reason(offline, error),
                    f"could not fetch pretrained weights for {name_or_path!r} "
                    f"({unavailable_reason(offline, error)}); pass weights=PATH to a local "
                    "state dict",
                ) from error
    config = timm.data.resolve_data_config({}, model=model)
    if class_names is None and getattr(model, "num_classes", None) == 1000:
        class_names = imagenet_class_names()
    preprocessing = Preprocessing(
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        input_size=tuple(config["input_size"]),
        class_names=class_names,
        transform=timm.data.create_transform(**config),
        crop_pct=config.get("crop_pct") if config.get("crop_mode", "center") == "center" else None,
    )
    return model.to(device).eval(), preprocessing


def _check_class_count(
    found: int | None,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    source: str,
) -> None:
    """Raise ValueError where ``num_classes`` or ``class_names`` contradict ``found``."""
    if found is not None and num_classes is not None and found != num_classes:
        raise ValueError(f"{source} has {found} classes, but num_classes={num_classes}")
    expected = found or num_classes
    if class_names is not None and expected is not None and len(class_names) != expected:
        raise ValueError(
            f"{len(class_names)} class names given, but {source} has {expected} classes"
        )


def read_checkpoint(
    weights: str | Path,
    num_classes: int | None,
    class_names: Sequence[str] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A local state dict and the ``num_classes`` option its head implies.

    Raises:
        FileNotFoundError: For a missing file.
        ValueError: Where the head, ``num_classes`` and ``class_names`` disagree.
    """
    state = _read_state_dict(Path(weights))
    head = _head_classes(state)
    _check_class_count(head, num_classes, class_names, f"the checkpoint {weights}")
    count = head or num_classes or (len(class_names) if class_names else None)
    return state, ({} if count is None else {"num_classes": count})


def _head_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of a checkpoint's head (timm ``head.weight`` / ``head.fc.weight``,
    torchvision ``fc.weight`` / ``heads.head.weight``)."""
    heads = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "heads.head.weight")
    for key in heads:
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """``load_state_dict`` with a short error naming a few mismatched keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if problems:
        raise ValueError(f"weights {path} do not fit the model {name!r}: {'; '.join(problems)}")
    model.load_state_dict(state)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state))
