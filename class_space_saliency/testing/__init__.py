"""Test helpers for methods and models, in the spirit of ``captum/testing/helpers``.

Tiny random models of every supported family (built offline in milliseconds), plain-torch
reference computations of every method, and the checks a method's tests need. The library's
own tests use them; a new method's tests can too.

Example:
    >>> import torch
    >>> from class_space_saliency import ClassSpaceSaliency
    >>> from class_space_saliency.testing import (
    ...     assert_state_unchanged, class_space_map_by_hand, model_state, tiny_images, tiny_vit)
    >>> model, images = tiny_vit("distilled"), tiny_images("distilled")
    >>> target = torch.tensor([0, 4, 6])
    >>> before = model_state(model)
    >>> maps = ClassSpaceSaliency(model).attribute(images, target)
    >>> with torch.no_grad():
    ...     want = class_space_map_by_hand(model, images, target, block=-1, grid=(4, 4))
    >>> torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5)
    >>> assert_state_unchanged(model, before)
"""

from .checks import (
    assert_state_unchanged,
    assert_token_removal_matches,
    model_state,
    removal_keep_masks,
)
from .methods import FITTED_ARGUMENTS, build_method, fitted_probes, method_arguments
from .models import (
    CLIP_PROMPTS,
    HF_FAMILIES,
    NUM_CLASSES,
    POOLED_FAMILIES,
    TIMM_ARCHITECTURES,
    TIMM_TINY,
    VIT_FAMILIES,
    ToyTokenViT,
    box_masks,
    perturb_weights,
    tiny_benchmark_data,
    tiny_clip,
    tiny_hf_vit,
    tiny_images,
    tiny_swin,
    tiny_timm,
    tiny_vit,
)
from .references import (
    POST_NORM_BLOCKS,
    BlockStates,
    attention_by_hand,
    block_by_hand,
    captum_gradcam_on_tokens,
    chefer_by_hand,
    class_logits,
    class_space_gradient_by_hand,
    class_space_map_by_hand,
    direct_terms_by_hand,
    embed_by_hand,
    frozen_norm_gradient,
    gradcam_by_hand,
    grid_of,
    num_prefix_tokens_of,
    rollout_by_hand,
    sobel_by_hand,
    token_states,
)

__all__ = [
    "CLIP_PROMPTS",
    "FITTED_ARGUMENTS",
    "HF_FAMILIES",
    "NUM_CLASSES",
    "POOLED_FAMILIES",
    "POST_NORM_BLOCKS",
    "TIMM_ARCHITECTURES",
    "TIMM_TINY",
    "VIT_FAMILIES",
    "BlockStates",
    "ToyTokenViT",
    "assert_state_unchanged",
    "assert_token_removal_matches",
    "attention_by_hand",
    "block_by_hand",
    "box_masks",
    "build_method",
    "captum_gradcam_on_tokens",
    "chefer_by_hand",
    "class_logits",
    "class_space_gradient_by_hand",
    "class_space_map_by_hand",
    "direct_terms_by_hand",
    "embed_by_hand",
    "fitted_probes",
    "frozen_norm_gradient",
    "gradcam_by_hand",
    "grid_of",
    "method_arguments",
    "model_state",
    "num_prefix_tokens_of",
    "perturb_weights",
    "removal_keep_masks",
    "rollout_by_hand",
    "sobel_by_hand",
    "tiny_benchmark_data",
    "tiny_clip",
    "tiny_hf_vit",
    "tiny_images",
    "tiny_swin",
    "tiny_timm",
    "tiny_vit",
    "token_states",
]
