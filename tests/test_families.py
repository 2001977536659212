"""Which tokens the head reads, and layer scale: pooled timm ViTs (with [CLS], with registers),
BEiT and EVA-02, against a hand-written forward that never assumes token 0 is [CLS].

The reference (``class_space_saliency.testing.token_states``) re-implements every block
(attention with BEiT's relative position bias and EVA-02's rotary embeddings, layer scale
``gamma_1``/``gamma_2`` or ``ls1``/``ls2``); the head's readout is written out per family in
``READS`` below; the reference's logits must equal the model's own.
"""

from __future__ import annotations

import pytest
import torch

from class_space_saliency import (
    AttentionRollout,
    CheferRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    RawAttention,
    SobelSaliency,
    class_identifiability,
)
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.evaluation.curves import check_token_model
from class_space_saliency.testing import (
    POOLED_FAMILIES,
    assert_state_unchanged,
    assert_token_removal_matches,
    captum_gradcam_on_tokens,
    chefer_by_hand,
    class_logits,
    class_space_gradient_by_hand,
    gradcam_by_hand,
    model_state,
    rollout_by_hand,
    sobel_by_hand,
    tiny_images,
    token_states,
)

READS = {
    # family: ("mean", first pooled token) or ("row", token) -- from each model's forward_head
    "avgcls": ("mean", 1),  # [CLS] kept but never read: mean of the 16 image tokens
    "reg4gap": ("mean", 4),  # token 0 is a register
    "beit": ("mean", 1),  # timm BEiT default global_pool="avg"
    "eva02": ("mean", 1),
    "beit_token": ("row", 0),
}
assert set(READS) == set(POOLED_FAMILIES)
TARGET = torch.tensor([0, 4, 6])


def read(family: str, values: torch.Tensor) -> torch.Tensor:
    """The rows of (B, N, ...) the head reads, from ``READS``."""
    kind, index = READS[family]
    return values[:, index] if kind == "row" else values[:, index:].mean(1)


def prefix(family: str) -> int:
    return {"reg4gap": 4}.get(family, 1)


def forward(model, family: str, images: torch.Tensor, leaf_block: int | None = None) -> dict:
    """Hand-written forward (``token_states``) and the head's readout written out per family."""
    out = token_states(model, images, leaf_block)
    x = out["residual"][-1]
    out["logits"] = model.head(model.fc_norm(read(family, model.norm(x))))
    return out


def maps(rows: torch.Tensor) -> torch.Tensor:
    return rows.reshape(rows.shape[0], 1, 4, 4)


