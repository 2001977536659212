"""Model loading: the embedded Fashion-MNIST ViT, any timm model, and their preprocessing."""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .classes import imagenet_class_names, read_class_names
from .clip import zero_shot_clip  # noqa: F401  (re-exported: models.zero_shot_clip)
from .hub import (
    WeightsUnavailableError,
    cached_only_when_offline,
    hub_unreachable,
    unavailable_reason,
)
from .paper import (
    PAPER_MODELS,
    PaperModel,
    paper_model,
    paper_model_of_architecture,
    paper_weights_warning,
)
from .preprocessing import Preprocessing, timm_preprocessing  # also models.Preprocessing

ASSETS = Path(__file__).parent / "assets"
#: The embedded models by name: their JSON config (weights next to it, ``.safetensors``).
EMBEDDED_MODELS = {
    "fashion-scenes": ASSETS / "fashion_scenes_vit.json",
    "fashion": ASSETS / "fashion_vit.json",
}
DEFAULT_MODEL = "fashion-scenes"


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


PREPROCESSINGS = ("model", "paper")
"""Named preprocessings: the model library's own eval transform, or the paper's official one."""

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
"""Key prefixes that training wrappers add (DataParallel, Lightning-style ``self.model``,
``torch.compile``); stripped when every key of a checkpoint carries one."""


