"""Every registered method on one tiny random-init model per ViT-like family.

For each configuration (``CONFIGS``: timm architectures, one per distinct structure; Hugging
Face image classifiers that build offline from a tiny config; torchvision's ViT; tiny
open_clip CLIPs as zero-shot classifiers) this runs every registered method
(``list_methods()``) at its default options, the class-space attention and MLP components,
``class_identifiability`` and the token path of token-removal curves, and records one of:

- ``ok``: the result equals an independent reference computed here (see below);
- ``ran``: no reference applies; the maps are finite, on the model's token grid, and the
  model is untouched;
- ``refused``: ``UnsupportedModelError`` (the message is kept);
- ``wrong``: the result differs from the reference, is off the token grid, not finite,
  all-zero (Grad-CAM), reports [CLS] statistics for a token that is not the [CLS] the head
  reads, or the model was changed;
- ``crashed``: any other exception.

References (plain torch on the model's own modules, never the library's adapters or hooks):
the model's own intermediate token states (timm ``forward_intermediates`` with its prefix
tokens split off, Hugging Face ``output_hidden_states`` / ``output_attentions``); per-token
class logits from the model's own head code (timm ``forward_head(norm(.))`` of a sequence of
identical tokens, i.e. the logits the model would give if every token were that token);
every block recomputed by hand (``class_space_saliency.testing.block_by_hand``: attention
probabilities, attention and MLP branches as added to the stream, pre- and post-norm) and
used only where it reproduces the block's real output; the token grid from the model's own
``forward_intermediates`` (NCHW) or config; Captum's ``LayerGradCam`` on the layer Grad-CAM
explains; Sobel and intensity by hand.

Writes ``benchmarks/results/family_sweep.json`` (``--out``) and prints the table.

Example:
    python benchmarks/family_sweep.py                   # all configurations, a few minutes
    python benchmarks/family_sweep.py --only rpn cait   # configurations whose name matches
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import class_space_saliency as css
from class_space_saliency.adapters import UnsupportedModelError, find_token_path
from class_space_saliency.methods import create_method, list_methods
from class_space_saliency.testing import (
    TIMM_ARCHITECTURES,
    assert_state_unchanged,
    captum_gradcam_on_tokens,
    chefer_by_hand,
    model_state,
    perturb_weights,
    rollout_by_hand,
    sobel_by_hand,
)
from class_space_saliency.testing.references import BlockStates, block_by_hand

NUM_CLASSES = 7
BATCH = 2
RTOL, ATOL = 1e-3, 1e-4
EXTRA_CALLS = ("class_space:attention", "class_space:mlp", "identifiability", "token_removal")
STATUSES = ("ok", "ran", "refused", "wrong", "crashed")

# ----------------------------------------------------------------------------- configurations
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
"""Tiny overrides of timm's plain ViTs: a 4x4 grid of 8x8 patches, 2 blocks, width 32."""


@dataclass(frozen=True)
class Config:
    """One tiny model: ``library`` (timm, hf, torchvision, open_clip), a name and its builder.

    ``build()`` returns the classifier; ``size`` is the input's (H, W).
    """

    library: str
    name: str
    build: Callable[[], nn.Module]
    size: tuple[int, int] = (32, 32)
    note: str = ""


def timm_config(arch: str, size: int = 32, note: str = "", **kwargs) -> Config:
    """``timm.create_model(arch, pretrained=False, num_classes=7, **kwargs)``."""

    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return Config("timm", arch, build, (size, size), note)


def timm_class_config(name: str, path: str, size: int = 32, note: str = "", **kwargs) -> Config:
    """A timm model class built directly (its entry points fix the sizes we shrink)."""

    def build() -> nn.Module:
        module, cls = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)(num_classes=NUM_CLASSES, **kwargs)

    return Config("timm", name, build, (size, size), note)


# One architecture per distinct structure (model class, block, attention and MLP classes,
# pooling, prefix and register tokens, norms, position embedding, layer scale, distillation
# head), found by building every timm architecture of these modules with tiny overrides.
TIMM_VIT_LIKE = [
    "aimv2_large_patch14_224",
    "beit3_base_patch16_224",
    "beit_base_patch16_224",
    "deit3_base_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit_base_patch16_224",
    "eva02_base_patch14_224",
    "eva02_base_patch16_clip_224",
    "eva02_enormous_patch14_clip_224",
    "eva02_small_patch14_224",
    "eva_giant_patch14_224",
    "eva_giant_patch14_clip_224",
    "flexivit_base",
    "test_vit",
    "test_vit2",
    "test_vit3",
    "test_vit4",
    "test_vit_relpos",
    "vit_7b_patch16_dinov3",
    "vit_base_patch14_dinov2",
    "vit_base_patch14_reg1_tipsv2",
    "vit_base_patch14_reg4_dinov2",
    "vit_base_patch16_18x2_224",
    "vit_base_patch16_clip_224",
    "vit_base_patch16_dinov3",
    "vit_base_patch16_gap_224",
    "vit_base_patch16_lingbot",
    "vit_base_patch16_radio_v3",
    "vit_base_patch16_reg4_gap_256",
    "vit_base_patch16_rope_224",
    "vit_base_patch16_rope_ape_224",
    "vit_base_patch16_rope_mixed_224",
    "vit_base_patch16_rope_mixed_ape_224",
    "vit_base_patch16_rope_reg1_gap_256",
    "vit_base_patch16_rpn_224",
    "vit_base_patch16_siglip_224",
    "vit_base_patch16_xp_224",
    "vit_base_patch32_224",
    "vit_betwixt_patch16_gap_256",
    "vit_betwixt_patch16_reg1_gap_256",
    "vit_betwixt_patch16_reg4_gap_256",
    "vit_betwixt_patch16_rope_reg4_gap_256",
    "vit_dlittle_patch16_reg1_gap_256",
    "vit_dpwee_patch16_reg1_gap_256",
    "vit_giant_patch14_dinov2",
    "vit_giant_patch14_reg4_dinov2",
    "vit_giant_patch16_radio_v3",
    "vit_huge_patch16_radio_v4",
    "vit_intern300m_patch14_448",
    "vit_pe_core_base_patch16_224",
    "vit_pe_core_gigantic_patch14_448",
    "vit_pe_lang_large_patch14_448",
    "vit_pe_lang_gigantic_patch14_448",
    "vit_pe_spatial_base_patch16_512",
    "vit_pwee_patch16_reg1_gap_256",
    "vit_relpos_base_patch16_cls_224",
    "vit_relpos_base_patch16_clsgap_224",
    "vit_relpos_base_patch16_plus_240",
    "vit_relpos_base_patch16_rpn_224",
    "vit_so150m2_patch16_reg1_gap_256",
    "vit_so150m_patch16_reg4_gap_256",
    "vit_so150m_patch16_reg4_map_256",
]

