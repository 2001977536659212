"""Loading hub models: Hugging Face image classifiers (``load_model("hf:ORG/NAME")``) and
open_clip zero-shot classifiers (``load_model("open_clip:ARCH:TAG", prompts=...)``), and the
offline check that spares a user the hub's minute of retries (every loader uses it).

Kept apart from :mod:`.models` so that ``transformers`` and ``open_clip_torch`` stay optional
extras (``pip install class-space-saliency[hf]`` / ``[clip]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .preprocessing import Preprocessing

HUB_HOST = "huggingface.co"
"""Where timm, transformers and open_clip download weights from."""

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched, and no local file was given.

    Attributes:
        model: The model as named to :func:`~class_space_saliency.models.load_model`.
        reason: Why, in a few words (e.g. ``"offline: HF_HUB_OFFLINE is set"``).
    """

    def __init__(self, model: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.model = model
        self.reason = reason


def hub_unreachable(host: str = HUB_HOST, timeout: float = 3.0) -> str | None:
    """Why downloads from ``host`` cannot work now, or ``None`` where they may.

    Offline when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set, or when a TCP
    connection to ``host:443`` (name lookup included) fails within ``timeout`` seconds.
    Behind a proxy (``HTTPS_PROXY``, ``ALL_PROXY``) the direct probe says nothing, so it is
    skipped.

    Args:
        host: The download host.
        timeout: Seconds to wait for the connection.

    Returns:
        A short reason (``"HF_HUB_OFFLINE is set"``, ``"huggingface.co cannot be reached"``)
        or ``None``.

    Example:
        >>> os.environ["HF_HUB_OFFLINE"] = "1"
        >>> hub_unreachable()
        'HF_HUB_OFFLINE is set'
        >>> del os.environ["HF_HUB_OFFLINE"]
    """
    for variable in _OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return None
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            reached.append(False)

    probe = threading.Thread(target=connect, daemon=True)  # the name lookup has no timeout
    probe.start()
    probe.join(timeout)
    return None if reached == [True] else f"{host} cannot be reached"


@contextlib.contextmanager
def cached_only_when_offline(host: str = HUB_HOST) -> Iterator[str | None]:
    """Within the block, ``huggingface_hub`` serves only cached files if ``host`` is offline.

    Without the network the hub retries every file for about a minute before it gives up;
    here an offline machine gets cached weights at once or fails at once. The hub's offline
    flag is restored on exit.

    Yields:
        The reason the host is offline (see :func:`hub_unreachable`), or ``None``.
    """
    reason = hub_unreachable(host)
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub downloads by URL: it fails fast
        yield reason
        return
    previous = constants.HF_HUB_OFFLINE
    if reason is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = previous


@contextlib.contextmanager
def _quiet_root_logger(quiet: bool) -> Iterator[None]:
    """Offline, open_clip logs each failed download on the root logger before it raises;
    the error raised here says it in one line."""
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def unavailable_reason(offline: str | None, error: BaseException) -> str:
    """A one-line reason: the offline cause, else the first line of ``error``."""
    if offline is not None:
        return f"offline: {offline}, and the weights are not in the local cache"
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:200]


