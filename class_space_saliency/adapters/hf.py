"""Hugging Face ``transformers`` ViT-like image classifiers: ViT, DeiT, BEiT, DINOv2, I-JEPA.

Found on ``PreTrainedModel`` subclasses whose base model has ``embeddings``, a list of layers
(``layers``, ``encoder.layers`` or ``encoder.layer``) and a final ``layernorm``; the heads and
the rows they read follow each model's ``forward``:

- ViT, DeiT: ``classifier`` on [CLS]; DeiT with teacher: ``cls_classifier`` on [CLS] and
  ``distillation_classifier`` on the distillation token, averaged.
- BEiT: ``classifier`` on the mean of the image tokens after ``pooler.layernorm``
  (``use_mean_pooling``), else on [CLS]; layer scale in ``lambda_1`` / ``lambda_2``.
- DINOv2 (with registers): ``classifier`` on ``[CLS ; mean of image tokens]``; a token's
  class-space projection is ``classifier([x ; x])`` (the logits if every token were ``x``).
- I-JEPA: no [CLS]; ``classifier`` on the mean of all tokens.

Attention probabilities come from eager attention (switched on while hooked); attention
modules that fix their implementation when the model is built (Data2VecVision) refuse.
Outputs are ``ImageClassifierOutput`` objects whose ``.logits`` are used. Releases of
transformers older than :data:`MIN_TRANSFORMERS` are refused.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

from .base import Readout, TokenPath, UnsupportedModelError, block_branches, pair

NAME = "Hugging Face ViT-like"
LOOKS_FOR = (
    "a Hugging Face image classifier (ViT, DeiT, BEiT, DINOv2: embeddings, layers, layernorm, "
    "classifier)"
)


class ConcatHead(nn.Module):
    """``classifier([x ; x])``: DINOv2's head, which reads [CLS] and the mean of tokens."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([tokens, tokens], -1))


def _is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``.

    Reads ``sys.modules`` instead of importing transformers: a transformers model cannot exist
    before its package is imported, and the import costs seconds for every other model.
    """
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


MIN_TRANSFORMERS = {"": (5, 9), "dinov2": (5, 18), "dinov2_with_registers": (5, 18)}
"""The oldest transformers release whose layers this library reads exactly, by model type
(``""``: every other type): the Hugging Face tests pass from these releases on, and older
ones lay out layers, attention and MLP differently (refused, not read wrongly)."""


def check_transformers(model: nn.Module) -> None:
    """Refuse a Hugging Face model from a transformers release older than it is read for.

    Args:
        model: A transformers ``PreTrainedModel``.

    Raises:
        UnsupportedModelError: Naming the installed and the needed release.
    """
    model_type = model.config.model_type
    needed = MIN_TRANSFORMERS.get(model_type, MIN_TRANSFORMERS[""])
    installed = sys.modules["transformers"].__version__
    if tuple(int(part) for part in re.findall(r"\d+", installed)[:2]) < needed:
        release = ".".join(map(str, needed))
        raise UnsupportedModelError(
            f"Hugging Face {model_type} models need transformers >= {release} (older releases "
            f"lay out their layers and attention differently); found {installed}: "
            f"pip install -U 'transformers>={release}'"
        )


def _layers(base: nn.Module) -> nn.ModuleList | None:
    for path in ("layers", "encoder.layers", "encoder.layer"):
        found = base
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    return None


def matches(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ViT-like classifier (not Swin)."""
    if not _is_hf(model) or model.config.model_type in ("swin", "swinv2"):
        return False
    base = model.base_model
    return all(hasattr(base, n) for n in ("embeddings", "layernorm")) and _layers(base) is not None