TIMM = [
    *(timm_config(arch, **VIT) for arch in TIMM_VIT_LIKE),
    timm_config("vit_tiny_patch16_224", note="dynamic size", dynamic_img_size=True, **VIT),
    timm_config("cait_xxs24_224", depth_token_only=1, **VIT),
    timm_config("convit_tiny", **dict(VIT, depth=3), local_up_to_layer=1),
    timm_config("xcit_nano_12_p8_224", cls_attn_layers=1, **VIT),
    timm_config(
        "tnt_s_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        inner_dim=8,
        depth=2,
        num_heads_inner=2,
        num_heads_outer=2,
        first_stride=2,
    ),
    timm_config(
        "pit_ti_224",
        img_size=32,
        patch_size=8,
        stride=4,
        base_dims=(16, 16),
        depth=(1, 1),
        heads=(2, 2),
    ),
    timm_config(
        "pit_ti_distilled_224",
        img_size=32,
        patch_size=8,
        stride=4,
        base_dims=(16, 16),
        depth=(1, 1),
        heads=(2, 2),
    ),
    timm_config(
        "crossvit_tiny_240",
        img_size=32,
        patch_size=(8, 16),
        embed_dim=(16, 32),
        depth=((1, 1, 0),),
        num_heads=(2, 2),
        mlp_ratio=(2.0, 2.0, 1.0),
    ),
    timm_config(
        "levit_128s",
        size=64,
        img_size=64,
        embed_dim=(32,),
        key_dim=8,
        depth=(1,),
        num_heads=(2,),
    ),
    timm_config(
        "levit_conv_128s",
        size=64,
        img_size=64,
        embed_dim=(32,),
        key_dim=8,
        depth=(1,),
        num_heads=(2,),
    ),
    timm_config(
        "vitamin_small_224",
        size=64,
        note="tiny MbConv stem",
        **{
            key: value
            for key, value in TIMM_ARCHITECTURES["vitamin_small_224"].items()
            if key != "num_classes"
        },
    ),
    timm_config("vit_tiny_r_s16_p8_224", size=64, img_size=64, embed_dim=32, depth=2, num_heads=2),
    timm_config(
        "vit_small_resnet26d_224", size=64, img_size=64, embed_dim=32, depth=2, num_heads=2
    ),
    timm_config(
        "samvit_base_patch16",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=2,
        global_attn_indexes=(1,),
        neck_chans=16,
        global_pool="avg",
    ),
    timm_config("naflexvit_base_patch16_gap", **VIT),
    timm_config("naflexvit_base_patch16_map", **VIT),
    timm_config("naflexvit_base_patch16_par_gap", **VIT),
    timm_config(
        "deepseek_vit_412m", size=28, img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2
    ),
    timm_config(
        "gemma4_vit_167m",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        head_dim=16,
        intermediate_size=64,
    ),
    timm_config("qwen3_vit_88m", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    timm_class_config(
        "volo_d1_224",
        "timm.models.volo.VOLO",
        img_size=32,
        layers=(1, 1, 1, 1),
        embed_dims=(32, 64, 64, 64),
        num_heads=(1, 2, 2, 2),
        stem_hidden_dim=16,
    ),
    timm_config(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        patch_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=2,
    ),
    timm_config(
        "swinv2_tiny_window8_256",
        img_size=32,
        patch_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=2,
    ),
    timm_config(
        "swinv2_cr_tiny_224",
        img_size=(32, 32),
        patch_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=2,
    ),
    timm_config(
        "twins_svt_small",
        img_size=32,
        embed_dims=(16, 32),
        num_heads=(1, 2),
        mlp_ratios=(2, 2),
        depths=(1, 1),
        sr_ratios=(2, 1),
        wss=(2, 2),
    ),
    timm_config(
        "pvt_v2_b0",
        embed_dims=(16, 32),
        num_heads=(1, 2),
        mlp_ratios=(2, 2),
        depths=(1, 1),
        sr_ratios=(2, 1),
    ),
    timm_config("davit_tiny", depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2), window_size=2),
    timm_config(
        "tiny_vit_5m_224",
        embed_dims=(16, 32),
        depths=(1, 1),
        num_heads=(1, 2),
        window_sizes=(2, 2),
    ),
    timm_config(
        "hiera_tiny_224",
        size=64,
        img_size=(64, 64),
        embed_dim=16,
        num_heads=1,
        stages=(1, 1),
        q_pool=1,
        mask_unit_size=(4, 4),
        mask_unit_attn=(True, False),
    ),
    timm_class_config(
        "nest_tiny",
        "timm.models.nest.Nest",
        img_size=32,
        patch_size=4,
        num_levels=2,
        embed_dims=(16, 32),
        num_heads=(1, 2),
        depths=(1, 1),
    ),
    timm_class_config(
        "gcvit_xxtiny",
        "timm.models.gcvit.GlobalContextVit",
        size=64,
        img_size=64,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_ratio=(8, 8),
    ),
    timm_config(
        "coat_lite_tiny",
        img_size=32,
        patch_size=4,
        embed_dims=(16, 16, 16, 16),
        serial_depths=(1, 1, 1, 1),
        num_heads=2,
        mlp_ratios=(2, 2, 2, 2),
        crpe_window={3: 2},
    ),
    timm_config("mvitv2_tiny", size=64, img_size=(64, 64), note="full size"),
    timm_config("visformer_tiny", size=64, img_size=64, note="full size"),
    timm_config("mobilevit_xxs", size=64, note="full size"),
    timm_config("efficientformer_l1", size=224, note="full size"),
    timm_config("fastvit_sa12", size=64, note="full size"),
    timm_config("hieradet_small", size=64, note="full size"),
]


