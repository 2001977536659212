"""Tiny random-initialised models of every supported family, built offline in milliseconds.

Every factory seeds the global RNG, perturbs all weights (norms and biases too, so that no
parameter keeps its trivial initial value) and returns the model in eval mode. The same
call gives the same weights, so tests can compare against numbers computed once.
"""

from __future__ import annotations

import timm
import torch
import torchvision
from timm.models.vitamin import VitCfg, VitConvCfg
from torch import nn

NUM_CLASSES = 7
"""Classes of every tiny classifier built here (except :func:`tiny_clip`, one per prompt)."""

TIMM_TINY = dict(
    pretrained=False,
    img_size=32,
    patch_size=8,
    num_classes=NUM_CLASSES,
    depth=3,
    embed_dim=32,
    num_heads=2,
)
"""timm keyword arguments of the tiny ViTs: 32x32 inputs, a 4x4 grid of 8x8 patches."""

VIT_FAMILIES = ("plain", "distilled", "registers", "avgpool", "dynamic", "torchvision")
"""timm / torchvision families that differ in the tokens in front of the image tokens."""

POOLED_FAMILIES = ("avgcls", "reg4gap", "beit", "eva02", "beit_token")
"""timm families whose head reads pooled image tokens, or whose attention is position-aware."""

HF_FAMILIES = ("vit", "deit", "beit", "dinov2", "dinov2_reg")
"""Hugging Face transformers families of :func:`tiny_hf_vit` with every method supported
(it also builds ``"ijepa"`` and ``"data2vec_vision"``)."""

TIMM_ARCHITECTURES = {
    # the paper's GAP model and the other post-norm blocks: x + norm1(attn(x)), x + norm2(mlp(x))
    "vit_base_patch16_rpn_224": dict(TIMM_TINY, depth=2),
    "vit_relpos_base_patch16_rpn_224": dict(TIMM_TINY, depth=2),
    "eva02_enormous_patch14_clip_224": dict(TIMM_TINY, depth=2),
    # [CLS] joins late: before block local_up_to_layer, or in class-attention blocks
    "convit_tiny": dict(TIMM_TINY, local_up_to_layer=1),
    "cait_xxs24_224": dict(TIMM_TINY, depth=2, depth_token_only=1),
    "xcit_nano_12_p8_224": dict(TIMM_TINY, depth=2, cls_attn_layers=1),
    # hybrid patch embeddings: one token per 16x16 pixels of a 64x64 input
    "vitamin_small_224": dict(
        img_size=64,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=NUM_CLASSES,
        embed_cfg=VitCfg(
            embed_dim=(16, 16, 32),
            depths=(1, 1, 1),
            stem_width=16,
            conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6),
            head_type="1d",
        ),
    ),
    "vit_tiny_r_s16_p8_224": dict(TIMM_TINY, img_size=64, patch_size=4, depth=2),
    # blocks whose attention or branches cannot be read
    "vit_dlittle_patch16_reg1_gap_256": dict(TIMM_TINY, depth=2),
    "vit_base_patch16_xp_224": dict(TIMM_TINY, depth=2),
}
"""Tiny keyword arguments of the timm architectures of :func:`tiny_timm` (3 or 2 blocks,
width 32, 7 classes; 32x32 inputs, 64x64 for the hybrids)."""

CLIP_PROMPTS = ("a photo of a cat", "a photo of a dog", "a red car", "a tree")
"""The zero-shot classes of :func:`tiny_clip`."""


