"""CLIP zero-shot classifiers (open_clip) whose class space is the text embedding space.

``zero_shot_clip(model, tokenizer, prompts)`` wraps an open_clip model as an image
classifier over the prompts: logits = ``logit_scale.exp()`` x cosine of the normalised image
embedding with each normalised prompt embedding. Its class space is the text space: a token
is projected like the image embedding (``ln_post``, ``@ proj``, L2 normalisation) and scored
by the same cosine, so every class-space method works on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PromptCosineHead(nn.Module):
    """``logit_scale.exp() * normalise(x @ proj) @ prompts.T``: CLIP's zero-shot head.

    Args:
        proj: The visual projection (D, E) (open_clip ``visual.proj``).
        prompts: Normalised prompt embeddings (P, E).
        logit_scale: The model's (log) temperature parameter.
    """

    def __init__(self, proj: torch.Tensor, prompts: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.proj = proj
        self.logit_scale = logit_scale
        self.register_buffer("prompts", prompts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = F.normalize(tokens @ self.proj, dim=-1)
        return self.logit_scale.exp() * embedded @ self.prompts.T


class ZeroShotCLIP(nn.Module):
    """An open_clip model as a classifier over text prompts (see :func:`zero_shot_clip`).

    Attributes:
        clip: The wrapped open_clip model.
        prompts: The class prompts, in class order.
        head: The :class:`PromptCosineHead` on top of ``visual.ln_post``.
    """

    def __init__(self, clip: nn.Module, prompts: Sequence[str], embeddings: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.prompts = tuple(prompts)
        self.head = PromptCosineHead(clip.visual.proj, embeddings, clip.logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, P): scaled cosine of image and prompt embeddings."""
        features = F.normalize(self.clip.encode_image(images), dim=-1)
        return self.clip.logit_scale.exp() * features @ self.head.prompts.T


def zero_shot_clip(
    model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor], prompts: Sequence[str]
) -> ZeroShotCLIP:
    """A zero-shot image classifier whose classes are ``prompts``.

    Args:
        model: An open_clip ``CLIP`` model (``encode_image``, ``encode_text``,
            ``logit_scale``, ``visual.ln_post``, ``visual.proj``).
        tokenizer: Its tokenizer (``open_clip.get_tokenizer(name)``).
        prompts: One text per class, e.g. ``["a photo of a cat", "a photo of a dog"]``.

    Returns:
        A :class:`ZeroShotCLIP` module (eval mode follows the wrapped model); the prompt
        embeddings are computed once, without gradients.

    Raises:
        TypeError: If ``model`` is not an open_clip-style CLIP model.
        ValueError: For fewer than two prompts or non-string prompts.

    Example:
        >>> # (skipped: downloads OpenAI's CLIP weights; tests/test_clip.py runs a tiny CLIP)
        >>> import open_clip  # doctest: +SKIP
        >>> clip = open_clip.create_model("ViT-B-32", pretrained="openai")  # doctest: +SKIP
        >>> classifier = zero_shot_clip(  # doctest: +SKIP
        ...     clip, open_clip.get_tokenizer("ViT-B-32"), ["a photo of a cat", "a photo of a dog"])
        >>> maps = ClassSpaceSaliency(classifier).attribute(images, target=0)  # doctest: +SKIP
    """
    needed = ("encode_image", "encode_text", "logit_scale", "visual")
    if not isinstance(model, nn.Module) or not all(hasattr(model, n) for n in needed):
        raise TypeError(
            f"model must be an open_clip CLIP model with {needed}, got {type(model).__name__}"
        )
    if not all(hasattr(model.visual, n) for n in ("ln_post", "proj", "transformer")):
        raise TypeError(
            f"model.visual must be an open_clip VisionTransformer (ln_post, proj, "
            f"transformer), got {type(model.visual).__name__}"
        )
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r}")
    if len(prompts) < 2:
        raise ValueError(f"prompts must hold at least two classes, got {len(prompts)}")
    device = model.logit_scale.device
    with torch.no_grad():
        embeddings = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)), dim=-1)
    return ZeroShotCLIP(model, prompts, embeddings.detach())