def hf_config(name: str, config: str, model: str, size: int = 32, **kwargs) -> Config:
    """A transformers model class built from a tiny config (random weights, no download)."""

    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config)(num_labels=NUM_CLASSES, **kwargs)
        return getattr(transformers, model)(cfg)

    return Config("hf", name, build, (size, size))


HF_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
HF_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
HF_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[1, 2])
HF_LEVIT = dict(
    image_size=64,
    hidden_sizes=[32, 48],
    num_attention_heads=[2, 3],
    depths=[1, 1],
    key_dim=[8, 8],
    mlp_ratio=[2, 2],
    attention_ratio=[2, 2],
    down_ops=[["Subsample", 8, 2, 4, 2, 2]],
)
HF_PVT = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    hidden_sizes=[16, 32],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
)
HF = [
    hf_config("vit", "ViTConfig", "ViTForImageClassification", **HF_VIT),
    hf_config("vit_msn", "ViTMSNConfig", "ViTMSNForImageClassification", **HF_VIT),
    hf_config("deit", "DeiTConfig", "DeiTForImageClassification", **HF_VIT),
    hf_config("deit_teacher", "DeiTConfig", "DeiTForImageClassificationWithTeacher", **HF_VIT),
    hf_config(
        "beit_mean",
        "BeitConfig",
        "BeitForImageClassification",
        use_mean_pooling=True,
        layer_scale_init_value=0.5,
        **HF_VIT,
    ),
    hf_config(
        "beit_cls",
        "BeitConfig",
        "BeitForImageClassification",
        use_mean_pooling=False,
        layer_scale_init_value=0.5,
        **HF_VIT,
    ),
    hf_config(
        "data2vec_vision",
        "Data2VecVisionConfig",
        "Data2VecVisionForImageClassification",
        layer_scale_init_value=0.5,
        **HF_VIT,
    ),
    hf_config("dinov2", "Dinov2Config", "Dinov2ForImageClassification", **HF_VIT),
    hf_config(
        "dinov2_reg",
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersForImageClassification",
        num_register_tokens=2,
        **HF_VIT,
    ),
    hf_config("ijepa", "IJepaConfig", "IJepaForImageClassification", **HF_VIT),
    hf_config(
        "clip",
        "CLIPConfig",
        "CLIPForImageClassification",
        vision_config=HF_VIT,
        text_config=HF_TEXT,
    ),
    hf_config(
        "metaclip_2",
        "MetaClip2Config",
        "MetaClip2ForImageClassification",
        vision_config=HF_VIT,
        text_config=HF_TEXT,
    ),
    hf_config(
        "siglip",
        "SiglipConfig",
        "SiglipForImageClassification",
        vision_config=HF_VIT,
        text_config=HF_TEXT,
    ),
    hf_config(
        "siglip2",
        "Siglip2Config",
        "Siglip2ForImageClassification",
        vision_config=dict(HF_VIT, num_patches=16),
        text_config=HF_TEXT,
    ),
    hf_config(
        "timm_wrapper",
        "TimmWrapperConfig",
        "TimmWrapperForImageClassification",
        architecture="vit_tiny_patch16_224",
        model_args=dict(VIT),
    ),
    hf_config("swin", "SwinConfig", "SwinForImageClassification", window_size=2, **HF_SWIN),
    hf_config("swinv2", "Swinv2Config", "Swinv2ForImageClassification", window_size=2, **HF_SWIN),
    hf_config(
        "donut_swin",
        "DonutSwinConfig",
        "DonutSwinForImageClassification",
        window_size=2,
        **HF_SWIN,
    ),
    hf_config(
        "cvt",
        "CvtConfig",
        "CvtForImageClassification",
        embed_dim=[16, 24, 32],
        num_heads=[1, 1, 2],
        depth=[1, 2, 3],  # transformers indexes each stage's drop-path rates by stage
    ),
    hf_config(
        "pvt",
        "PvtConfig",
        "PvtForImageClassification",
        image_size=32,
        patch_sizes=[4, 2],
        sequence_reduction_ratios=[2, 1],
        **HF_PVT,
    ),
    hf_config(
        "pvt_v2",
        "PvtV2Config",
        "PvtV2ForImageClassification",
        image_size=32,
        patch_sizes=[7, 3],
        sr_ratios=[2, 1],
        **HF_PVT,
    ),
    hf_config(
        "segformer",
        "SegformerConfig",
        "SegformerForImageClassification",
        patch_sizes=[7, 3],
        sr_ratios=[2, 1],
        **HF_PVT,
    ),
    hf_config("levit", "LevitConfig", "LevitForImageClassification", size=64, **HF_LEVIT),
    hf_config(
        "levit_teacher",
        "LevitConfig",
        "LevitForImageClassificationWithTeacher",
        size=64,
        **HF_LEVIT,
    ),
    hf_config(
        "mobilevit",
        "MobileViTConfig",
        "MobileViTForImageClassification",
        image_size=32,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
    ),
    hf_config(
        "mobilevitv2",
        "MobileViTV2Config",
        "MobileViTV2ForImageClassification",
        size=64,
        image_size=64,
        width_multiplier=0.25,
    ),
    hf_config(
        "hiera",
        "HieraConfig",
        "HieraForImageClassification",
        size=64,
        image_size=[64, 64],
        embed_dim=16,
        num_heads=[1, 2],
        depths=[1, 1],
        num_query_pool=1,
        query_stride=[2, 2],
        masked_unit_size=[4, 4],
        masked_unit_attention=[True, False],
    ),
    hf_config(
        "focalnet",
        "FocalNetConfig",
        "FocalNetForImageClassification",
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
    ),
    hf_config(
        "dinat",
        "DinatConfig",
        "DinatForImageClassification",
        patch_size=4,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        kernel_size=3,
    ),
    hf_config(
        "swiftformer",
        "SwiftFormerConfig",
        "SwiftFormerForImageClassification",
        depths=[1, 1, 1, 1],
        embed_dims=[8, 16, 24, 32],
    ),
]