def load_hf(name: str, device: str | torch.device = "cpu"):
    """Load a Hugging Face image classifier and its preprocessing from the hub.

    Args:
        name: Hub id, e.g. ``"google/vit-base-patch16-224"`` (``load_model`` strips ``hf:``).
        device: Where to put the model.

    Returns:
        ``(model in eval mode, Preprocessing)``; the model's forward returns an
        ``ImageClassifierOutput`` whose ``.logits`` every method reads.

    Raises:
        ImportError: If ``transformers`` is not installed.
        WeightsUnavailableError: (a ``RuntimeError``) If the model cannot be fetched
            (offline, unknown id); offline, cached models load at once.

    Example:
        >>> # (skipped: downloads the model from the Hugging Face hub)
        >>> model, prep = load_hf("facebook/deit-tiny-patch16-224")  # doctest: +SKIP
    """
    try:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
    except ImportError as error:
        raise ImportError(
            "loading 'hf:' models needs transformers: pip install class-space-saliency[hf]"
        ) from error
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a Hugging Face model id must be a non-empty string, got {name!r}")
    downloads = contextlib.nullcontext() if Path(name).is_dir() else cached_only_when_offline()
    with downloads as offline:
        try:
            model: nn.Module = AutoModelForImageClassification.from_pretrained(name)
            processor = AutoImageProcessor.from_pretrained(name)
        except Exception as error:  # offline, unknown ids and hub errors surface as many types
            raise WeightsUnavailableError(
                f"hf:{name}",
                unavailable_reason(offline, error),
                f"could not load the Hugging Face model {name!r} ({error}); the hub needs the "
                "network, or a local directory saved with save_pretrained()",
            ) from error
    size = processor.size
    height = size.get("height", size.get("shortest_edge", 224))
    width = size.get("width", size.get("shortest_edge", 224))
    labels = model.config.id2label
    preprocessing = Preprocessing(
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        input_size=(int(model.config.num_channels), int(height), int(width)),
        class_names=tuple(labels[i] for i in range(len(labels))) if labels else None,
    )
    return model.to(device).eval(), preprocessing


def load_open_clip(
    spec: str,
    prompts: Sequence[str] | None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
):
    """An open_clip model as a zero-shot classifier over ``prompts``, with its preprocessing.

    Args:
        spec: ``"ARCH"`` or ``"ARCH:TAG"`` (``load_model`` strips ``open_clip:``), e.g.
            ``"ViT-B-32:laion2b_s34b_b79k"``; the tag's weights download (needs the network).
        prompts: The classes, one text prompt each (at least two).
        weights: A local open_clip checkpoint instead of a tag.
        device: Where to put the model.

    Returns:
        ``(zero-shot classifier in eval mode, Preprocessing)`` whose class names are the
        prompts (see :func:`~class_space_saliency.models.zero_shot_clip`).

    Raises:
        ImportError: If ``open_clip_torch`` is not installed.
        ValueError: For fewer than two prompts, an unknown architecture, or neither a tag
            nor ``weights``.
        WeightsUnavailableError: (a ``RuntimeError``) If the tag's weights cannot be fetched.
        RuntimeError: If the weights file cannot be read.

    Example:
        >>> # (skipped: downloads OpenAI's CLIP weights)
        >>> model, prep = load_open_clip(  # doctest: +SKIP
        ...     "ViT-B-32:openai", ["a photo of a cat", "a dog"])
    """
    from .clip import zero_shot_clip

    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "'open_clip:' models need open_clip_torch: pip install class-space-saliency[clip]"
        ) from error
    if prompts is None or isinstance(prompts, str) or len(prompts) < 2:
        raise ValueError(f"prompts must be two or more text prompts (the classes), got {prompts!r}")
    arch, _, tag = spec.partition(":")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    pretrained = str(weights) if weights is not None else tag or None
    if pretrained is None:
        raise ValueError(f"give a pretrained tag (open_clip:{arch}:TAG) or weights=FILE")
    downloads = contextlib.nullcontext() if weights is not None else cached_only_when_offline()
    with downloads as offline, _quiet_root_logger(offline is not None):
        try:
            clip, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        except Exception as error:  # network, unknown tags and bad files surface as many types
            if weights is not None:
                raise RuntimeError(
                    f"could not load open_clip {spec!r} with {pretrained!r}: {error}"
                ) from error
            raise WeightsUnavailableError(
                f"open_clip:{spec}",
                unavailable_reason(offline, error),
                f"could not load open_clip {spec!r} with {pretrained!r}: {error}",
            ) from error
    classifier = zero_shot_clip(clip.eval(), open_clip.get_tokenizer(arch), list(prompts))
    visual = clip.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    preprocessing = Preprocessing(
        mean=tuple(visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(visual.image_std or open_clip.OPENAI_DATASET_STD),
        input_size=(3, *size),
        class_names=tuple(prompts),
        transform=transform,
    )
    return classifier.to(device).eval(), preprocessing