def parts(model: nn.Module) -> dict:
    """ViTAnatomy parts of a Hugging Face ViT-like classifier."""
    check_transformers(model)
    base, config = model.base_model, model.config
    layers = list(_layers(base))
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    distilled = hasattr(base.embeddings, "distillation_token")
    has_cls = getattr(base.embeddings, "cls_token", None) is not None
    prefix = int(has_cls) + int(distilled) + registers
    norm: nn.Module = base.layernorm
    token_path: TokenPath | str = (
        "BEiT-style layers take the patch grid and a relative position bias tied to the full grid"
    )
    if not has_cls:  # I-JEPA: the mean of all tokens
        heads, readout = (model.classifier,), Readout(pool_start=0)
    elif hasattr(model, "cls_classifier"):  # DeiT with teacher
        heads = (model.cls_classifier, model.distillation_classifier)
        readout = Readout(cls_rows=(0, 1))
    elif config.model_type.startswith("dinov2"):
        heads = (ConcatHead(model.classifier),)
        readout = Readout(cls_rows=(0,), pool_start=prefix)
    elif getattr(getattr(base, "pooler", None), "layernorm", None) is not None:  # BEiT mean
        norm = nn.Sequential(base.layernorm, base.pooler.layernorm)
        heads, readout = (model.classifier,), Readout(pool_start=prefix)
    elif hasattr(model, "classifier"):
        heads, readout = (model.classifier,), Readout(cls_rows=(0,))
    else:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no image-classification head (classifier); load an "
            "...ForImageClassification model"
        )
    if config.model_type not in ("beit", "data2vec-vision"):
        token_path = _token_path(model, layers, prefix)
    if any(isinstance(head, nn.Identity) for head in heads):
        raise UnsupportedModelError(f"{type(model).__name__} has no classifier head (num_labels=0)")
    first = layers[0]
    norm1 = "norm1" if hasattr(first, "norm1") else "layernorm_before"
    scales = ("layer_scale1", "layer_scale2") if hasattr(first, "layer_scale1") else ("", "")
    return dict(
        family=NAME,
        blocks=layers,
        norm=norm,
        heads=heads,
        readout=readout,
        num_prefix_tokens=prefix,
        patch_size=pair(config.patch_size),
        img_size=None if config.model_type.startswith("dinov2") else pair(config.image_size),
        in_chans=int(config.num_channels),
        **_attention(layers),
        pre_attention_norms=[getattr(layer, norm1) for layer in layers],
        token_path=token_path,
        output_logits=hf_logits,
        **block_branches(layers, "attention", "mlp", scales, ("lambda_1", "lambda_2")),
    )


def _attention(layers: list[nn.Module]) -> dict:
    """Attention modules whose implementation can be switched to eager (they read
    ``config._attn_implementation`` when called), or the reason there are none."""
    modules = [layer.attention for layer in layers]
    fixed = [m for m in modules if not hasattr(getattr(m, "config", None), "_attn_implementation")]
    if not fixed:
        return dict(attention_modules=modules, attention_kind="hf")
    reason = (
        f"{type(fixed[0]).__name__} fixes its attention implementation when the model is built "
        "and returns no probabilities to a hook"
    )
    return dict(attention_modules=None, attention_kind="hf", attention_reason=reason)


def _token_path(model: nn.Module, layers: list[nn.Module], prefix: int) -> TokenPath:
    """Embeddings, layers, final norm and head of ViT / DeiT / DINOv2 / I-JEPA on any token
    count."""
    base = model.base_model

    def classify(tokens: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            output = layer(tokens)
            tokens = output[0] if isinstance(output, tuple) else output
        normed = base.layernorm(tokens)
        if hasattr(model, "cls_classifier"):  # DeiT with teacher: two heads, averaged
            distilled = model.distillation_classifier(normed[:, 1])
            return (model.cls_classifier(normed[:, 0]) + distilled) / 2
        if model.config.model_type.startswith("dinov2"):
            return model.classifier(torch.cat([normed[:, 0], normed[:, prefix:].mean(1)], -1))
        if prefix == 0:  # I-JEPA: the mean of all tokens
            return model.classifier(normed.mean(1))
        return model.classifier(normed[:, 0])

    return TokenPath(base.embeddings, classify, prefix)


def hf_logits(output) -> torch.Tensor:
    """``output.logits`` of Hugging Face outputs (tensors pass through)."""
    return output if isinstance(output, torch.Tensor) else output.logits