def torchvision_config(name: str, **kwargs) -> Config:
    """A tiny ``torchvision.models.VisionTransformer``."""

    def build() -> nn.Module:
        import torchvision

        options = dict(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        )
        return torchvision.models.VisionTransformer(
            num_classes=NUM_CLASSES, **{**options, **kwargs}
        )

    return Config("torchvision", name, build)


def torchvision_conv_stem() -> list:
    from torchvision.models.vision_transformer import ConvStemConfig

    return [ConvStemConfig(out_channels=16, kernel_size=3, stride=2) for _ in range(3)]


TORCHVISION = [
    torchvision_config("vit"),
    Config(
        "torchvision",
        "vit_conv_stem",
        lambda: torchvision_config("", conv_stem_configs=torchvision_conv_stem()).build(),
    ),
]


def open_clip_config(name: str, **vision) -> Config:
    """A tiny open_clip CLIP as a zero-shot classifier over four prompts."""

    def build() -> nn.Module:
        import open_clip

        from class_space_saliency.models import zero_shot_clip

        cfg = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, **vision)
        text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
        clip = open_clip.CLIP(embed_dim=16, vision_cfg=cfg, text_cfg=text).eval()
        prompts = ["a cat", "a dog", "a car", "a tree", "a boat", "a house", "a bird"]
        return zero_shot_clip(clip, open_clip.get_tokenizer("ViT-B-32"), prompts)

    return Config("open_clip", name, build)


OPEN_CLIP = [
    open_clip_config("tok"),
    open_clip_config("avg", pool_type="avg"),
    open_clip_config("ls", ls_init_value=0.5),
    open_clip_config("final_ln_after_pool", final_ln_after_pool=True),
    open_clip_config("attentional_pool", attentional_pool=True, attn_pooler_heads=2),
    open_clip_config(
        "timm_tower",
        timm_model_name="vit_tiny_patch16_224",
        timm_model_pretrained=False,
        timm_pool="token",
    ),
]

CONFIGS = [*TIMM, *HF, *TORCHVISION, *OPEN_CLIP]


# ----------------------------------------------------------------------------- references
@dataclass
class Reference:
    """What the model computes, found without the library.

    Attributes:
        logits: The model's logits (B, C).
        grid: The token grid (h, w) of the last block, or None where unknown.
        project: Per-token class logits (..., D) -> (..., C), or None.
        streams: Per block ``(prefix, image)``: prefix tokens (B, P, D) (P may be 0) and
            image tokens (B, h*w, D) of the block's output; None where unknown.
        cls_blocks: Per block, whether the [CLS] the head reads is prefix token 0 there.
        reads: Rows of the final sequence the head reads: ``("rows", (0,))``,
            ``("mean", start)`` or ``("cls+mean", start)``; None where no row is read.
        traced: Hand-recomputed block states (pre- and post-norm), valid for every block,
            with the logits computed through them (autograd graph kept); or None.
        probs: Post-softmax attention probabilities per block (B, heads, N, N), or None.
        attentions: The same in the autograd graph of ``graph_logits``, or None.
        graph_logits: Logits computed through ``attentions`` (for gradients), or None.
    """

    logits: torch.Tensor
    grid: tuple[int, int] | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    streams: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    cls_blocks: list[bool] | None = None
    reads: tuple | None = None
    traced: list | None = None
    probs: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None
    graph_logits: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def read(self, matrix: torch.Tensor) -> torch.Tensor:
        """The rows of (B, N, N) the head reads, at image columns -> (B, h*w)."""
        kind, where = self.reads
        if kind == "rows":
            rows = torch.stack([matrix[:, row] for row in where]).mean(0)
        elif kind == "mean":
            rows = matrix[:, where:].mean(1)
        else:
            rows = (matrix[:, 0] + matrix[:, where:].mean(1)) / 2
        return rows[:, -self.grid[0] * self.grid[1] :]