def perturb_weights(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add seeded Gaussian noise to every parameter and put the model in eval mode.

    Args:
        model: any module; changed in place.
        scale: standard deviation of the noise.
        seed: global RNG seed used for the noise.

    Returns:
        ``model`` itself, in eval mode.

    Example:
        >>> layer = perturb_weights(nn.LayerNorm(4))
        >>> bool((layer.weight != 1).all()), layer.training
        (True, False)
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def tiny_vit(family: str = "plain") -> nn.Module:
    """A tiny random timm or torchvision ViT (3 blocks, width 32, 7 classes, eval mode).

    Args:
        family: one of :data:`VIT_FAMILIES` -- ``"plain"`` (timm ViT with layer scale),
            ``"distilled"`` (DeiT: [CLS] + distillation token, two heads), ``"registers"``
            (4 register tokens), ``"avgpool"`` (no [CLS], mean-pooled head), ``"dynamic"``
            (any input size, patch 4), ``"torchvision"`` (``torchvision.models.
            VisionTransformer``) -- or of :data:`POOLED_FAMILIES`: ``"avgcls"`` ([CLS] kept
            but the head averages the image tokens), ``"reg4gap"`` (registers, no [CLS],
            average pooling), ``"beit"`` (relative position bias, ``gamma`` layer scale,
            average pooling), ``"beit_token"`` (BEiT read from [CLS]), ``"eva02"`` (rotary
            embeddings).

    Returns:
        The model in eval mode.

    Example:
        >>> model = tiny_vit("registers")
        >>> model(tiny_images("registers")).shape
        torch.Size([3, 7])
    """
    torch.manual_seed(0)
    timm_models = {
        "plain": ("vit_tiny_patch16_224", dict(init_values=0.5)),
        "distilled": ("deit_tiny_distilled_patch16_224", {}),
        "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
        "avgpool": (
            "vit_tiny_patch16_224",
            dict(global_pool="avg", class_token=False, fc_norm=True),
        ),
        "dynamic": ("vit_tiny_patch16_224", dict(dynamic_img_size=True, patch_size=4)),
        "avgcls": ("vit_tiny_patch16_224", dict(global_pool="avg", init_values=0.5)),
        "reg4gap": (
            "vit_tiny_patch16_224",
            dict(reg_tokens=4, global_pool="avg", class_token=False),
        ),
        "beit": ("beit_base_patch16_224", dict(init_values=0.5)),
        "beit_token": ("beit_base_patch16_224", dict(init_values=0.5, global_pool="token")),
        "eva02": ("eva02_tiny_patch14_224", dict(init_values=0.5)),
    }
    if family in timm_models:
        name, options = timm_models[family]
        return perturb_weights(timm.create_model(name, **{**TIMM_TINY, **options}))
    if family == "torchvision":
        model = torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=3,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=NUM_CLASSES,
        )
        return perturb_weights(model)
    raise ValueError(f"family must be one of {[*VIT_FAMILIES, *POOLED_FAMILIES]}, got {family!r}")


def tiny_timm(architecture: str) -> nn.Module:
    """A tiny random timm model of one of :data:`TIMM_ARCHITECTURES` (eval mode).

    Args:
        architecture: a key of :data:`TIMM_ARCHITECTURES`: post-norm blocks (the paper's GAP
            model ``vit_base_patch16_rpn_224``, its relative-position twin, EVA-02 CLIP
            ``enormous``), models whose [CLS] joins late (ConViT, CaiT, XCiT), hybrid patch
            embeddings (ViTamin, a ResNet-ViT hybrid), differential attention and parallel
            blocks.

    Returns:
        The model in eval mode.

    Example:
        >>> tiny_timm("vit_base_patch16_rpn_224")(tiny_images()).shape
        torch.Size([3, 7])
    """
    if architecture not in TIMM_ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {list(TIMM_ARCHITECTURES)}, got {architecture!r}"
        )
    torch.manual_seed(0)
    options = {**TIMM_ARCHITECTURES[architecture], "pretrained": False}
    return perturb_weights(timm.create_model(architecture, **options))


