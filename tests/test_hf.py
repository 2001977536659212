"""Hugging Face transformers models (tiny random configs, no download) against references
from the models' own ``output_hidden_states`` / ``output_attentions`` (eager attention)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from class_space_saliency import (
    AttentionRollout,
    CheferRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    RawAttention,
    ViTAnatomy,
)
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.methods import METHODS, create_method
from class_space_saliency.testing import (
    HF_FAMILIES,
    assert_state_unchanged,
    assert_token_removal_matches,
    build_method,
    captum_gradcam_on_tokens,
    chefer_by_hand,
    model_state,
    rollout_by_hand,
    sobel_by_hand,
    tiny_images,
)

T = pytest.importorskip("transformers")

TARGET = torch.tensor([0, 4, 6])
# family: (rows the head reads, prefix tokens)
# rows: ("row", i, ...) average of prefix rows; ("mean", start) mean of rows start..;
# ("cls+mean", start): the mean of row 0 and of the mean of rows start..
FAMILIES = {
    "vit": (("row", 0), 1),
    "deit": (("row", 0, 1), 2),
    "beit": (("mean", 1), 1),
    "dinov2": (("cls+mean", 1), 1),
    "dinov2_reg": (("cls+mean", 3), 3),
}
assert set(FAMILIES) == set(HF_FAMILIES)


def read(family: str, values: torch.Tensor) -> torch.Tensor:
    kind, *where = FAMILIES[family][0]
    if kind == "row":
        return torch.stack([values[:, i] for i in where]).mean(0)
    pooled = values[:, where[0] :].mean(1)
    return pooled if kind == "mean" else (values[:, 0] + pooled) / 2


def project(model: nn.Module, family: str, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token class logits, written out per family from the models' forward code."""
    base = model.base_model
    normed = base.layernorm(tokens)
    if family == "deit":
        return (model.cls_classifier(normed) + model.distillation_classifier(normed)) / 2
    if family == "beit":
        return model.classifier(base.pooler.layernorm(normed))
    if family.startswith("dinov2"):
        return model.classifier(torch.cat([normed, normed], -1))
    return model.classifier(normed)