def timm_reference(model: nn.Module, images: torch.Tensor) -> Reference:
    """timm: ``forward_intermediates`` states, ``forward_head`` projection, blocks by hand."""
    with torch.no_grad():
        ref = Reference(logits=model(images))
        try:
            spatial = model.forward_intermediates(
                images, norm=False, output_fmt="NCHW", intermediates_only=True
            )
            ref.grid = tuple(spatial[-1].shape[-2:])
        except Exception as error:
            ref.notes.append(f"no forward_intermediates: {type(error).__name__}")
            return ref
        try:
            try:
                states = model.forward_intermediates(
                    images,
                    norm=False,
                    output_fmt="NLC",
                    intermediates_only=True,
                    return_prefix_tokens=True,
                )
            except Exception:
                states = _block_outputs(model, images, ref.grid)
                ref.notes.append("prefix tokens from block outputs")
            # (image, prefix) pairs, or image tokens alone where the stream has no prefix
            pairs = [s if isinstance(s, tuple) else (s, None) for s in states]
            ref.streams = [
                (prefix if prefix is not None else image[:, :0], image) for image, prefix in pairs
            ]
        except Exception as error:
            ref.notes.append(f"no token states: {type(error).__name__}")
        features = model.forward_features(images)
        if features.dim() != 3:  # hierarchical models: (B, H, W, C) grids
            ref.notes.append("no per-token projection: features are not a token sequence")
            return ref
        length = features.shape[1]
        pool = getattr(model, "global_pool", None)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        if pool == "token":
            ref.reads = ("rows", (0, 1) if hasattr(model, "head_dist") else (0,))
        elif pool == "avg":
            ref.reads = ("mean", 0 if getattr(model, "pool_include_prefix", False) else prefix)
        if ref.streams is not None:
            ref.cls_blocks = [
                pool == "token" and p.shape[1] == prefix and prefix > 0 for p, _ in ref.streams
            ]

        def project(tokens: torch.Tensor) -> torch.Tensor:
            flat = tokens.reshape(-1, tokens.shape[-1])
            sequence = flat[:, None].expand(-1, length, -1)
            return model.forward_head(model.norm(sequence)).reshape(*tokens.shape[:-1], -1)

        ref.project = project
    _trace_timm_blocks(model, images, ref)
    return ref


def _block_outputs(model: nn.Module, images: torch.Tensor, grid: tuple[int, int]) -> list:
    """(image, prefix) tokens of every block's output: the last h*w tokens are the image."""
    outputs = []
    handles = [
        block.register_forward_hook(lambda m, args, out: outputs.append(out))
        for block in model.blocks
    ]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    count = grid[0] * grid[1]
    return [(out[:, -count:], out[:, : out.shape[1] - count]) for out in outputs]


