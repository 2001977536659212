"""CLIP zero-shot classifiers (open_clip, tiny random config, bundled tokenizer): the text
space as class space, against a hand-run visual tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from class_space_saliency import (
    AttentionRollout,
    ClassSpaceSaliency,
    GradCAM,
    RawAttention,
    SobelSaliency,
    class_identifiability,
)
from class_space_saliency.adapters import UnsupportedModelError
from class_space_saliency.methods import create_method
from class_space_saliency.models import zero_shot_clip
from class_space_saliency.testing import (
    CLIP_PROMPTS,
    assert_state_unchanged,
    assert_token_removal_matches,
    captum_gradcam_on_tokens,
    model_state,
    rollout_by_hand,
    sobel_by_hand,
    tiny_images,
)

open_clip = pytest.importorskip("open_clip")

PROMPTS = list(CLIP_PROMPTS)
TARGET = torch.tensor([0, 3, 2])


def text_space(clip) -> torch.Tensor:
    tokens = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokens), dim=-1)


def visual_by_hand(clip, images, keep=None):
    """Residual states and attention probabilities of the visual tower, block by block;
    tokens where ``keep`` (B, N) is False are masked out as attention keys."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    padding = None if keep is None else ~keep
    states, probs = [], []
    for block in v.transformer.resblocks:
        h = block.ln_1(x)
        out, p = block.attn(
            h, h, h, key_padding_mask=padding, need_weights=True, average_attn_weights=False
        )
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        states.append(x)
        probs.append(p)
    return states, probs


def cosine_logits(clip, tokens, text):
    return (
        clip.logit_scale.exp()
        * F.normalize(clip.visual.ln_post(tokens) @ clip.visual.proj, dim=-1)
        @ text.T
    )


def test_zero_shot_logits_are_scaled_cosines(tiny_clip):
    clip, classifier = tiny_clip()
    images = tiny_images()
    with torch.no_grad():
        image = F.normalize(clip.encode_image(images), dim=-1)
        want = clip.logit_scale.exp() * image @ text_space(clip).T
        torch.testing.assert_close(classifier(images), want)


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_class_space_is_the_text_space(tiny_clip, pool):
    clip, classifier = tiny_clip(pool)
    images = tiny_images()
    text = text_space(clip)
    with torch.no_grad():
        states, _ = visual_by_hand(clip, images)
        if pool == "tok":  # the hand-run tower reproduces the classifier from [CLS]
            torch.testing.assert_close(
                cosine_logits(clip, states[-1][:, 0], text), classifier(images)
            )
        before = model_state(classifier)
        got = ClassSpaceSaliency(classifier, layer="all").attribute(images, TARGET, per_layer=True)
        assert_state_unchanged(classifier, before)
        for block, tokens in enumerate(states):
            logits = cosine_logits(clip, tokens[:, 1:], text)
            want = logits[torch.arange(3), :, TARGET].reshape(3, 4, 4)
            torch.testing.assert_close(got[:, block], want, rtol=1e-4, atol=1e-5)


def test_attention_maps_and_identifiability(tiny_clip):
    clip, classifier = tiny_clip()
    images = tiny_images()
    with torch.no_grad():
        states, probs = visual_by_hand(clip, images)
    want = rollout_by_hand(probs)[:, 0, 1:].reshape(3, 1, 4, 4)
    torch.testing.assert_close(
        AttentionRollout(classifier).attribute(images), want, rtol=1e-4, atol=1e-6
    )
    want = probs[-1].mean(1)[:, 0, 1:].reshape(3, 1, 4, 4)
    torch.testing.assert_close(
        RawAttention(classifier).attribute(images), want, rtol=1e-4, atol=1e-6
    )
    result = class_identifiability(classifier, images, TARGET)
    with torch.no_grad():
        last = cosine_logits(clip, states[-1], text_space(clip))
    cls_top1 = (last[:, 0].argmax(-1) == TARGET).float().mean() * 100
    torch.testing.assert_close(result.cls_rate[-1], cls_top1)
    # Grad-CAM: Captum's LayerGradCam on the last ln_1's image tokens laid out as a grid
    layer = clip.visual.transformer.resblocks[-1].ln_1
    want = captum_gradcam_on_tokens(classifier, layer, images, TARGET, 1, (4, 4))
    torch.testing.assert_close(GradCAM(classifier).attribute(images, TARGET), want)
    for name in ("chefer", "class_space_gradient"):
        with pytest.raises(UnsupportedModelError, match=r"nn\.MultiheadAttention"):
            create_method(name, classifier)