def load_model(
    name_or_path: str,
    weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | Path | None = None,
    prompts: Sequence[str] | None = None,
    preprocessing: str | None = None,
) -> tuple[nn.Module, Preprocessing]:
    """Load a model and its preprocessing.

    Args:
        name_or_path: ``"default"`` (the default embedded model), an embedded model's name
            (``"fashion-scenes"``, ``"fashion"``), a JSON config written by
            ``benchmarks/train_default_model.py`` (weights next to it), a timm model name
            (optionally ``"timm:NAME"``), ``"paper:KEY"`` (one of the paper's seven models,
            :data:`~class_space_saliency.paper.PAPER_MODELS`, see :func:`load_paper_model`),
            ``"hf:ORG/NAME"`` (a Hugging Face hub image classifier, needs the network, or
            ``"hf:FOLDER"`` saved with ``save_pretrained``), ``"torchvision:NAME"`` (a
            torchvision classifier, see :func:`load_torchvision`)
            or ``"open_clip:ARCH[:TAG]"`` (a CLIP zero-shot classifier over ``prompts``; the
            tag's weights need the network, or pass ``weights``).
        weights: For timm and torchvision names: a local ``.safetensors``/``.pth`` state dict
            (or the dict itself), e.g. your own fine-tuned checkpoint; a key prefix of
            :data:`WRAPPER_PREFIXES` on every key is stripped. Without it, pretrained weights
            are downloaded (needs the network; offline, cached weights load at once and others
            fail at once, without the hub's minute of retries); a bare name that timm resolves
            to other weights than the paper's for that architecture warns.
        device: Where to put the model.
        num_classes: Classes of the head. Default: inferred from ``weights`` (the shape of
            its head), else from ``class_names``, else the model's default (1000 for timm).
        class_names: Names of the classes in index order, or a text file with one per line.
        prompts: For ``open_clip:`` models: the text prompts that are the classes.
            Default: the ImageNet names for a 1000-class timm model, else none (numbers).
        preprocessing: One of :data:`PREPROCESSINGS`: ``"model"``, the model library's own
            eval transform (timm's data config), or ``"paper"``, the official code's (for
            ``paper:`` models and timm names of the paper's architectures). Default:
            ``"paper"`` for ``paper:`` models, else ``"model"``.

    Returns:
        ``(model in eval mode, Preprocessing)``.

    Raises:
        ValueError: For an unknown name or preprocessing, ``"paper"`` preprocessing of a
            model the paper did not use, or weights, ``num_classes`` and ``class_names``
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
    if preprocessing not in (None, *PREPROCESSINGS):
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
    if isinstance(class_names, (str, Path)):
        class_names = read_class_names(class_names)
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name_or_path.startswith("paper:"):
        spec = paper_model(name_or_path.removeprefix("paper:"))
        _check_class_count(spec.num_classes, num_classes, class_names, spec.name)
        return load_paper_model(
            spec, weights, device, preprocessing=preprocessing or "paper", class_names=class_names
        )
    name = name_or_path.removeprefix("timm:")
    if preprocessing == "paper" and paper_model_of_architecture(name) is None:
        raise ValueError(
            f"preprocessing='paper' is the official code's for the paper's models, and "
            f"{name_or_path!r} is not one of their timm architectures; load 'paper:KEY' "
            f"(one of {list(PAPER_MODELS)}) or use preprocessing='model'"
        )
    if name_or_path.startswith("open_clip:"):  # CLIP zero-shot (optional extra)
        from .hub import load_open_clip

        return load_open_clip(name_or_path.removeprefix("open_clip:"), prompts, weights, device)
    if name_or_path.startswith("hf:"):  # Hugging Face hub (optional extra)
        from .hub import load_hf

        return load_hf(name_or_path[3:], device)
    if name_or_path.startswith("torchvision:"):
        return load_torchvision(
            name_or_path.removeprefix("torchvision:"),
            weights,
            device,
            num_classes=num_classes,
            class_names=class_names,
        )
    if name_or_path in ("default", *EMBEDDED_MODELS) or name_or_path.endswith(".json"):
        model, prep = (
            _load_config(Path(name_or_path), device)
            if name_or_path.endswith(".json")
            else load_default(DEFAULT_MODEL if name_or_path == "default" else name_or_path, device)
        )
        _check_class_count(len(prep.class_names), num_classes, class_names, "the model")
        if class_names is not None:
            prep = dataclasses.replace(prep, class_names=class_names)
        return model, prep
    if not timm.is_model(name):
        raise ValueError(
            f"model must be 'default', one of {list(EMBEDDED_MODELS)}, a .json config, "
            f"'paper:KEY' or a timm model name, got {name_or_path!r} (see timm.list_models())"
        )
    if weights is not None:
        state, count = read_checkpoint(weights, num_classes, class_names)
        model = _timm_model(name, state, count, _source(weights))
    else:
        count = num_classes or (len(class_names) if class_names else None)
        _check_class_count(count, num_classes, class_names, "num_classes")
        warning = paper_weights_warning(name)
        if warning is not None:
            warnings.warn(warning, UserWarning, stacklevel=2)
        model = _timm_model(name, None, count)
    if class_names is None and getattr(model, "num_classes", None) == 1000:
        class_names = imagenet_class_names()
    if preprocessing == "paper":
        prep = paper_model_of_architecture(name).preprocessing.build(class_names)
    else:
        prep = _model_preprocessing(model, class_names)
    return model.to(device).eval(), prep


def load_torchvision(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
):
    """A torchvision classifier and its preprocessing (``load_model("torchvision:NAME")``).

    Args:
        name: A name of ``torchvision.models.list_models()``, e.g. ``"vit_b_16"`` or
            ``"resnet50"``.
        weights: A local state dict (``.pth``/``.safetensors``); the number of classes is
            read from its head. Without it, torchvision's ``DEFAULT`` weights download
            (needs the network).
        device: Where to put the model.
        num_classes: Classes of the head, where no checkpoint says.
        class_names: Names of the classes (default: the weights' categories, or ImageNet's
            for a 1000-class head).

    Returns:
        ``(model in eval mode, Preprocessing)``: the weights' own transform (resize, centre
        crop, normalisation), or for a local checkpoint torchvision's ImageNet recipe (resize
        to ``size / 0.875``, centre crop ``size``, ImageNet mean and std), where ``size`` is
        the model's ``image_size`` (ViT) or 224.

    Raises:
        ValueError: For an unknown name or a checkpoint that does not fit.
        WeightsUnavailableError: (a ``RuntimeError``) If the DEFAULT weights cannot be
            fetched.

    Example:
        >>> import torchvision
        >>> resnet = torchvision.models.resnet18(num_classes=3)  # your fine-tune
        >>> torch.save(resnet.state_dict(), "resnet3.pth")
        >>> model, prep = load_torchvision("resnet18", weights="resnet3.pth")
        >>> model.fc.out_features, prep.input_size, prep.crop_pct
        (3, (3, 224, 224), 0.875)
    """
    import torchvision
    from torchvision import transforms

    if name not in torchvision.models.list_models():
        raise ValueError(
            f"unknown torchvision model {name!r} (see torchvision.models.list_models())"
        )
    if weights is not None:
        state, count = read_checkpoint(weights, num_classes, class_names)
        options = {} if count is None else {"num_classes": count}
        model = torchvision.models.get_model(name, weights=None, **options)
        _load_state(model, state, f"torchvision:{name}", str(weights))
        size = getattr(model, "image_size", 224)
        resize, mean, std = int(size / 0.875), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    else:
        default = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir(), "checkpoints", Path(default.url).name).is_file()
        offline = None if cached else hub_unreachable(urlparse(default.url).hostname)
        try:
            if offline is not None:
                raise ConnectionError(offline)
            model = torchvision.models.get_model(name, weights=default)
        except Exception as error:  # network and hub failures surface as many types
            reason = unavailable_reason(offline, error)
            raise WeightsUnavailableError(
                f"torchvision:{name}",
                reason,
                f"could not fetch the weights of torchvision {name!r} ({reason}); "
                "pass weights=PATH to a local state dict",
            ) from error
        preset = default.transforms()
        size, resize = preset.crop_size[0], preset.resize_size[0]
        mean, std = tuple(preset.mean), tuple(preset.std)
        class_names = class_names or default.meta.get("categories")
    classes = getattr(model, "num_classes", None) or _head_classes(model.state_dict())
    if class_names is None and classes == 1000:
        class_names = imagenet_class_names()
    preprocessing = Preprocessing(
        mean=mean,
        std=std,
        input_size=(3, size, size),
        class_names=None if class_names is None else tuple(class_names),
        transform=transforms.Compose(
            [
                transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
        crop_pct=size / resize,
    )
    return model.to(device).eval(), preprocessing


def load_paper_model(
    key: str | PaperModel,
    weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    *,
    preprocessing: str = "paper",
    class_names: Sequence[str] | None = None,
) -> tuple[nn.Module, Preprocessing]:
    """One of the paper's seven models, with the official code's preprocessing.

    The five timm models load their pinned weights (``vit_base_patch16_224.augreg_in21k_ft_in1k``
    ...; timm downloads them). The CIFAR-100 model loads from the checkpoint the user
    supplies (``weights``); its ``model.`` key prefix is stripped. The Refinement model
    downloads the checkpoint the official code loads (or takes ``weights``); the keys of its
    refinement heads, which neither the official forward nor the class-space analysis uses,
    are dropped. ``weights`` also loads a local copy of a timm model's weights (offline use).

    Args:
        key: A key of :data:`~class_space_saliency.paper.PAPER_MODELS` (``"vit_b_32"``, ...),
            or a :class:`~class_space_saliency.paper.PaperModel`.
        weights: Checkpoint file (``.pth``/``.pt``/``.safetensors``) or state dict.
        device: Where to put the model.
        preprocessing: ``"paper"`` (the official code's) or ``"model"`` (timm's).
        class_names: Names of the classes; default: ImageNet's for the 1000-class models.

    Returns:
        ``(model in eval mode, Preprocessing)``.

    Raises:
        ValueError: For an unknown key or preprocessing, a checkpoint that does not fit, or
            a model whose checkpoint must be supplied and ``weights=None``.
        RuntimeError: If weights cannot be downloaded.

    Example:
        >>> model, prep = load_paper_model("vit_b_32")  # doctest: +SKIP
        >>> load_paper_model("vit_cifar_16")  # the authors' checkpoint  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ViT-B/16 (CIFAR-100) is not in timm: pass weights=PATH to its checkpoint ...
    """
    spec = key if isinstance(key, PaperModel) else paper_model(key)
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
    prefixes = (spec.key_prefix, *WRAPPER_PREFIXES) if spec.key_prefix else WRAPPER_PREFIXES
    if weights is not None:
        state, source = _read_state_dict(weights, prefixes), _source(weights)
    elif spec.tag is not None:
        state, source = None, spec.timm_name
    elif spec.checkpoint_url is not None:
        state, source = _download_state_dict(spec.checkpoint_url, prefixes), spec.checkpoint_url
    else:
        raise ValueError(
            f"{spec.name} is not in timm: pass weights=PATH to its checkpoint "
            f"{spec.checkpoint} ({spec.note})"
        )
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_keys)}
        model = _timm_model(spec.architecture, state, spec.num_classes, source)
    else:
        model = _timm_model(spec.timm_name, None, None)
    names = class_names or (imagenet_class_names() if spec.num_classes == 1000 else None)
    _check_class_count(spec.num_classes, None, names, spec.name)
    if preprocessing == "paper":
        prep = spec.preprocessing.build(names)
    else:
        prep = _model_preprocessing(model, names)
    return model.to(device).eval(), prep


def _timm_model(
    name: str, state: dict[str, torch.Tensor] | None, num_classes: int | None, source: str = ""
) -> nn.Module:
    """timm model ``name`` with ``state`` loaded, or timm's pretrained weights (``None``)."""
    options = {} if num_classes is None else {"num_classes": num_classes}
    if state is not None:
        model = timm.create_model(name, pretrained=False, **options)
        _load_state(model, state, name, source)
        return model
    with cached_only_when_offline() as offline:
        try:
            return timm.create_model(name, pretrained=True, **options)
        except Exception as error:  # network or hub failures surface as many types
            reason = unavailable_reason(offline, error)
            raise WeightsUnavailableError(
                name,
                reason,
                f"could not fetch pretrained weights for {name!r} ({reason}); pass "
                "weights=PATH to a local state dict",
            ) from error