def head_logits(model: nn.Module, family: str, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden state (B, N, D), per family."""
    normed = model.base_model.layernorm(hidden)
    if family == "deit":
        return (
            model.cls_classifier(normed[:, 0]) + model.distillation_classifier(normed[:, 1])
        ) / 2
    if family == "beit":
        return model.classifier(model.base_model.pooler.layernorm(normed[:, 1:].mean(1)))
    if family.startswith("dinov2"):
        start = FAMILIES[family][1]
        return model.classifier(torch.cat([normed[:, 0], normed[:, start:].mean(1)], -1))
    return model.classifier(normed[:, 0])


def reference(model: nn.Module, images: torch.Tensor):
    """The model's own hidden states and attention probabilities, from an eager copy."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    return eager, eager(images, output_hidden_states=True, output_attentions=True)


def maps(rows: torch.Tensor) -> torch.Tensor:
    return rows.reshape(rows.shape[0], 1, 4, 4)


@pytest.fixture(params=HF_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(tiny_hf_vit, family):
    return tiny_hf_vit(family)


def test_every_method_finds_the_parts_and_leaves_the_model_alone(model, family):
    images = tiny_images()
    before = model_state(model)
    for name in METHODS:
        if name == "class_space_gradient" and family == "beit":
            with pytest.raises(UnsupportedModelError, match="needs a \\[CLS\\] token that"):
                create_method(name, model)
            continue
        result = build_method(name, model).attribute(images, TARGET)
        assert result.shape == (3, 1, 4, 4) and torch.isfinite(result).all(), name
    assert_state_unchanged(model, before)
    assert model.config._attn_implementation == "sdpa"  # eager only while hooked


def test_class_space_matches_hidden_states(model, family):
    images = tiny_images()
    with torch.no_grad():
        _, out = reference(model, images)
        prefix = FAMILIES[family][1]
        got = ClassSpaceSaliency(model).attribute(images, TARGET, layer="all", per_layer=True)
        for block in range(2):
            logits = project(model, family, out.hidden_states[block + 1][:, prefix:])
            want = logits[torch.arange(3), :, TARGET].reshape(3, 4, 4)
            torch.testing.assert_close(got[:, block], want, rtol=1e-4, atol=1e-5)
        # the reference heads reproduce the model's logits from its last hidden state
        torch.testing.assert_close(
            head_logits(model, family, out.hidden_states[-1]), out.logits, rtol=1e-4, atol=1e-5
        )


def test_components_sum_to_the_residual_with_layer_scale(model, family):
    """attention + MLP branch of block b = hidden_{b+1} - hidden_b (layer scale included)."""
    images = tiny_images()
    anatomy = ClassSpaceSaliency(model).anatomy
    with torch.no_grad():
        _, out = reference(model, images)
        with anatomy.capture([(c, b) for c in ("attention", "mlp") for b in range(2)]) as cap:
            anatomy.forward(images)
    for block in range(2):
        delta = out.hidden_states[block + 1] - out.hidden_states[block]
        summed = cap.tokens[("attention", block)] + cap.tokens[("mlp", block)]
        torch.testing.assert_close(summed, delta, rtol=1e-4, atol=1e-5)


def test_rollout_and_raw_attention_match_output_attentions(model, family):
    images = tiny_images()
    with torch.no_grad():
        _, out = reference(model, images)
    prefix = FAMILIES[family][1]
    want = maps(read(family, rollout_by_hand(out.attentions))[:, prefix:])
    torch.testing.assert_close(
        AttentionRollout(model).attribute(images), want, rtol=1e-4, atol=1e-6
    )
    want = maps(read(family, out.attentions[-1].mean(1))[:, prefix:])
    torch.testing.assert_close(RawAttention(model).attribute(images), want, rtol=1e-4, atol=1e-6)


def test_chefer_matches_output_attentions_gradients(model, family):
    images = tiny_images()
    _, out = reference(model, images)
    grads = torch.autograd.grad(out.logits[torch.arange(3), TARGET].sum(), out.attentions)
    relevance = chefer_by_hand(out.attentions, grads)
    want = maps(read(family, relevance.detach())[:, FAMILIES[family][1] :])
    got = CheferRollout(model).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gradcam_equals_captum_on_the_last_pre_attention_norm(model, family):
    images = tiny_images()
    prefix = FAMILIES[family][1]
    layer = GradCAM(model).layer
    norms = [getattr(m, "layernorm_before", getattr(m, "norm1", None)) for m in model.modules()]
    assert layer is [m for m in norms if m is not None][-1]  # the last block's
    want = captum_gradcam_on_tokens(
        lambda x: model(x).logits, layer, images, TARGET, prefix, (4, 4)
    )
    torch.testing.assert_close(GradCAM(model).attribute(images, TARGET), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "dinov2_reg"])
def test_class_space_gradient_uses_cls_attention(model, family):
    """Block-local reference on an eager copy: CE of the [CLS] attention branch (after
    DINOv2's layer scale) projected through the head, gradient w.r.t. that block's probs."""
    images = tiny_images()
    eager, _ = reference(model, images)
    layers = (
        eager.base_model.layers if family in ("vit", "deit") else eager.base_model.encoder.layer
    )
    branches = []
    handles = [
        layer.attention.register_forward_hook(
            lambda m, a, o, layer=layer: branches.append(
                (getattr(layer, "layer_scale1", nn.Identity())(o[0]), o[1])
            )
        )
        for layer in layers
    ]
    try:
        eager(images)
    finally:
        for handle in handles:
            handle.remove()
    prefix = FAMILIES[family][1]
    total = 0.0
    for output, probs in branches:
        logits = project(eager, family, output[:, 0])
        loss = F.cross_entropy(logits, TARGET, reduction="sum")
        (grad,) = torch.autograd.grad(loss, probs, retain_graph=True)
        total = total - grad[:, :, 0, prefix:].sum(1)
    got = ClassSpaceAttentionGradient(model).attribute(images, TARGET)
    torch.testing.assert_close(got, maps(total.detach()), rtol=1e-4, atol=1e-5)


def test_load_model_hf_from_a_saved_directory_and_offline_error(tiny_hf_vit, tmp_path, monkeypatch):
    from class_space_saliency.models import load_model

    model = copy.deepcopy(tiny_hf_vit("vit"))
    model.config.id2label = {i: f"class {i}" for i in range(7)}
    model.save_pretrained(tmp_path)
    T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3).save_pretrained(
        tmp_path
    )
    loaded, prep = load_model(f"hf:{tmp_path}")
    images = tiny_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits)
    assert prep.input_size == (3, 32, 32) and prep.mean == (0.5, 0.5, 0.5)
    assert prep.class_names[6] == "class 6"

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(T.AutoModelForImageClassification, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match="could not load the Hugging Face model"):
        load_model("hf:nobody/no-such-model-here")


