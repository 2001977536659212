"""Hugging Face transformers models (tiny random configs, no download) against references
from the models' own ``output_hidden_states`` / ``output_attentions`` (eager attention)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from captum.attr import LayerGradCam
from conftest import assert_state_unchanged, model_state
from torch import nn

from class_space_saliency import (
    AttentionRollout,
    CheferRollout,
    ClassSpaceAttentionGradient,
    ClassSpaceSaliency,
    GradCAM,
    RawAttention,
)
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.methods import METHODS, create_method

T = pytest.importorskip("transformers")

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=7,
)
TARGET = torch.tensor([0, 4, 6])
# family: (config class, model class, extra config, rows the head reads, prefix tokens)
# rows: ("row", i, ...) average of prefix rows; ("mean", start) mean of rows start..;
# ("cls+mean", start): the mean of row 0 and of the mean of rows start..
FAMILIES = {
    "vit": ("ViTConfig", "ViTForImageClassification", {}, ("row", 0), 1),
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {}, ("row", 0, 1), 2),
    "beit": (
        "BeitConfig",
        "BeitForImageClassification",
        dict(layer_scale_init_value=0.5, use_mean_pooling=True),
        ("mean", 1),
        1,
    ),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", {}, ("cls+mean", 1), 1),
    "dinov2_reg": (
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersForImageClassification",
        dict(num_register_tokens=2),
        ("cls+mean", 3),
        3,
    ),
}


def make(family: str) -> nn.Module:
    config_cls, model_cls, extra, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, config_cls)(**TINY, **extra))
    for p in model.parameters():  # non-trivial weights everywhere (also norms and biases)
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def images_for(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def read(family: str, values: torch.Tensor) -> torch.Tensor:
    kind, *where = FAMILIES[family][3]
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
        start = FAMILIES[family][4]
        return model.classifier(torch.cat([normed[:, 0], normed[:, start:].mean(1)], -1))
    return model.classifier(normed[:, 0])


def reference(model: nn.Module, images: torch.Tensor):
    """The model's own hidden states and attention probabilities, from an eager copy."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    return eager, eager(images, output_hidden_states=True, output_attentions=True)


def maps(rows: torch.Tensor) -> torch.Tensor:
    return rows.reshape(rows.shape[0], 1, 4, 4)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_every_method_finds_the_parts_and_leaves_the_model_alone(family):
    model = make(family)
    images = images_for()
    before = model_state(model)
    for name in METHODS:
        if name == "class_space_gradient" and family == "beit":
            with pytest.raises(UnsupportedModelError, match="needs a \\[CLS\\] token that"):
                create_method(name, model)
            continue
        result = create_method(name, model).attribute(images, TARGET)
        assert result.shape == (3, 1, 4, 4) and torch.isfinite(result).all(), name
    assert_state_unchanged(model, before)
    assert model.config._attn_implementation == "sdpa"  # eager only while hooked


def test_class_space_matches_hidden_states(family):
    model = make(family)
    images = images_for()
    with torch.no_grad():
        _, out = reference(model, images)
        prefix = FAMILIES[family][4]
        got = ClassSpaceSaliency(model).attribute(images, TARGET, layer="all", per_layer=True)
        for block in range(2):
            logits = project(model, family, out.hidden_states[block + 1][:, prefix:])
            want = logits[torch.arange(3), :, TARGET].reshape(3, 4, 4)
            torch.testing.assert_close(got[:, block], want, rtol=1e-4, atol=1e-5)
        # the reference heads reproduce the model's logits from its last hidden state
        torch.testing.assert_close(
            head_logits(model, family, out.hidden_states[-1]), out.logits, rtol=1e-4, atol=1e-5
        )


def test_components_sum_to_the_residual_with_layer_scale(family):
    """attention + MLP branch of block b = hidden_{b+1} - hidden_b (layer scale included)."""
    model = make(family)
    images = images_for()
    anatomy = ClassSpaceSaliency(model).anatomy
    with torch.no_grad():
        _, out = reference(model, images)
        with anatomy.capture([(c, b) for c in ("attention", "mlp") for b in range(2)]) as cap:
            anatomy.forward(images)
    for block in range(2):
        delta = out.hidden_states[block + 1] - out.hidden_states[block]
        summed = cap.tokens[("attention", block)] + cap.tokens[("mlp", block)]
        torch.testing.assert_close(summed, delta, rtol=1e-4, atol=1e-5)


def test_rollout_and_raw_attention_match_output_attentions(family):
    model = make(family)
    images = images_for()
    with torch.no_grad():
        _, out = reference(model, images)
    prefix = FAMILIES[family][4]
    n = out.attentions[0].shape[-1]
    rolled = torch.eye(n)
    for p in out.attentions:
        a = p.mean(1) + torch.eye(n)
        rolled = (a / a.sum(-1, keepdim=True)) @ rolled
    want = maps(read(family, rolled)[:, prefix:])
    torch.testing.assert_close(
        AttentionRollout(model).attribute(images), want, rtol=1e-4, atol=1e-6
    )
    want = maps(read(family, out.attentions[-1].mean(1))[:, prefix:])
    torch.testing.assert_close(RawAttention(model).attribute(images), want, rtol=1e-4, atol=1e-6)