def _trace_timm_blocks(model: nn.Module, images: torch.Tensor, ref: Reference) -> None:
    """Recompute every block by hand inside the real forward (outputs replaced by the hand
    ones, so gradients flow through the hand probabilities); kept only if every block's hand
    output equals its real one."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        return
    traced, failures = [], []

    def hook(block: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        grid = args[1:3] if len(args) == 3 else None  # XCiT blocks take (x, H, W)
        for own_attention in (False, True):  # by hand, else the block's own attention module
            try:
                npt = int(getattr(block.attn, "num_prefix_tokens", model.num_prefix_tokens))
                states = block_by_hand(
                    block, args[0], kwargs.get("rope"), npt, own_attention=own_attention, grid=grid
                )
            except Exception as error:
                failures.append(type(error).__name__)
                continue
            if isinstance(output, torch.Tensor) and torch.allclose(
                states.output, output, rtol=1e-4, atol=1e-5
            ):
                traced.append(states)
                return states.output
            failures.append("mismatch")
        return None

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        with _fused_attention_off(model), torch.enable_grad():
            logits = model(images.detach())
    finally:
        for handle in handles:
            handle.remove()
    if len(traced) != len(blocks):
        ref.notes.append(f"blocks not reproduced by hand ({', '.join(sorted(set(failures)))})")
        return
    ref.traced = traced
    if all(states.probs is not None for states in traced):
        ref.attentions = [states.probs for states in traced]
        ref.probs = [p.detach() for p in ref.attentions]
        ref.graph_logits = logits
    else:
        ref.notes.append("attention probabilities not reproduced by hand")


@contextlib.contextmanager
def _fused_attention_off(model: nn.Module):
    """Eager attention for the reference (fused kernels differ in the last bits)."""
    flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for module, _ in flags:
        module.fused_attn = False
    try:
        yield
    finally:
        for module, flag in flags:
            module.fused_attn = flag


def hf_reference(model: nn.Module, images: torch.Tensor) -> Reference:
    """Hugging Face: hidden states and eager attention probabilities from the model itself."""
    import copy

    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for sub in ("vision_config",):
        if hasattr(eager.config, sub):
            getattr(eager.config, sub)._attn_implementation = "eager"
    with torch.no_grad():
        ref = Reference(logits=model(images).logits)
    config, base = model.config, model.base_model
    kind = config.model_type
    heads = {
        "vit": ("rows", (0,), 1),
        "vit_msn": ("rows", (0,), 1),
        "deit": ("rows", (0,) if hasattr(model, "classifier") else (0, 1), 2),
        "beit": None,
        "data2vec-vision": None,
        "dinov2": ("cls+mean", 1, 1),
        "dinov2_with_registers": ("cls+mean", 1 + getattr(config, "num_register_tokens", 0), None),
        "ijepa": ("mean", 0, 0),
    }
    if kind not in heads:
        ref.notes.append(f"no reference for {kind}")
        return ref
    pooled = getattr(getattr(base, "pooler", None), "layernorm", None)
    spec = heads[kind] or (("mean", 1, 1) if pooled is not None else ("rows", (0,), 1))
    reads_kind, where, prefix = spec
    if prefix is None:
        prefix = where
    ref.reads = (reads_kind, where)
    with torch.enable_grad():
        output = eager(images.detach(), output_hidden_states=True, output_attentions=True)
    hidden = output.hidden_states[1:]
    ref.graph_logits = output.logits
    if output.attentions is not None and all(a is not None for a in output.attentions):
        ref.attentions = list(output.attentions)
        ref.probs = [p.detach() for p in ref.attentions]
    else:
        ref.notes.append("no attention probabilities from the model")
    _trace_hf_layers(eager, output.hidden_states, ref)
    ref.streams = [(h[:, :prefix].detach(), h[:, prefix:].detach()) for h in hidden]
    ref.grid = (config.image_size // config.patch_size,) * 2
    ref.cls_blocks = [reads_kind != "mean" and prefix > 0] * len(hidden)
    norm = base.layernorm

    def project(tokens: torch.Tensor) -> torch.Tensor:
        normed = norm(tokens)
        if hasattr(model, "cls_classifier"):
            return (model.cls_classifier(normed) + model.distillation_classifier(normed)) / 2
        if kind.startswith("dinov2"):
            return model.classifier(torch.cat([normed, normed], -1))
        if pooled is not None:
            return model.classifier(pooled(normed))
        return model.classifier(normed)

    ref.project = project
    return ref


def _trace_hf_layers(model: nn.Module, hidden: tuple, ref: Reference) -> None:
    """Every layer by hand from its input hidden state: norm, attention (the model's eager
    module), layer scale, MLP; kept only if every layer reproduces the next hidden state."""
    encoder = getattr(model.base_model, "encoder", model.base_model)
    layers = list(getattr(encoder, "layer", None) or encoder.layers)
    traced = []
    for layer, h, want in zip(layers, hidden[:-1], hidden[1:], strict=True):
        h = h.detach()
        try:
            norm1 = getattr(layer, "layernorm_before", None) or layer.norm1
            norm2 = getattr(layer, "layernorm_after", None) or layer.norm2
            out, probs = layer.attention(norm1(h))[:2]
            if getattr(layer, "lambda_1", None) is not None:
                attention = layer.lambda_1 * out
            else:
                attention = getattr(layer, "layer_scale1", nn.Identity())(out)
            mid = h + attention
            mlp = layer.mlp(norm2(mid))
            if getattr(layer, "lambda_2", None) is not None:
                mlp = layer.lambda_2 * mlp
            else:
                mlp = getattr(layer, "layer_scale2", nn.Identity())(mlp)
        except Exception as error:
            ref.notes.append(f"layers not reproduced by hand ({type(error).__name__})")
            return
        if probs is None or not torch.allclose(mid + mlp, want, rtol=1e-4, atol=1e-5):
            ref.notes.append("layers not reproduced by hand (mismatch)")
            return
        traced.append(BlockStates(mid + mlp, attention, mlp, probs, norm1(h)))
    ref.traced = traced


def mha_reference(
    model: nn.Module, images: torch.Tensor, layers, embed, norm_head, ln_1, attn, ln_2, mlp, ls
) -> Reference:
    """torchvision / open_clip: ``nn.MultiheadAttention`` blocks recomputed by hand."""
    with torch.no_grad():
        ref = Reference(logits=model(images))
        x = embed(images)
        ref.streams, ref.probs, ref.traced = [], [], []
        for layer in layers:
            h = ln_1(layer)(x)
            module = attn(layer)
            b, n, d = h.shape
            heads = module.num_heads
            q, k, v = F.linear(h, module.in_proj_weight, module.in_proj_bias).chunk(3, -1)
            q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
            probs = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1)
            out = module.out_proj((probs @ v).transpose(1, 2).reshape(b, n, d))
            attention = ls(layer, 1)(out)
            x = x + attention
            mlp_branch = ls(layer, 2)(mlp(layer)(ln_2(layer)(x)))
            x = x + mlp_branch
            ref.streams.append((x[:, :1], x[:, 1:]))
            ref.probs.append(probs)
            ref.traced.append(BlockStates(x, attention, mlp_branch, probs, h))
        ref.grid = (4, 4)
        ref.project = norm_head
    return ref


def torchvision_reference(model: nn.Module, images: torch.Tensor) -> Reference:
    """torchvision ViT by hand ([CLS] read by ``heads``)."""

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], 1)
        return x + model.encoder.pos_embedding

    ref = mha_reference(
        model,
        images,
        model.encoder.layers,
        embed,
        lambda t: model.heads(model.encoder.ln(t)),
        lambda layer: layer.ln_1,
        lambda layer: layer.self_attention,
        lambda layer: layer.ln_2,
        lambda layer: layer.mlp,
        lambda layer, k: nn.Identity(),
    )
    ref.reads, ref.cls_blocks = ("rows", (0,)), [True] * len(ref.streams)
    return ref


def open_clip_reference(model: nn.Module, images: torch.Tensor) -> Reference:
    """open_clip's visual tower by hand; tokens scored like the image embedding."""
    visual = model.clip.visual
    if not hasattr(visual, "transformer") or visual.attn_pool is not None:
        with torch.no_grad():
            return Reference(logits=model(images), notes=["no reference for this tower"])

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        return visual.ln_pre(x + visual.positional_embedding)

    def project(tokens: torch.Tensor) -> torch.Tensor:
        embedded = F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)
        return model.clip.logit_scale.exp() * embedded @ model.head.prompts.T

    ref = mha_reference(
        model,
        images,
        visual.transformer.resblocks,
        embed,
        project,
        lambda layer: layer.ln_1,
        lambda layer: layer.attn,
        lambda layer: layer.ln_2,
        lambda layer: layer.mlp,
        lambda layer, k: getattr(layer, f"ls_{k}"),
    )
    if visual.pool_type == "tok":
        ref.reads, ref.cls_blocks = ("rows", (0,)), [True] * len(ref.streams)
    else:
        ref.reads, ref.cls_blocks = ("mean", 1), [False] * len(ref.streams)
    return ref


REFERENCES = {
    "timm": timm_reference,
    "hf": hf_reference,
    "torchvision": torchvision_reference,
    "open_clip": open_clip_reference,
}


