"""Protocols, perturbation curves and AUCs against hand-computed cases on toy models."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from class_space_saliency.evaluation import (
    PRESETS,
    PROTOCOLS,
    PerturbationProtocol,
    area_under_curve,
    perturbation_curves,
    resolve_protocols,
    step_counts,
)
from class_space_saliency.evaluation.curves import baseline_images, check_token_model, curve_x
from class_space_saliency.evaluation.protocols import protocol_to_dict
from class_space_saliency.testing import ToyTokenViT, assert_token_removal_matches, tiny_images

MEAN, STD = (0.5,), (0.5,)


class RegionSum(nn.Module):
    """Two classes: logit 1 = (sum of pixel-space values in a region - threshold) * scale."""

    def __init__(self, region: torch.Tensor, threshold: float, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.threshold, self.scale = threshold, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * STD[0] + MEAN[0]
        total = (pixels * self.region).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(total), (total - self.threshold) * self.scale], -1)


def curves_of(model, images, maps, targets, protocol, **kwargs):
    return perturbation_curves(model, images, maps, targets, protocol, mean=MEAN, std=STD, **kwargs)


# ---------------------------------------------------------------------------- protocols
def test_presets_are_the_papers():
    assert list(PRESETS) == ["chefer2021", "rise2018", "vilas2023", "road2022"]
    chefer = PROTOCOLS["chefer2021/positive"]
    assert chefer.steps == tuple(i / 10 for i in range(10))
    assert (chefer.unit, chefer.baseline, chefer.score, chefer.auc) == (
        "pixel",
        "black",
        "accuracy",
        "trapezoid_percent",
    )
    assert (chefer.map_class, chefer.score_class) == ("predicted", "label")
    deletion, insertion = PRESETS["rise2018"]
    assert (deletion.baseline, insertion.baseline) == ("zero", "blur")
    assert (insertion.blur_kernel_size, insertion.blur_sigma) == (11, 5.0)
    assert deletion.steps[0] == 0 and deletion.steps[-1] == 1 and deletion.score == "probability"
    vilas = PROTOCOLS["vilas2023/negative"]
    assert (vilas.unit, vilas.steps, vilas.baseline, vilas.auc) == (
        "token",
        None,
        None,
        "max_normalised_sum",
    )
    better = {name: p.higher_is_better for name, p in PROTOCOLS.items()}
    assert better == {
        "chefer2021/positive": False,
        "chefer2021/negative": True,
        "rise2018/deletion": False,
        "rise2018/insertion": True,
        "vilas2023/positive": False,
        "vilas2023/negative": True,
        "road2022/morf": False,
        "road2022/lerf": True,
    }
    morf = PROTOCOLS["road2022/morf"]
    assert morf.steps == tuple(i / 10 for i in range(1, 10))
    assert (morf.unit, morf.baseline, morf.score, morf.auc, morf.impute_noise) == (
        "pixel",
        "impute",
        "probability",
        "mean",
        0.01,
    )
    assert (morf.map_class, morf.score_class, morf.extra_scores) == (
        "label",
        "label",
        ("accuracy",),
    )


def test_protocol_knobs_and_resolution():
    with pytest.raises(ValueError, match="increasing"):
        dataclasses.replace(PROTOCOLS["vilas2023/positive"], steps=[0.5, 0.25])
    coarse = dataclasses.replace(PROTOCOLS["vilas2023/positive"], name="coarse", steps=[0.25, 0.5])
    assert coarse.steps == (0.25, 0.5)
    assert [p.name for p in resolve_protocols(["rise2018", "chefer2021/negative", coarse])] == [
        "rise2018/deletion",
        "rise2018/insertion",
        "chefer2021/negative",
        "coarse",
    ]
    with pytest.raises(ValueError, match="unknown protocol"):
        resolve_protocols(["chefer"])
    with pytest.raises(ValueError, match="unique"):
        resolve_protocols(["rise2018", "rise2018/deletion"])
    with pytest.raises(ValueError, match="no baseline"):
        dataclasses.replace(PROTOCOLS["vilas2023/positive"], baseline="black")
    with pytest.raises(ValueError, match="order"):
        dataclasses.replace(PROTOCOLS["chefer2021/positive"], order="most")
    with pytest.raises(ValueError, match="baseline"):
        dataclasses.replace(PROTOCOLS["chefer2021/positive"], baseline=None)


def test_step_counts_and_auc_rules():
    chefer = PROTOCOLS["chefer2021/positive"]
    assert step_counts(chefer, 16)[1] == [0, 1, 3, 4, 6, 8, 9, 11, 12, 14]
    x, counts = step_counts(PROTOCOLS["vilas2023/positive"], 4)
    assert (x, counts) == ([0.25, 0.5, 0.75], [1, 2, 3])
    assert curve_x(PROTOCOLS["vilas2023/positive"], 3) == x
    hundred = dataclasses.replace(chefer, steps=(0.29,))
    assert step_counts(hundred, 100)[1] == [29]
    curve = np.array([1.0, 1.0, 0.0])
    assert area_under_curve(curve, [0, 0.5, 1], "trapezoid") == pytest.approx(0.75)
    assert area_under_curve(curve, [0, 0.1, 0.2], "trapezoid_percent") == pytest.approx(15)
    both = np.array([[0.5, 0.5, 0.25], [0.0, 0.0, 0.0]])
    # official vilas2023 normaliser: sum / (max * N), N = 4 units for the 3 counts 1, 2, 3
    assert area_under_curve(both, None, "max_normalised_sum").tolist() == [
        pytest.approx(1.25 / (0.5 * 4)),
        0,
    ]
    assert area_under_curve(both, None, "mean").tolist() == [pytest.approx(1.25 / 3), 0]


# ---------------------------------------------------------------------------- pixel protocols
def left_half(size: int) -> torch.Tensor:
    region = torch.zeros(1, size, size)
    region[..., : size // 2] = 1
    return region


PERFECT = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # patch grid 2x2: left column salient


@pytest.mark.parametrize(
    ("name", "saliency", "expected_curve", "expected_auc"),
    [
        # 16 white pixels, region = left 8; class 1 while > 5.5 region pixels remain.
        # counts floor(16 p): 0 1 3 4 6 8 9 11 12 14
        ("chefer2021/positive", PERFECT, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0], 15.0),
        ("chefer2021/negative", PERFECT, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 65.0),
        ("chefer2021/positive", -PERFECT, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 65.0),
        ("chefer2021/negative", -PERFECT, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0], 15.0),
    ],
)
def test_chefer_by_hand(name, saliency, expected_curve, expected_auc):
    model = RegionSum(left_half(4), threshold=5.5)
    images = torch.ones(1, 1, 4, 4)  # white in pixel space
    x, curves = curves_of(model, images, saliency, torch.tensor([1]), PROTOCOLS[name])
    assert x == [i / 10 for i in range(10)]
    assert curves[0].tolist() == expected_curve
    assert area_under_curve(curves, x, "trapezoid_percent")[0] == pytest.approx(expected_auc)


def test_patch_unit_by_hand():
    # 4 patches; counts floor(4 p) = 0 0 0 1 1 2 2 2 3 3; the first patch removed holds
    # 4 of the 8 region pixels, leaving 4 < 5.5
    protocol = dataclasses.replace(PROTOCOLS["chefer2021/positive"], unit="patch")
    model = RegionSum(left_half(4), threshold=5.5)
    x, curves = curves_of(model, torch.ones(1, 1, 4, 4), PERFECT, torch.tensor([1]), protocol)
    assert curves[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert area_under_curve(curves, x, protocol.auc)[0] == pytest.approx(25.0)


def test_rise_deletion_by_hand():
    # deletion to the normalised zero = pixel value 0.5: each deleted region pixel costs 0.5.
    # counts 0 4 8 12 16: region pixels deleted 0 4 8 8 8 -> region sum 8 6 4 4 4
    protocol = dataclasses.replace(PROTOCOLS["rise2018/deletion"], steps=(0, 0.25, 0.5, 0.75, 1))
    model = RegionSum(left_half(4), threshold=5.0)
    x, curves = curves_of(model, torch.ones(1, 1, 4, 4), PERFECT, torch.tensor([1]), protocol)
    sigmoid = [1 / (1 + math.exp(-(s - 5))) for s in (8, 6, 4, 4, 4)]
    assert curves[0].tolist() == pytest.approx(sigmoid)
    expected = 0.25 * (sigmoid[0] / 2 + sum(sigmoid[1:4]) + sigmoid[4] / 2)
    assert area_under_curve(curves, x, protocol.auc)[0] == pytest.approx(expected)


def test_insertion_reveals_salient_pixels_first():
    # insertion from black: region pixels revealed first; region sum = revealed region pixels
    protocol = dataclasses.replace(
        PROTOCOLS["rise2018/insertion"], baseline="black", score="logit", steps=(0, 0.25, 0.5, 1)
    )
    model = RegionSum(left_half(4), threshold=0.0)
    _, curves = curves_of(model, torch.ones(1, 1, 4, 4), PERFECT, torch.tensor([1]), protocol)
    assert curves[0].tolist() == [0, 4, 8, 8]


def test_baselines_match_independent_computations():
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    black = PROTOCOLS["chefer2021/positive"]
    pixels = baseline_images(black, images, mean, std) * torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(pixels + torch.tensor(mean).view(1, 3, 1, 1), torch.zeros(1))
    zero = baseline_images(PROTOCOLS["rise2018/deletion"], images, mean, std)
    assert torch.equal(zero, torch.zeros_like(images))
    average = dataclasses.replace(black, baseline="mean")
    channel = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(baseline_images(average, images, mean, std, channel)[1, :, 5, 7], channel)
    with pytest.raises(ValueError, match="dataset_mean"):
        baseline_images(average, images, mean, std)
    blurred = baseline_images(PROTOCOLS["rise2018/insertion"], images, mean, std)
    for image, blur in zip(images.numpy(), blurred.numpy(), strict=True):
        for channel_in, channel_out in zip(image, blur, strict=True):
            reference = cv2.GaussianBlur(channel_in, (11, 11), 5, borderType=cv2.BORDER_REFLECT_101)
            np.testing.assert_allclose(channel_out, reference, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_perfect_and_adversarial_maps_bound_the_auc(name):
    protocol = PROTOCOLS[name]
    generator = torch.Generator().manual_seed(0)
    if protocol.unit == "token":
        # token value = its patch sum; the perfect map is exactly that contribution
        model = ToyTokenViT(threshold=6.0)
        images = torch.rand(6, 1, 8, 8, generator=generator)
        perfect = nn.functional.avg_pool2d(images, 2) * 4
    else:
        model = RegionSum(left_half(16), threshold=100.0, scale=0.1)
        images = torch.rand(6, 1, 16, 16, generator=generator) * 2 - 1
        images[..., :8] = 1.0  # white region: 128 pixels, clean logit 2.8
        perfect = PERFECT.repeat(6, 1, 1, 1)
    targets = torch.ones(6, dtype=torch.long)
    assert (model(images).argmax(-1) == 1).all()
    aucs = {}
    for label, saliency in [
        ("perfect", perfect),
        ("random", torch.rand(perfect.shape, generator=generator)),
        ("adversarial", -perfect),
    ]:
        x, curves = curves_of(model, images, saliency, targets, protocol)
        aucs[label] = float(area_under_curve(curves.numpy().mean(0), x, protocol.auc))
    ordered = [aucs["perfect"], aucs["random"], aucs["adversarial"]]
    if protocol.higher_is_better:
        ordered.reverse()
    assert ordered == sorted(ordered), aucs
    assert ordered[0] < ordered[-1], aucs


# ---------------------------------------------------------------------------- token protocols
def test_vilas_by_hand():
    # patch sums 4 3 2 1 (and 0 0 0 0 for a second image that is never right)
    model = ToyTokenViT(threshold=2.5)
    values = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    images = values.repeat_interleave(2, 0).repeat_interleave(2, 1) / 4
    images = torch.stack([images, torch.zeros_like(images)])[:, None]
    saliency = values.expand(2, 1, 2, 2)
    targets = torch.tensor([1, 1])
    x, positive = curves_of(model, images, saliency, targets, PROTOCOLS["vilas2023/positive"])
    assert x == [0.25, 0.5, 0.75]
    # positive: remove the most salient first, kept sums 6 3 1 -> 1 1 0
    assert positive.tolist() == [[1, 1, 0], [0, 0, 0]]
    # negative: remove the least salient first, kept sums 9 7 4 -> 1 1 1
    _, negative = curves_of(model, images, saliency, targets, PROTOCOLS["vilas2023/negative"])
    assert negative.tolist() == [[1, 1, 1], [0, 0, 0]]
    rule = "max_normalised_sum"
    # sum(acc) / (max(acc) * N) with N = 4 image tokens (official code), not N - 1 = 3
    assert area_under_curve(positive, x, rule).tolist() == [pytest.approx(2 / 4), 0]
    assert area_under_curve(positive.mean(0), x, rule) == pytest.approx(1 / (0.5 * 4))


@pytest.mark.parametrize("family", ["plain", "distilled", "registers"])
def test_token_removal_equals_masked_attention(tiny_vit, family):
    # Removing image tokens from the sequence must give the logits of the full sequence
    # with those tokens masked out as attention keys (prefix-token pooling).
    model = tiny_vit(family)
    images = tiny_images(family)
    prefix = model.num_prefix_tokens

    def masked_logits(keep: torch.Tensor) -> torch.Tensor:
        return model(images, attn_mask=keep[:, None, None, :].expand(-1, 1, prefix + 16, -1))

    assert_token_removal_matches(model, images, torch.tensor([0, 1, 2]), masked_logits, prefix)


def test_chunking_does_not_change_curves(tiny_vit):
    model = tiny_vit("plain")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    saliency = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2])
    for name in ("vilas2023/negative", "rise2018/insertion"):
        protocol = dataclasses.replace(PROTOCOLS[name], score="logit")
        whole = curves_of(model, images, saliency, targets, protocol, max_batch_size=1000)[1]
        small = curves_of(model, images, saliency, targets, protocol, max_batch_size=2)[1]
        torch.testing.assert_close(whole, small, atol=1e-5, rtol=1e-5)


def test_token_removal_refuses_unsupported_models():
    cnn = nn.Sequential(nn.Conv2d(3, 7, 8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(TypeError, match="token removal is not supported"):
        check_token_model(cnn)
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match="token removal"):
        curves_of(
            cnn, images, torch.rand(1, 1, 4, 4), torch.tensor([0]), PROTOCOLS["vilas2023/positive"]
        )


def test_token_removal_on_torchvision_equals_masked_keys(tiny_vit):
    """Hand-run torchvision encoder with the removed tokens masked as attention keys."""
    model = tiny_vit("torchvision")
    images = tiny_images("torchvision")

    def masked_logits(keep: torch.Tensor) -> torch.Tensor:
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(3, -1, -1), x], 1) + model.encoder.pos_embedding
        for layer in model.encoder.layers:
            h = layer.ln_1(x)
            x = x + layer.self_attention(h, h, h, key_padding_mask=~keep, need_weights=False)[0]
            x = x + layer.mlp(layer.ln_2(x))
        return model.heads(model.encoder.ln(x)[:, 0])

    targets = torch.tensor([0, 1, 2])
    assert_token_removal_matches(model, images, targets, masked_logits, 1, "vilas2023/negative")


def test_map_shape_is_checked():
    model = RegionSum(left_half(4), threshold=5.5)
    chefer = PerturbationProtocol(
        **protocol_to_dict(PROTOCOLS["chefer2021/positive"])
    )  # round trip
    assert chefer == PROTOCOLS["chefer2021/positive"]
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        curves_of(model, torch.ones(2, 1, 4, 4), PERFECT, torch.tensor([1, 1]), chefer)