def tiny_images(family: str = "plain", batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Seeded standard-normal inputs for :func:`tiny_vit` (and the other 32x32 factories).

    Args:
        family: the model family; ``"dynamic"`` gets non-square 24x40 inputs, all others 32x32.
        batch: number of images.
        seed: generator seed.

    Returns:
        A float tensor (batch, 3, H, W).

    Example:
        >>> tiny_images("dynamic", batch=2).shape
        torch.Size([2, 3, 24, 40])
    """
    size = (24, 40) if family == "dynamic" else (32, 32)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def tiny_hf_vit(family: str = "vit") -> nn.Module:
    """A tiny random Hugging Face transformers image classifier (2 layers, 7 labels).

    Args:
        family: one of :data:`HF_FAMILIES`: ``"vit"``, ``"deit"`` (with teacher head),
            ``"beit"`` (mean pooling, layer scale), ``"dinov2"``, ``"dinov2_reg"`` (2 registers);
            or ``"ijepa"`` (no [CLS], mean of all tokens), ``"data2vec_vision"`` (BEiT-style,
            attention implementation fixed when built).

    Returns:
        The model in eval mode (needs the ``transformers`` package).

    Example:
        >>> tiny_hf_vit("dinov2")(tiny_images()).logits.shape
        torch.Size([3, 7])
    """
    import transformers

    configs = {
        "vit": ("ViTConfig", "ViTForImageClassification", {}),
        "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {}),
        "beit": (
            "BeitConfig",
            "BeitForImageClassification",
            dict(layer_scale_init_value=0.5, use_mean_pooling=True),
        ),
        "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", {}),
        "dinov2_reg": (
            "Dinov2WithRegistersConfig",
            "Dinov2WithRegistersForImageClassification",
            dict(num_register_tokens=2),
        ),
        "ijepa": ("IJepaConfig", "IJepaForImageClassification", {}),
        "data2vec_vision": (
            "Data2VecVisionConfig",
            "Data2VecVisionForImageClassification",
            dict(layer_scale_init_value=0.5),
        ),
    }
    if family not in configs:
        raise ValueError(f"family must be one of {list(configs)}, got {family!r}")
    config_name, model_name, extra = configs[family]
    config = getattr(transformers, config_name)(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=NUM_CLASSES,
        **extra,
    )
    torch.manual_seed(0)
    return perturb_weights(getattr(transformers, model_name)(config))


def tiny_swin(library: str = "timm") -> nn.Module:
    """A tiny random Swin Transformer (two stages, window 2, 7 classes, last grid 4x4).

    Args:
        library: ``"timm"`` or ``"hf"`` (Hugging Face transformers).

    Returns:
        The model in eval mode.

    Example:
        >>> tiny_swin()(tiny_images()).shape
        torch.Size([3, 7])
    """
    torch.manual_seed(0)
    if library == "timm":
        model = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            num_classes=NUM_CLASSES,
            window_size=2,
            embed_dim=16,
            depths=(1, 2),
            num_heads=(1, 2),
        )
    elif library == "hf":
        import transformers

        config = transformers.SwinConfig(
            image_size=32,
            patch_size=4,
            num_labels=NUM_CLASSES,
            window_size=2,
            embed_dim=16,
            depths=[1, 2],
            num_heads=[1, 2],
        )
        model = transformers.SwinForImageClassification(config)
    else:
        raise ValueError(f"library must be 'timm' or 'hf', got {library!r}")
    return perturb_weights(model)


def tiny_clip(pool: str = "tok") -> tuple[nn.Module, nn.Module]:
    """A tiny random open_clip CLIP and its zero-shot classifier over :data:`CLIP_PROMPTS`.

    Args:
        pool: the visual tower's pooling, ``"tok"`` ([CLS]) or ``"avg"``.

    Returns:
        ``(clip, classifier)``: the CLIP model (eval mode, visual weights perturbed) and
        :func:`class_space_saliency.models.zero_shot_clip` of it (needs ``open_clip``).

    Example:
        >>> clip, classifier = tiny_clip()
        >>> classifier(tiny_images()).shape  # one logit per prompt
        torch.Size([3, 4])
    """
    import open_clip

    from ..models import zero_shot_clip

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, pool_type=pool)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return clip, zero_shot_clip(clip, tokenizer, list(CLIP_PROMPTS))


def tiny_benchmark_data(
    n: int = 7, model: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded 32x32 images labelled with ``model``'s predictions, except images 0 and 1.

    The clean accuracy of ``model`` on them is (n - 2) / n, so a benchmark report's accuracy
    line can be checked by hand.

    Args:
        n: number of images (at least 2).
        model: the classifier (default: ``tiny_vit("plain")``).

    Returns:
        ``(images, labels)``: (n, 3, 32, 32) and (n,) int64.

    Example:
        >>> model = tiny_vit()
        >>> images, labels = tiny_benchmark_data(5, model)
        >>> (model(images).argmax(-1) == labels).tolist()
        [False, False, True, True, True]
    """
    model = tiny_vit() if model is None else model
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = model(images).argmax(-1)
    labels[:2] = (labels[:2] + 1) % NUM_CLASSES
    return images, labels


def box_masks(images: torch.Tensor) -> torch.Tensor:
    """Rectangular object masks (B, 1, H, W), a different box for every image.

    Example:
        >>> box_masks(torch.zeros(2, 3, 32, 32)).flatten(1).sum(1).tolist()
        [192, 221]
    """
    masks = torch.zeros(images.shape[0], 1, *images.shape[-2:], dtype=torch.bool)
    for i in range(images.shape[0]):
        masks[i, :, 2 + i : 14 + 2 * i, 4 : 20 + i] = True
    return masks


class ToyTokenViT(nn.Module):
    """A ViT-shaped toy whose logits are sums: every token-removal curve is known by hand.

    One channel; each token is the sum of its 2x2 patch; no blocks; logit 1 is the sum of the
    kept image tokens minus ``threshold``, logit 0 is zero.

    Args:
        threshold: the sum above which class 1 wins.

    Example:
        >>> ToyTokenViT(threshold=2.5)(torch.ones(1, 1, 2, 4)).tolist()  # two patches of sum 4
        [[0.0, 5.5]]
    """

    num_prefix_tokens = 1

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.patch_embed = nn.Conv2d(1, 1, 2, stride=2, bias=False)
        nn.init.ones_(self.patch_embed.weight)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 1))
        self.blocks = nn.Sequential()
        self.norm = nn.Identity()

    def _pos_embed(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = patches.flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) from the token sequence (B, 1 + N, 1)."""
        total = tokens[:, 1:, 0].sum(1)
        return torch.stack([torch.zeros_like(total), total - self.threshold], -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) of one-channel images (B, 1, H, W) with even H and W."""
        return self.forward_head(self.norm(self.blocks(self._pos_embed(self.patch_embed(images)))))
