"""Direct contributions (``decompose`` and ``class_space_contributions``): the parts sum to the
model's own logit on every tiny family, and the attention terms equal plain-torch references
(hand-run timm blocks, Hugging Face's own hidden states, hooks on the output projection)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from class_space_saliency import ClassSpaceContributions, ViTAnatomy, decompose
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.methods import create_method
from class_space_saliency.testing import (
    HF_FAMILIES,
    POOLED_FAMILIES,
    TIMM_TINY,
    VIT_FAMILIES,
    assert_state_unchanged,
    block_by_hand,
    class_logits,
    direct_terms_by_hand,
    embed_by_hand,
    frozen_norm_gradient,
    model_state,
    perturb_weights,
    tiny_images,
    token_states,
)

TARGET = torch.tensor([0, 3, 6])
ROWS = torch.arange(3)
TIMM_FAMILIES = [f for f in (*VIT_FAMILIES, *POOLED_FAMILIES) if f != "torchvision"]


def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(images)
    return output if isinstance(output, torch.Tensor) else output.logits


def assert_sums_to_the_logit(model: nn.Module, images: torch.Tensor, target=TARGET) -> None:
    parts = decompose(model, images, target)
    want = logits_of(model, images)[ROWS, target]
    torch.testing.assert_close(parts.logit, want, rtol=1e-5, atol=1e-6)
    # 1e-4 relative; the absolute floor covers a logit near zero, where float32 sums of parts
    # of order one still differ by ~1e-7 (seen with other random weights of another timm)
    torch.testing.assert_close(parts.total(), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", [*VIT_FAMILIES, *POOLED_FAMILIES])
def test_parts_sum_to_the_logit_on_timm_and_torchvision(tiny_vit, family):
    """[CLS], distilled, registers, pooled; with (plain, BEiT, EVA) and without layer scale."""
    model, images = tiny_vit(family), tiny_images(family)
    assert_sums_to_the_logit(model, images)
    parts = decompose(model, images, TARGET)
    tokens = 1 + (images.shape[-2] // 4) * (images.shape[-1] // 4) if family == "dynamic" else None
    assert parts.attention.shape[:3] == (3, 3, 2)
    assert tokens is None or parts.attention.shape[-1] == tokens


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_parts_sum_to_the_logit_on_hugging_face(tiny_hf_vit, family):
    assert_sums_to_the_logit(tiny_hf_vit(family), tiny_images())


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_parts_sum_to_the_logit_on_open_clip_with_prompts_as_classes(tiny_clip, pool):
    _, classifier = tiny_clip(pool)
    assert_sums_to_the_logit(classifier, tiny_images(), torch.tensor([0, 3, 2]))


def test_rms_norm_and_float64_are_exact_too():
    model = perturb_weights(
        timm.create_model("vit_tiny_patch16_224", norm_layer=timm.layers.RmsNorm, **TIMM_TINY)
    )
    assert_sums_to_the_logit(model, tiny_images())
    double = copy.deepcopy(model).double()
    images = tiny_images().double()
    parts = decompose(double, images, TARGET)
    torch.testing.assert_close(
        parts.total(), logits_of(double, images)[ROWS, TARGET], rtol=1e-12, atol=0.0
    )


# ---------------------------------------------------------------------------- references
@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_attention_terms_equal_a_plain_torch_computation(tiny_vit, family):
    model, images = tiny_vit(family), tiny_images(family)
    with torch.no_grad():
        want = direct_terms_by_hand(model, images, TARGET)
    got = decompose(model, images, TARGET).attention
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def hf_terms_by_hand(model: nn.Module, images: torch.Tensor, target: torch.Tensor):
    """From the model's own hidden states and eager attention: [CLS] (DeiT: and the
    distillation token) reads; values = v_proj(layernorm_before(hidden state))."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(images, output_hidden_states=True, output_attentions=True)
    base = eager.base_model
    if hasattr(eager, "cls_classifier"):
        heads = [eager.cls_classifier, eager.distillation_classifier]
    else:
        heads = [eager.classifier]
    terms = 0
    for row, head in enumerate(heads):
        state = out.hidden_states[-1][:, row]
        grad = frozen_norm_gradient(base.layernorm, head, state, target) / len(heads)
        per_block = []
        entering = out.hidden_states[:-1]  # hidden_states[l] enters layer l
        for layer, hidden, probs in zip(base.layers, entering, out.attentions, strict=True):
            attention = layer.attention
            with torch.no_grad():
                values = attention.v_proj(layer.layernorm_before(hidden))  # (B, N, H * d)
            values = values.unflatten(-1, (probs.shape[1], -1))  # (B, N, H, d)
            per_head = attention.o_proj.weight.unflatten(1, (probs.shape[1], -1))  # (D, H, d)
            written = torch.einsum("bnhk,ehk->bhne", values, per_head) @ grad[:, None, :, None]
            per_block.append(probs[:, :, row] * written.squeeze(-1))
        terms = terms + torch.stack(per_block, 1)
    return terms


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_hugging_face_attention_terms_equal_its_own_hidden_states(tiny_hf_vit, family):
    model = tiny_hf_vit(family)
    want = hf_terms_by_hand(model, tiny_images(), TARGET)
    got = decompose(model, tiny_images(), TARGET).attention
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["plain", "avgpool", "registers"])
def test_the_tokens_of_each_head_sum_to_that_heads_output(tiny_vit, family):
    """Head outputs from a hook on the input of ``attn.proj`` (the concatenated heads)."""
    model, images = tiny_vit(family), tiny_images(family)
    concatenated, final = [], []
    handles = [
        block.attn.proj.register_forward_hook(lambda m, args, o: concatenated.append(args[0]))
        for block in model.blocks
    ]
    handles.append(model.blocks[-1].register_forward_hook(lambda m, a, o: final.append(o)))
    try:
        logits_of(model, images)
    finally:
        for handle in handles:
            handle.remove()
    npt = model.num_prefix_tokens
    pooled = model.global_pool == "avg"
    read = (lambda t: t[:, npt:].mean(1)) if pooled else (lambda t: t[:, 0])
    norm = model.fc_norm if pooled else model.norm
    grad = frozen_norm_gradient(norm, model.head, read(final[0]), TARGET)
    want = []
    for block, heads in zip(model.blocks, concatenated, strict=True):
        per_head = read(heads).unflatten(-1, (2, -1))  # (B, H, d) at the read state
        weight = block.attn.proj.weight.unflatten(1, (2, -1))  # (D, H, d)
        written = block.ls1(torch.einsum("bhk,ehk->bhe", per_head, weight))
        want.append((written * grad[:, None]).sum(-1))
    got = decompose(model, images, TARGET).head_terms()
    torch.testing.assert_close(got, torch.stack(want, 1), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- the two norms
def test_frozen_and_recomputed_norms_differ_where_the_paper_projects_each_part(tiny_vit):
    """Recomputed: every part through head(norm(part)), the paper's logit lens; the parts
    then miss the logit. Frozen: the part's share of the logit at the actual scale."""
    model, images = tiny_vit("plain"), tiny_images("plain")
    frozen = decompose(model, images, TARGET)
    lens = decompose(model, images, TARGET, norm="recomputed")
    with torch.no_grad():
        states = token_states(model, images)
        embedded = embed_by_hand(model, images)[0][:, 0]
        last_mlp = states["mlp"][-1][:, 0]
        final = states["residual"][-1][:, 0]
        projected = {
            "embedding": class_logits(model, embedded)[ROWS, TARGET],
            "mlp": class_logits(model, last_mlp)[ROWS, TARGET],
        }
    torch.testing.assert_close(lens.embedding, projected["embedding"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lens.mlp[:, -1], projected["mlp"], rtol=1e-4, atol=1e-5)
    grad = frozen_norm_gradient(model.norm, model.head, final, TARGET)
    torch.testing.assert_close(frozen.embedding, (grad * embedded).sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(frozen.mlp[:, -1], (grad * last_mlp).sum(-1), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(lens.embedding, frozen.embedding, atol=1e-3)
    torch.testing.assert_close(lens.logit, frozen.logit)
    assert ((lens.total() - lens.logit).abs() > 0.1).all()  # the logit lens does not add up
    torch.testing.assert_close(frozen.total(), frozen.logit, rtol=1e-4, atol=1e-6)  # as above


def test_recomputed_norm_refuses_per_token_norms_before_pooling(tiny_hf_vit):
    with pytest.raises(UnsupportedModelError, match="normalises each pooled token"):
        decompose(tiny_hf_vit("dinov2"), tiny_images(), 0, norm="recomputed")


# ---------------------------------------------------------------------------- targets, labels
def test_baseline_target_decomposes_the_logit_difference(tiny_vit):
    model, images = tiny_vit("registers"), tiny_images("registers")
    other = torch.tensor([1, 1, 2])
    contrast = decompose(model, images, TARGET, baseline_target=other)
    logits = logits_of(model, images)
    want = logits[ROWS, TARGET] - logits[ROWS, other]
    torch.testing.assert_close(contrast.total(), want, rtol=1e-4, atol=1e-6)
    one, two = decompose(model, images, TARGET), decompose(model, images, other)
    torch.testing.assert_close(contrast.parts(tokens=True), one.parts(True) - two.parts(True))
    assert contrast.baseline_target.tolist() == [1, 1, 2]


def test_the_predicted_class_is_the_default_target(tiny_vit):
    model, images = tiny_vit("distilled"), tiny_images("distilled")
    predicted = logits_of(model, images).argmax(-1)
    parts = decompose(model, images)
    assert torch.equal(parts.target, predicted)
    torch.testing.assert_close(parts.total(), decompose(model, images, predicted).total())


def test_labels_parts_top_and_to_dict(tiny_vit):
    parts = decompose(tiny_vit("plain"), tiny_images("plain"), TARGET)
    heads = [f"L{b}H{h}" for b in range(3) for h in range(2)]
    want = ["embed", *heads[:2], "L0.mlp", *heads[2:4], "L1.mlp", *heads[4:], "L2.mlp", "bias"]
    assert parts.labels() == want
    values = parts.parts()
    assert values.shape == (3, len(want))
    torch.testing.assert_close(values.sum(1), parts.total())
    torch.testing.assert_close(values[:, 1], parts.attention[:, 0, 0].sum(-1))
    assert (
        len(parts.labels(tokens=True))
        == parts.parts(tokens=True).shape[1]
        == 1 + 3 * (2 * 17 + 1) + 1
    )
    assert parts.labels(tokens=True)[1:3] == ["L0H0.tok0", "L0H0.tok1"]
    for row in range(3):
        by_abs = sorted(zip(want, values[row].tolist(), strict=True), key=lambda p: -abs(p[1]))
        assert parts.top(4)[row] == by_abs[:4]
        by_value = sorted(zip(want, values[row].tolist(), strict=True), key=lambda p: -p[1])
        assert parts.top(4, signed=True)[row] == by_value[:4]
    loaded = json.loads(json.dumps(parts.to_dict()))
    assert loaded["labels"] == want and loaded["target"] == [0, 3, 6]
    assert loaded["total"] == pytest.approx(parts.total().tolist())
    assert torch.tensor(loaded["attention"]).shape == (3, 3, 2, 17)
    assert "image 0: logit[0]" in str(parts)
    with pytest.raises(ValueError, match="k must be a positive int"):
        parts.top(0)


# ---------------------------------------------------------------------------- refusals, checks
def post_norm_vit() -> nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", block_fn=ResPostBlock, **TIMM_TINY)
    return perturb_weights(model)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (post_norm_vit, "post-norm"),
        (
            lambda: timm.create_model("vit_tiny_patch16_224", scale_attn_norm=True, **TIMM_TINY),
            "applies norm LayerNorm to the head outputs",
        ),
        (
            lambda: torchvision.models.VisionTransformer(
                32, 8, 2, 2, 32, 64, num_classes=7, representation_size=16
            ),
            "not one linear layer",
        ),
    ],
)
def test_models_where_the_split_is_not_exact_are_refused_with_the_reason(build, match):
    model = build().eval()
    with pytest.raises(UnsupportedModelError, match=match):
        decompose(model, tiny_images(), 0)
    with pytest.raises(UnsupportedModelError, match=match):
        ClassSpaceContributions(model)


def test_swin_is_refused(tiny_swin):
    with pytest.raises(UnsupportedModelError, match="shifted windows"):
        decompose(tiny_swin("timm"), tiny_images(), 0)


def test_runtime_checks_refuse_models_that_do_not_add_up(tiny_vit):
    """A block that rescales its output, or a head that is not the one found, is caught by
    comparing against the model's own states and logits."""
    model = copy.deepcopy(tiny_vit("plain"))
    block = model.blocks[1]
    block.forward = lambda x, *args, **kwargs: type(block).forward(block, x) * 1.5
    with pytest.raises(UnsupportedModelError, match="do not add embedding, attention and MLP"):
        decompose(model, tiny_images(), 0)
    model = copy.deepcopy(tiny_vit("plain"))
    model.forward_head = lambda x, pre_logits=False: model.head(model.fc_norm(x[:, 0]).tanh())
    with pytest.raises(UnsupportedModelError, match=r"readout .* is not reproduced"):
        decompose(model, tiny_images(), 0)


def test_arguments_are_checked(tiny_vit):
    model = tiny_vit("plain")
    with pytest.raises(ValueError, match="norm must be one of"):
        decompose(model, tiny_images(), 0, norm="lens")
    with pytest.raises(ValueError, match="out of range"):
        decompose(model, tiny_images(), 0, baseline_target=7)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        decompose(model, tiny_images()[0], 0)


def test_the_model_is_left_as_it_was(tiny_vit, tiny_hf_vit):
    model = copy.deepcopy(tiny_vit("plain")).train()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    before = model_state(model)
    decompose(model, tiny_images(), 0)
    assert_state_unchanged(model, before)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    hf = tiny_hf_vit("vit")
    decompose(hf, tiny_images(), 0)
    assert hf.config._attn_implementation == "sdpa"


def test_capture_records_module_inputs_and_reduces_probabilities(tiny_vit):
    model, images = tiny_vit("plain"), tiny_images("plain")
    anatomy = ViTAnatomy.from_model(model)

    def reduce(kind, block, tensor):
        return tensor[:, :, 0] if kind == "probabilities" else tensor

    inputs = [("block", 0), ("attention", 1)]
    with anatomy.capture(attention=[1], inputs=inputs, reduce=reduce) as cap:
        anatomy.forward(images)
    with torch.no_grad():
        embedded = embed_by_hand(model, images)[0]
        first = block_by_hand(model.blocks[0], embedded)
        second = block_by_hand(model.blocks[1], first.output)
    torch.testing.assert_close(cap.inputs[("block", 0)], embedded)
    torch.testing.assert_close(cap.inputs[("attention", 1)], second.normed)
    torch.testing.assert_close(cap.attention[1], second.probs[:, :, 0])


# ---------------------------------------------------------------------------- the method
def test_method_maps_are_the_image_token_terms(tiny_vit):
    model, images = tiny_vit("plain"), tiny_images("plain")
    terms = decompose(model, images, TARGET).attention[..., 1:].unflatten(-1, (4, 4))
    explainer = ClassSpaceContributions(model)
    torch.testing.assert_close(explainer.attribute(images, TARGET), terms.sum((1, 2))[:, None])
    per_layer = explainer.attribute(images, TARGET, per_layer=True)
    torch.testing.assert_close(per_layer, terms.sum(2))
    per_head = explainer.attribute(images, TARGET, layer=-1, per_head=True)
    torch.testing.assert_close(per_head, terms[:, 2])
    both = explainer.attribute(images, TARGET, layer=[2, 0], heads=1, per_layer=True, per_head=True)
    torch.testing.assert_close(both, terms[:, [2, 0]][:, :, [1]].flatten(1, 2))
    chunked = explainer.attribute(images, TARGET, max_batch_size=2)
    torch.testing.assert_close(chunked, explainer.attribute(images, TARGET))


def test_method_option_errors(tiny_vit):
    model = tiny_vit("plain")
    explainer = create_method("class_space_contributions", model, heads=-1)
    assert explainer.heads == [1] and explainer.layer == [0, 1, 2]
    with pytest.raises(ValueError, match="head 2 is out of range"):
        explainer.attribute(tiny_images(), 0, heads=2)
    with pytest.raises(ValueError, match="heads must be"):
        explainer.attribute(tiny_images(), 0, heads="first")
    with pytest.raises(TypeError, match="head indices must be ints"):
        explainer.attribute(tiny_images(), 0, heads=[True])
    with pytest.raises(TypeError, match="per_head must be a bool"):
        explainer.attribute(tiny_images(), 0, per_head=1)


def test_method_runs_on_pooled_and_clip_models(tiny_vit, tiny_clip):
    for model in (tiny_vit("reg4gap"), tiny_clip("avg")[1]):
        maps = ClassSpaceContributions(model).attribute(tiny_images(), target=[0, 1, 2])
        terms = decompose(model, tiny_images(), [0, 1, 2]).image_terms().sum((1, 2))
        torch.testing.assert_close(maps, terms[:, None])
        assert torch.isfinite(maps).all() and maps.shape == (3, 1, 4, 4)