def test_chefer_matches_output_attentions_gradients(family):
    model = make(family)
    images = images_for()
    _, out = reference(model, images)
    grads = torch.autograd.grad(out.logits[torch.arange(3), TARGET].sum(), out.attentions)
    n = out.attentions[0].shape[-1]
    relevance = torch.eye(n).repeat(3, 1, 1)
    for p, g in zip(out.attentions, grads, strict=True):
        relevance = relevance + (g * p).clamp(min=0).mean(1) @ relevance
    want = maps(read(family, relevance.detach())[:, FAMILIES[family][4] :])
    got = CheferRollout(model).attribute(images, TARGET)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gradcam_equals_captum_on_the_last_pre_attention_norm(family):
    model = make(family)
    images = images_for()
    prefix = FAMILIES[family][4]
    layer = GradCAM(model).layer
    norms = [getattr(m, "layernorm_before", getattr(m, "norm1", None)) for m in model.modules()]
    assert layer is [m for m in norms if m is not None][-1]  # the last block's
    probe = nn.Identity()

    def reshape(module, args, output):
        image = probe(output[:, prefix:].permute(0, 2, 1).reshape(3, -1, 4, 4))
        return torch.cat([output[:, :prefix], image.flatten(2).permute(0, 2, 1)], 1)

    handle = layer.register_forward_hook(reshape)
    try:
        want = LayerGradCam(lambda x: model(x).logits, probe).attribute(
            images, TARGET, relu_attributions=True
        )
    finally:
        handle.remove()
    torch.testing.assert_close(GradCAM(model).attribute(images, TARGET), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "dinov2_reg"])
def test_class_space_gradient_uses_cls_attention(family):
    """Block-local reference on an eager copy: CE of the [CLS] attention branch (after
    DINOv2's layer scale) projected through the head, gradient w.r.t. that block's probs."""
    model = make(family)
    images = images_for()
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
    prefix = FAMILIES[family][4]
    total = 0.0
    for output, probs in branches:
        logits = project(eager, family, output[:, 0])
        loss = nn.functional.cross_entropy(logits, TARGET, reduction="sum")
        (grad,) = torch.autograd.grad(loss, probs, retain_graph=True)
        total = total - grad[:, :, 0, prefix:].sum(1)
    got = ClassSpaceAttentionGradient(model).attribute(images, TARGET)
    torch.testing.assert_close(got, maps(total.detach()), rtol=1e-4, atol=1e-5)


def test_load_model_hf_from_a_saved_directory_and_offline_error(tmp_path, monkeypatch):
    from class_space_saliency.models import load_model

    model = make("vit")
    model.config.id2label = {i: f"class {i}" for i in range(7)}
    model.save_pretrained(tmp_path)
    T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3).save_pretrained(
        tmp_path
    )
    loaded, prep = load_model(f"hf:{tmp_path}")
    images = images_for()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits)
    assert prep.input_size == (3, 32, 32) and prep.mean == (0.5, 0.5, 0.5)
    assert prep.class_names[6] == "class 6"

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(T.AutoModelForImageClassification, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match="could not load the Hugging Face model"):
        load_model("hf:nobody/no-such-model-here")


def test_identifiability_and_token_removal(family):
    from class_space_saliency import class_identifiability
    from class_space_saliency.evaluation.curves import check_token_model

    model = make(family)
    images = images_for(4)
    labels = torch.tensor([0, 1, 2, 3])
    result = class_identifiability(model, images, labels)
    with torch.no_grad():
        _, out = reference(model, images)
        last = project(model, family, out.hidden_states[-1])
    prefix = FAMILIES[family][4]
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
def test_token_removal_equals_the_models_own_attention_mask(family):
    """Removing image tokens = masking them as keys (HF attention_mask) and out of the mean."""
    from class_space_saliency.evaluation.curves import perturbation_curves
    from class_space_saliency.evaluation.protocols import PROTOCOLS

    model = make(family)
    images = images_for()
    saliency = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    protocol = dataclasses.replace(PROTOCOLS["vilas2023/positive"], score="logit")
    _, curves = perturbation_curves(
        model, images, saliency, TARGET, protocol, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    prefix = FAMILIES[family][4]
    order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
    for step, removed in enumerate(range(1, 16)):
        keep = torch.ones(3, prefix + 16, dtype=torch.bool)
        keep.scatter_(1, order[:, :removed] + prefix, False)
        with torch.no_grad():
            out = model(images, attention_mask=keep, output_hidden_states=True)
            if family.startswith("dinov2"):  # its head averages the kept image tokens only
                normed = model.base_model.layernorm(out.hidden_states[-1])
                kept = keep[:, prefix:, None].float()
                mean = (normed[:, prefix:] * kept).sum(1) / kept.sum(1)
                logits = model.classifier(torch.cat([normed[:, 0], mean], -1))
            else:
                logits = out.logits
        want = logits[torch.arange(3), TARGET]
        torch.testing.assert_close(curves[:, step], want, atol=1e-5, rtol=1e-4)


def test_benchmark_pixel_and_token_curves_read_hf_logits(tmp_path):
    from class_space_saliency.evaluation import load_records, run_benchmark

    model = make("vit")
    images = images_for(3)
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


def test_controls_on_the_patch_grid(family):
    import torch.nn.functional as F
    from test_swin_and_controls import sobel_by_hand

    model = make(family)
    images = images_for()
    want = F.avg_pool2d(images.mean(1, keepdim=True), 8)  # mean brightness per 8x8 patch
    torch.testing.assert_close(create_method("intensity", model).attribute(images, 0), want)
    torch.testing.assert_close(
        create_method("sobel", model).attribute(images), sobel_by_hand(images, 8)
    )
    noise = create_method("random", model).attribute(images)
    assert noise.shape == (3, 1, 4, 4) and ((noise >= 0) & (noise < 1)).all()