# ----------------------------------------------------------------------------- checks
class Wrong(Exception):
    """A result that differs from its reference (the message says how)."""


class Unchecked(Exception):
    """No reference applies: the call ran and passed the generic checks."""


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Raise :class:`Wrong` unless ``got`` equals ``want`` (shape and values)."""
    want = want.to(got.dtype)
    if got.shape != want.shape:
        raise Wrong(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        error = (got - want).abs().max().item()
        raise Wrong(f"{what}: max |difference| {error:.3g} from the reference")


def as_maps(ref: Reference, rows: torch.Tensor) -> torch.Tensor:
    """(B, h*w) -> (B, 1, h, w) on the reference grid."""
    return rows.reshape(rows.shape[0], 1, *ref.grid)


def check_maps(maps: torch.Tensor, ref: Reference) -> None:
    """Generic checks of every map: finite and on the model's token grid."""
    if not torch.isfinite(maps).all():
        raise Wrong("maps are not finite")
    if ref.grid is not None and tuple(maps.shape[-2:]) != ref.grid:
        raise Wrong(f"maps are {tuple(maps.shape[-2:])}, the model's token grid is {ref.grid}")


def projected_targets(ref: Reference, tokens: torch.Tensor, target: torch.Tensor):
    """Target logit of each image token (B, N)."""
    logits = ref.project(tokens)
    return logits[torch.arange(len(target)), :, target]


def run_method(name: str, model, images, target, ref: Reference) -> None:
    """Run one registered method at its defaults and check it (raises Wrong / Unchecked)."""
    component = None
    if name.startswith("class_space:"):
        name, component = name.split(":")
    options = {} if component is None else {"component": component}
    maps = create_method(name, model, **options).attribute(images, target)
    check_maps(maps, ref)
    if name == "gradcam":
        return check_gradcam(model, images, target, maps, ref)
    if name in ("sobel", "intensity", "random"):
        return check_control(name, images, maps, ref)
    if name == "class_space":
        if ref.project is None:
            raise Unchecked("no per-token projection reference")
        if component is None:
            if ref.streams is None:
                raise Unchecked("no token-state reference")
            tokens = ref.streams[-1][1]
        else:
            if ref.traced is None:
                raise Unchecked("no hand-recomputed blocks")
            tokens = getattr(ref.traced[-1], component)[:, -ref.grid[0] * ref.grid[1] :]
        with torch.no_grad():
            want = projected_targets(ref, tokens.detach(), target)
        return close(maps, as_maps(ref, want), f"{component or 'residual'} map")
    if name in ("rollout", "raw_attention"):
        probs = ref.probs
        if probs is None or ref.reads is None:
            raise Unchecked("no attention reference")
        if name == "rollout":
            keep_first = ref.reads == ("rows", (0,)) or ref.reads[0] == "cls+mean"
            want = ref.read(rollout_by_hand(probs, keep_first=keep_first))
        else:
            want = ref.read(probs[-1].mean(1))
        return close(maps, as_maps(ref, want), name)
    if name == "chefer":
        if ref.attentions is None or ref.reads is None:
            raise Unchecked("no differentiable attention reference")
        score = ref.graph_logits[torch.arange(len(target)), target].sum()
        grads = torch.autograd.grad(score, ref.attentions, retain_graph=True)
        want = ref.read(chefer_by_hand([p.detach() for p in ref.attentions], grads))
        return close(maps, as_maps(ref, want), "chefer")
    if name.startswith("class_space_gradient"):
        reads_cls = ref.reads is not None and (
            ref.reads[0] == "cls+mean" or (ref.reads[0] == "rows" and 0 in ref.reads[1])
        )
        if ref.traced is None or ref.attentions is None or not reads_cls or ref.project is None:
            raise Unchecked("no hand-recomputed attention with a [CLS] read by the head")
        total = 0.0
        for states in ref.traced:
            logits = ref.project(states.attention[:, 0])
            if name.endswith("_paper"):
                logits = logits.softmax(-1)
            loss = F.cross_entropy(logits, target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, states.probs, retain_graph=True)
            total = total - grad[:, :, 0, -ref.grid[0] * ref.grid[1] :].sum(1)
        return close(maps, as_maps(ref, total.detach()), name)
    raise Unchecked("no reference for this method")


def check_gradcam(model, images, target, maps, ref: Reference) -> None:
    """Signed maps not all-zero (the layer reaches the prediction) and equal to Captum."""
    signed = css.GradCAM(model, relu=False).attribute(images, target)
    if not signed.flatten(1).abs().amax(1).gt(0).all():
        raise Wrong("all-zero maps: the layer Grad-CAM explains does not reach the prediction")
    explainer = css.GradCAM(model)
    layer = explainer.layer
    if ref.grid is None or ref.streams is None:
        raise Unchecked("no token-count reference for Captum's probe")
    prefix = ref.streams[-1][0].shape[1]
    anatomy = explainer.anatomy

    def forward(x: torch.Tensor) -> torch.Tensor:
        return anatomy.logits(model(x))

    with _fused_attention_off(model):
        want = captum_gradcam_on_tokens(
            forward, layer, images, target, prefix, ref.grid, channels_last=anatomy.channels_last
        )
    close(maps, want.detach(), "gradcam vs Captum")