def test_zero_shot_clip_validates_its_arguments(tiny_clip):
    clip, _ = tiny_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with pytest.raises(ValueError, match="at least two"):
        zero_shot_clip(clip, tokenizer, ["a cat"])
    with pytest.raises(ValueError, match="list of strings"):
        zero_shot_clip(clip, tokenizer, "a cat")
    with pytest.raises(TypeError, match="open_clip CLIP model"):
        zero_shot_clip(torch.nn.Linear(2, 2), tokenizer, PROMPTS)


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_token_removal_equals_masked_keys(tiny_clip, pool):
    """Hand-run visual tower with removed tokens masked as keys (and out of the mean)."""
    clip, classifier = tiny_clip(pool)
    images = tiny_images()
    text, v = text_space(clip), clip.visual

    def masked_logits(keep: torch.Tensor) -> torch.Tensor:
        last = visual_by_hand(clip, images, keep)[0][-1]
        if pool == "tok":
            return cosine_logits(clip, last[:, 0], text)
        kept = keep[:, 1:, None].float()
        pooled = (v.ln_post(last[:, 1:]) * kept).sum(1) / kept.sum(1)
        return clip.logit_scale.exp() * F.normalize(pooled @ v.proj, dim=-1) @ text.T

    assert_token_removal_matches(classifier, images, TARGET, masked_logits, 1)


def test_controls_on_the_patch_grid(tiny_clip):
    images = tiny_images()
    torch.testing.assert_close(
        SobelSaliency(tiny_clip()[1]).attribute(images), sobel_by_hand(images, 8)
    )


def test_load_model_and_cli_take_open_clip_with_prompts(tmp_path):
    import json

    from PIL import Image

    from class_space_saliency.cli import main
    from class_space_saliency.models import load_model

    config = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-css-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-css-test", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    prompts = ["a photo of a cat", "a photo of a dog", "a tree"]
    model, prep = load_model(
        "open_clip:tiny-css-test", weights=tmp_path / "tiny.pt", prompts=prompts
    )
    assert prep.class_names == tuple(prompts) and prep.input_size == (3, 32, 32)
    reference = zero_shot_clip(clip.eval(), open_clip.get_tokenizer("tiny-css-test"), prompts)
    images = tiny_images(batch=2)
    torch.testing.assert_close(model(images), reference(images))
    with pytest.raises(ValueError, match="prompts"):
        load_model("open_clip:tiny-css-test", weights=tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="tag"):
        load_model("open_clip:tiny-css-test", prompts=prompts)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "out"
    code = main(["attribute", str(tmp_path / "red.png"), "--model", "open_clip:tiny-css-test",
                 "--weights", str(tmp_path / "tiny.pt"), "--prompts", *prompts,
                 "--target", "a tree", "--save-maps", "--out", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads((out / "predictions.json").read_text())[0]
    assert record["target"]["name"] == "a tree"
    assert {c["name"] for c in record["top5"]} == set(prompts)


def test_sequence_first_transformers_are_refused(tiny_clip, monkeypatch):
    """open_clip before 2.26.1 passes (L, B, D) tokens with no batch_first flag: refused."""
    clip, classifier = tiny_clip()
    assert clip.visual.transformer.batch_first  # read as batch-first today
    monkeypatch.delattr(clip.visual.transformer, "batch_first")
    with pytest.raises(UnsupportedModelError, match=r"open_clip_torch>=2\.26\.1"):
        ClassSpaceSaliency(classifier)