def test_identifiability_and_token_removal(model, family):
    from class_space_saliency import class_identifiability
    from class_space_saliency.evaluation.curves import check_token_model

    images = tiny_images(batch=4)
    labels = torch.tensor([0, 1, 2, 3])
    result = class_identifiability(model, images, labels)
    with torch.no_grad():
        _, out = reference(model, images)
        last = project(model, family, out.hidden_states[-1])
    prefix = FAMILIES[family][1]
    rate = (last[:, prefix:].argmax(-1) == labels[:, None]).float().mean() * 100
    torch.testing.assert_close(result.token_rate[-1], rate)
    if family == "beit":  # mean-pooled: no [CLS] statistics
        assert result.cls_rate is None
        with pytest.raises(TypeError, match="relative position bias"):
            check_token_model(model)
    else:
        want = (last[:, 0].argmax(-1) == labels).float().mean() * 100
        torch.testing.assert_close(result.cls_rate[-1], want)


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "dinov2_reg"])
def test_token_removal_equals_the_models_own_attention_mask(model, family):
    """Removing image tokens = masking them as keys (HF attention_mask) and out of the mean."""
    images = tiny_images()
    prefix = FAMILIES[family][1]
    twin = copy.deepcopy(model)  # transformers hooks a model asked for its hidden states

    def masked_logits(keep: torch.Tensor) -> torch.Tensor:
        out = twin(images, attention_mask=keep, output_hidden_states=True)
        if not family.startswith("dinov2"):
            return out.logits
        # DINOv2's head averages the kept image tokens only
        normed = twin.base_model.layernorm(out.hidden_states[-1])
        kept = keep[:, prefix:, None].float()
        mean = (normed[:, prefix:] * kept).sum(1) / kept.sum(1)
        return twin.classifier(torch.cat([normed[:, 0], mean], -1))

    assert_token_removal_matches(model, images, TARGET, masked_logits, prefix)


def test_benchmark_pixel_and_token_curves_read_hf_logits(tiny_hf_vit, tmp_path):
    from class_space_saliency.evaluation import load_records, run_benchmark

    model = tiny_hf_vit("vit")
    images = tiny_images(batch=3)
    with torch.no_grad():
        logits = model(images).logits  # the reference: HF's own output object
    labels = logits.argmax(-1)
    protocols = ["chefer2021/positive", "rise2018/deletion", "vilas2023/negative"]
    run_benchmark(model, (images, labels), ["random"], protocols, (0.5,) * 3, (0.5,) * 3,
                  tmp_path, progress=False, n_boot=10)  # fmt: skip
    records = {(r["protocol"], r["image"]): r for r in load_records(tmp_path)}
    probs = logits.softmax(-1)
    for i in range(3):
        assert records["chefer2021/positive", i]["curve"][0] == 1.0  # nothing removed yet
        first = records["rise2018/deletion", i]["curve"][0]
        assert abs(first - float(probs[i, labels[i]])) < 1e-5
        assert len(records["vilas2023/negative", i]["curve"]) == 15  # 16 tokens


def test_controls_on_the_patch_grid(model, family):
    images = tiny_images()
    want = F.avg_pool2d(images.mean(1, keepdim=True), 8)  # mean brightness per 8x8 patch
    torch.testing.assert_close(create_method("intensity", model).attribute(images, 0), want)
    torch.testing.assert_close(
        create_method("sobel", model).attribute(images), sobel_by_hand(images, 8)
    )
    noise = create_method("random", model).attribute(images)
    assert noise.shape == (3, 1, 4, 4) and ((noise >= 0) & (noise < 1)).all()


@pytest.mark.parametrize(
    ("family", "installed", "refused"),
    [("vit", "5.8.0", True), ("vit", "5.9.0", False), ("dinov2", "5.17.1", True),
     ("dinov2", "5.18.0.dev0", False), ("beit", "4.57.6", True)],
)  # fmt: skip
def test_older_transformers_releases_are_refused_by_name(
    tiny_hf_vit, monkeypatch, family, installed, refused
):
    """Releases that lay out layers and attention otherwise are refused, not read wrongly."""
    model = tiny_hf_vit(family)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", installed)
    if not refused:
        ViTAnatomy.from_model(model)
        return
    with pytest.raises(UnsupportedModelError, match=rf"need transformers >= 5\.\d+.*{installed}"):
        ViTAnatomy.from_model(model)