def check_control(name: str, images, maps, ref: Reference) -> None:
    """Sobel and intensity by hand on the model's token grid; random: shape only."""
    if ref.grid is None:
        raise Unchecked("no token-grid reference")
    stride = (images.shape[-2] // ref.grid[0], images.shape[-1] // ref.grid[1])
    if name == "random":
        raise Unchecked("random: on the grid")
    if name == "sobel":
        return close(maps, sobel_by_hand(images, stride), "sobel")
    return close(maps, F.avg_pool2d(images.mean(1, keepdim=True), stride), "intensity")


def run_identifiability(model, images, target, ref: Reference) -> None:
    """Token and [CLS] statistics per block against the reference's token states."""
    result = css.class_identifiability(model, images, target)
    if ref.streams is None or ref.project is None:
        raise Unchecked("no token-state reference")
    if len(result.layers) != len(ref.streams):
        raise Unchecked(f"{len(result.layers)} blocks analysed, {len(ref.streams)} in reference")
    for i, (prefix, image) in enumerate(ref.streams):
        with torch.no_grad():
            logits = ref.project(image)
        rate = (logits.argmax(-1) == target[:, None]).float().mean() * 100
        close(result.token_rate[i : i + 1], rate[None], f"block {i} image-token rate")
        cls_rate = None if result.cls_rate is None else result.cls_rate[i]
        has_cls = ref.cls_blocks is not None and ref.cls_blocks[i]
        if has_cls:
            with torch.no_grad():
                want = (ref.project(prefix[:, 0]).argmax(-1) == target).float().mean() * 100
            if cls_rate is None or torch.isnan(cls_rate):
                raise Wrong(f"block {i}: no [CLS] statistics although the head reads [CLS]")
            close(cls_rate[None], want[None], f"block {i} [CLS] rate")
        elif cls_rate is not None and not torch.isnan(cls_rate):
            raise Wrong(f"block {i}: [CLS] statistics for a token that is not the head's [CLS]")


def run_token_removal(model, images, target, ref: Reference) -> None:
    """The token path must reproduce the model's logits on the full sequence."""
    path = find_token_path(model)
    with torch.no_grad():
        logits = path.classify(path.embed(images))
    close(logits, ref.logits, "token path logits")


# ----------------------------------------------------------------------------- runner
def run_config(config: Config, methods: list[str]) -> dict:
    """Build one configuration and run every call on it."""
    row = dict(library=config.library, name=config.name, note=config.note, calls={})
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = perturb_weights(config.build(), scale=0.05, seed=0)
    except Exception as error:
        row["built"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return row
    row["built"] = "yes"
    row["params"] = sum(p.numel() for p in model.parameters())
    images = torch.randn(BATCH, 3, *config.size, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            logits = model(images)
    except Exception as error:
        row["built"] = f"model does not run: {type(error).__name__}: {str(error)[:160]}"
        return row
    try:
        ref = REFERENCES[config.library](model, images)
    except Exception as error:
        ref = Reference(logits=getattr(logits, "logits", logits))
        ref.notes.append(f"no reference: {type(error).__name__}")
    target = torch.tensor([0, 4])
    row["reference"] = "; ".join(ref.notes) or "full"
    for name in [*methods, *EXTRA_CALLS]:
        before = model_state(model)
        try:
            if name == "identifiability":
                run_identifiability(model, images, target, ref)
            elif name == "token_removal":
                run_token_removal(model, images, target, ref)
            else:
                run_method(name, model, images, target, ref)
            status, message = "ok", ""
        except Unchecked as reason:
            status, message = "ran", str(reason)
        except Wrong as reason:
            status, message = "wrong", str(reason)
        except UnsupportedModelError as error:
            status, message = "refused", str(error)
        except Exception as error:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            status, message = "crashed", f"{type(error).__name__}: {error} ({where})"
        try:
            assert_state_unchanged(model, before)
        except AssertionError as change:
            status, message = "wrong", f"model changed: {change}; {message}"
        for parameter in model.parameters():
            parameter.grad = None
        row["calls"][name] = dict(status=status, message=message[:300])
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


SYMBOLS = dict(ok="ok", ran="ran", refused="R", wrong="WRONG", crashed="CRASH")


def table(rows: list[dict], calls: list[str]) -> str:
    """One line per configuration, one column per call."""
    short = [c.replace("class_space", "cs").replace("_gradient", "_grad") for c in calls]
    width = max(len(r["name"]) for r in rows) + 14
    lines = [f"{'configuration':<{width}} " + " ".join(f"{s[:9]:>9}" for s in short)]
    for row in rows:
        label = f"{row['library']}:{row['name']}"
        if row["built"] != "yes":
            lines.append(f"{label:<{width}} not built: {row['built'][:90]}")
            continue
        cells = [SYMBOLS[row["calls"][c]["status"]] for c in calls]
        lines.append(f"{label:<{width}} " + " ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def totals(rows: list[dict]) -> dict:
    """Counts of statuses over all calls, and of configurations built."""
    counts = Counter(
        call["status"] for row in rows if row["built"] == "yes" for call in row["calls"].values()
    )
    built = sum(row["built"] == "yes" for row in rows)
    return dict(
        configurations=len(rows),
        built=built,
        calls=sum(counts.values()),
        **{status: counts.get(status, 0) for status in STATUSES},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of the configurations to run")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "family_sweep.json"
    )
    parser.add_argument("--details", action="store_true", help="print every non-ok message")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    methods = list_methods()
    configs = [
        c for c in CONFIGS if not args.only or any(s in f"{c.library}:{c.name}" for s in args.only)
    ]
    rows = []
    for config in configs:
        rows.append(run_config(config, methods))
        row = rows[-1]
        print(f"{config.library}:{config.name} {row.get('seconds', '-')} s", file=sys.stderr)
    calls = [*methods, *EXTRA_CALLS]
    print(table(rows, calls))
    summary = totals(rows)
    print(json.dumps(summary))
    if args.details:
        for row in rows:
            for name, call in row.get("calls", {}).items():
                if call["status"] not in ("ok",):
                    print(
                        f"{row['library']}:{row['name']} {name}: {call['status']}: "
                        f"{call['message']}"
                    )
    if not args.only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(dict(totals=summary, calls=calls, configurations=rows), indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