@pytest.fixture(params=POOLED_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(tiny_vit, family):
    return tiny_vit(family)


def test_reference_forward_is_the_model(model, family):
    with torch.no_grad():
        torch.testing.assert_close(
            forward(model, family, tiny_images())["logits"], model(tiny_images())
        )


@pytest.mark.parametrize("component", ["residual", "attention", "mlp"])
def test_class_space_components_apply_layer_scale(model, family, component):
    images = tiny_images()
    with torch.no_grad():
        states = forward(model, family, images)[component]
    explainer = ClassSpaceSaliency(model, component=component, layer="all")
    got = explainer.attribute(images, TARGET, per_layer=True)
    for block, tokens in enumerate(states):
        logits = class_logits(model, tokens[:, prefix(family) :])
        want = logits[torch.arange(3), :, TARGET]
        torch.testing.assert_close(got[:, block], want.reshape(3, 4, 4), rtol=1e-4, atol=1e-5)


def test_rollout_and_raw_attention_read_the_heads_rows(model, family):
    images = tiny_images()
    with torch.no_grad():
        probs = forward(model, family, images)["attn_probs"]
    rolled = rollout_by_hand(probs)
    npt = prefix(family)
    want = maps(read(family, rolled)[:, npt:])
    torch.testing.assert_close(
        AttentionRollout(model).attribute(images), want, rtol=1e-4, atol=1e-6
    )
    want = maps(read(family, probs[-1].mean(1))[:, npt:])
    torch.testing.assert_close(RawAttention(model).attribute(images), want, rtol=1e-4, atol=1e-6)


def test_chefer_reads_the_heads_rows(model, family):
    images = tiny_images()
    out = forward(model, family, images)
    score = out["logits"][torch.arange(3), TARGET].sum()
    grads = torch.autograd.grad(score, out["attn_probs"])
    relevance = chefer_by_hand(out["attn_probs"], grads)
    want = maps(read(family, relevance.detach())[:, prefix(family) :])
    before = model_state(model)
    got = CheferRollout(model).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert_state_unchanged(model, before)


def test_gradcam_on_the_last_norm1(model, family):
    images = tiny_images()
    out = forward(model, family, images, leaf_block=2)
    (leaf,) = out["leaf"]
    (grad,) = torch.autograd.grad(out["logits"][torch.arange(3), TARGET].sum(), leaf)
    cam = gradcam_by_hand(leaf, grad, prefix(family))
    got = GradCAM(model).attribute(images, TARGET)
    torch.testing.assert_close(got, maps(cam), rtol=1e-4, atol=1e-6)


def test_class_space_gradient_needs_a_cls_that_the_head_reads(model, family):
    if READS[family][0] == "mean":
        with pytest.raises(UnsupportedModelError, match="needs a \\[CLS\\] token that the"):
            ClassSpaceAttentionGradient(model)
        return
    images = tiny_images()
    got = ClassSpaceAttentionGradient(model).attribute(images, TARGET)
    want = class_space_gradient_by_hand(model, images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_identifiability_reports_cls_only_for_a_read_cls(model, family):
    images = tiny_images(batch=4)
    labels = torch.tensor([0, 1, 2, 3])
    result = class_identifiability(model, images, labels)
    with torch.no_grad():
        last = class_logits(model, forward(model, family, images)["residual"][-1])
    image_top1 = (last[:, prefix(family) :].argmax(-1) == labels[:, None]).float().mean() * 100
    torch.testing.assert_close(result.token_rate[-1], image_top1)
    if READS[family][0] == "mean":
        assert result.cls_rank is None and result.cls_rate is None
    else:
        want = (last[:, 0].argmax(-1) == labels).float().mean() * 100
        torch.testing.assert_close(result.cls_rate[-1], want)


def test_gradcam_equals_captum_on_beit(tiny_vit):
    """Captum's LayerGradCam on the same reshaped layer (an independent implementation)."""
    model = tiny_vit("beit")
    images = tiny_images()
    layer = model.blocks[1].norm1
    want = captum_gradcam_on_tokens(model, layer, images, TARGET, 1, (4, 4))
    got = GradCAM(model, layer=layer).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["beit", "eva02"])
def test_token_removal_refuses_position_inside_attention(model):
    with pytest.raises(TypeError, match="position information inside attention"):
        check_token_model(model)


def test_controls_on_the_patch_grid(model):
    images = tiny_images()
    torch.testing.assert_close(SobelSaliency(model).attribute(images), sobel_by_hand(images, 8))


@pytest.mark.parametrize("family", ["avgcls", "reg4gap"])
def test_token_removal_on_pooled_models_equals_masked_keys_and_mean(model, family):
    """Removing image tokens = masking them as attention keys and leaving them out of the mean."""
    npt = prefix(family)
    images = tiny_images()

    def masked_logits(keep: torch.Tensor) -> torch.Tensor:
        mask = keep[:, None, None, :].expand(-1, 1, npt + 16, -1)
        tokens = model.forward_features(images, attn_mask=mask)[:, npt:]
        kept = keep[:, npt:, None].float()
        return model.head(model.fc_norm((tokens * kept).sum(1) / kept.sum(1)))

    assert_token_removal_matches(model, images, TARGET, masked_logits, npt)
