"""Model loading: the embedded Fashion-MNIST ViT, any timm model, and their preprocessing."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from .clip import zero_shot_clip  # noqa: F401  (re-exported: models.zero_shot_clip)

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
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None
    transform: Callable | None = None

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

    def class_name(self, index: int) -> str:
        """Name of class ``index`` (its number where names are unknown)."""
        if self.class_names is None or not 0 <= index < len(self.class_names):
            return str(index)
        return self.class_names[index]

    def class_index(self, name_or_index: str | int) -> int:
        """Class index from a name (case-insensitive) or a number.

        Raises:
            ValueError: For an unknown name, or a number outside the known classes.
        """
        if isinstance(name_or_index, int) or str(name_or_index).lstrip("-").isdigit():
            index = int(name_or_index)
            known = len(self.class_names or ())
            if known and not 0 <= index < known:
                raise ValueError(
                    f"class index {index} is out of range for {known} classes "
                    f"(valid: 0 .. {known - 1})"
                )
            return index
        names = [n.lower() for n in (self.class_names or ())]
        if name_or_index.lower() not in names:
            raise ValueError(
                f"unknown class name {name_or_index!r}; known: {list(self.class_names or [])}"
            )
        return names.index(name_or_index.lower())


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
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"name must be one of {list(EMBEDDED_MODELS)} (embedded models), got {name!r}"
        )
    return _load_config(EMBEDDED_MODELS[name], device)


def embedded_preprocessing(name: str = DEFAULT_MODEL) -> Preprocessing:
    """The preprocessing of an embedded model, without loading its weights."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"name must be one of {list(EMBEDDED_MODELS)}, got {name!r}")
    return _config_preprocessing(json.loads(EMBEDDED_MODELS[name].read_text()))


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
) -> tuple[nn.Module, Preprocessing]:
    """Load a model and its preprocessing.

    Args:
        name_or_path: ``"default"`` (the default embedded model), an embedded model's name
            (``"fashion-scenes"``, ``"fashion"``), a JSON config written by
            ``benchmarks/train_default_model.py`` (weights next to it), a timm model name,
            or ``"hf:ORG/NAME"`` (a Hugging Face hub image classifier, needs the network).
        weights: For timm names: a local ``.safetensors``/``.pth`` state dict. Without it,
            timm's pretrained weights are downloaded (needs the network).
        device: Where to put the model.

    Returns:
        ``(model in eval mode, Preprocessing)``.

    Raises:
        ValueError: For an unknown name.
        RuntimeError: If pretrained weights cannot be downloaded (offline) and no
            ``weights`` file was given.

    Example:
        >>> model, prep = load_model("vit_base_patch16_224", weights="vit_b16.safetensors")
    """
    if name_or_path == "default":
        return load_default(device=device)
    if name_or_path in EMBEDDED_MODELS:
        return load_default(name_or_path, device)
    if name_or_path.startswith("hf:"):  # Hugging Face hub (optional extra)
        from .hub import load_hf

        return load_hf(name_or_path[3:], device)
    if name_or_path.endswith(".json"):
        return _load_config(Path(name_or_path), device)
    if not timm.is_model(name_or_path):
        raise ValueError(
            f"model must be 'default', one of {list(EMBEDDED_MODELS)}, a .json config or a "
            f"timm model name, got "
            f"{name_or_path!r} (see timm.list_models())"
        )
    if weights is not None:
        model = timm.create_model(name_or_path, pretrained=False)
        model.load_state_dict(_read_state_dict(Path(weights)))
    else:
        try:
            model = timm.create_model(name_or_path, pretrained=True)
        except Exception as error:  # network or hub failures surface as many types
            raise RuntimeError(
                f"could not fetch pretrained weights for {name_or_path!r} ({error}); "
                "pass weights=PATH to a local state dict"
            ) from error
    config = timm.data.resolve_data_config({}, model=model)
    preprocessing = Preprocessing(
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        input_size=tuple(config["input_size"]),
        class_names=_imagenet_names(model),
        transform=timm.data.create_transform(**config),
    )
    return model.to(device).eval(), preprocessing


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state))


def _imagenet_names(model: nn.Module) -> tuple[str, ...] | None:
    if getattr(model, "num_classes", None) != 1000:
        return None
    info = timm.data.ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))