def _model_preprocessing(model: nn.Module, class_names: Sequence[str] | None) -> Preprocessing:
    """timm's eval transform for ``model`` (its pretrained config)."""
    config = timm.data.resolve_data_config({}, model=model)
    return timm_preprocessing(
        config["input_size"],
        config["mean"],
        config["std"],
        crop_pct=config["crop_pct"],
        crop_mode=config.get("crop_mode") or "center",
        interpolation=config["interpolation"],
        class_names=class_names,
    )


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
    weights: str | Path | Mapping[str, torch.Tensor],
    num_classes: int | None,
    class_names: Sequence[str] | None,
) -> tuple[dict[str, torch.Tensor], int | None]:
    """A local state dict and the number of classes its head implies (else ``num_classes``,
    else the number of ``class_names``, else ``None``).

    Raises:
        FileNotFoundError: For a missing file.
        ValueError: Where the head, ``num_classes`` and ``class_names`` disagree.
    """
    state = _read_state_dict(weights)
    head = _head_classes(state)
    _check_class_count(head, num_classes, class_names, f"the checkpoint {_source(weights)}")
    return state, head or num_classes or (len(class_names) if class_names else None)


def _head_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of a checkpoint's head (timm ``head.weight`` / ``head.fc.weight``,
    torchvision ``fc.weight`` / ``heads.head.weight``)."""
    heads = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight", "heads.head.weight")
    for key in heads:
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
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
        raise ValueError(f"weights {source} do not fit the model {name!r}: {'; '.join(problems)}")
    model.load_state_dict(state)


def _source(weights: str | Path | Mapping) -> str:
    """How to name ``weights`` in messages."""
    return "(state dict)" if isinstance(weights, Mapping) else str(weights)


def _read_state_dict(
    weights: str | Path | Mapping[str, torch.Tensor], prefixes: Sequence[str] = WRAPPER_PREFIXES
) -> dict[str, torch.Tensor]:
    """The state dict in a file (or given), unwrapped and without a prefix every key carries."""
    if isinstance(weights, Mapping):
        return _unwrap(weights, prefixes)
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path)), prefixes)
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), prefixes)
    except pickle.UnpicklingError as error:
        raise ValueError(_UNSAFE_CHECKPOINT.format(source=path, error=error)) from error


_UNSAFE_CHECKPOINT = (
    "{source} holds Python objects besides tensors, which torch.load(weights_only=True) "
    "refuses ({error}); if you trust the file, load it yourself with "
    "torch.load(path, weights_only=False) and pass its state dict as weights="
)


def _download_state_dict(url: str, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """A checkpoint from ``url`` (cached in torch's hub folder), unwrapped as above."""
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(_UNSAFE_CHECKPOINT.format(source=url, error=error)) from error
    except Exception as error:  # network failures surface as many types
        raise RuntimeError(
            f"could not download {url} ({error}); download it yourself and pass weights=PATH"
        ) from error
    return _unwrap(state, prefixes)


def _unwrap(state: Mapping, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its ``state_dict``/``model`` entry where it has
    one, then without a prefix of ``prefixes`` that every key carries (repeatedly:
    ``module.model.``)."""
    state = dict(state.get("state_dict", state.get("model", state)))
    while state:
        prefix = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {key[len(prefix) :]: value for key, value in state.items()}
    return state
