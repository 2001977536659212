"""ROAD curves against pytorch-grad-cam's imputer, and random tie-breaking of every order."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn

from class_space_saliency.evaluation import PROTOCOLS, area_under_curve, perturbation_curves
from class_space_saliency.evaluation.curves import perturbation_ranks, perturbation_scores
from class_space_saliency.testing import ToyTokenViT

MEAN, STD = (0.5,), (0.5,)
curves_of = functools.partial(perturbation_curves, mean=MEAN, std=STD)

road = pytest.importorskip("pytorch_grad_cam.metrics.road")
# the reference imputer hands torch tensors to NumPy 2, which warns
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()


@pytest.mark.parametrize("name", ["road2022/morf", "road2022/lerf"])
def test_road_curve_by_hand(name):
    model = linear_model()
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 8, 8, generator=generator)
    maps = torch.randn(2, 1, 8, 8, generator=generator)  # pixel grid, no ties
    labels = torch.tensor([0, 2])
    protocol = dataclasses.replace(PROTOCOLS[name], impute_noise=0.0)
    x, scores = perturbation_scores(model, images, maps, labels, protocol, mean=MEAN, std=STD)
    assert x == [i / 10 for i in range(1, 10)]
    imputer = road.NoisyLinearImputer(noise=0)
    for b in range(2):
        order = maps[b, 0].flatten().argsort(descending=name.endswith("morf"))
        for step, fraction in enumerate(x):
            removed = order[: int(fraction * 64)]
            keep = torch.ones(64)
            keep[removed] = 0
            filled = imputer(images[b], keep.view(8, 8))
            logits = model(filled[None])[0]
            probability = logits.softmax(-1)[labels[b]]
            assert scores["probability"][b, step] == pytest.approx(probability.item(), abs=1e-4)
            assert scores["accuracy"][b, step] == float(logits.argmax() == labels[b])
    auc = area_under_curve(scores["probability"].numpy(), x, protocol.auc)
    assert auc.tolist() == pytest.approx(scores["probability"].mean(1).tolist())


def test_constant_map_gives_a_random_order():
    # patch 0 alone carries the class (sum of kept patches > 0.5); with raster tie-breaking the
    # positive order would remove it first for every image (curve 0, 0, 0). A random order
    # removes it among the first k of 4 tokens with probability k / 4.
    generator = torch.Generator().manual_seed(5)
    n = 400
    values = torch.rand(n, 2, 2, generator=generator) * 0.01  # distinct images, tiny sums
    values[:, 0, 0] = 1.0
    images = values.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    constant = torch.ones(n, 1, 2, 2)
    targets = torch.ones(n, dtype=torch.long)
    model = ToyTokenViT(threshold=0.5)
    _, curves = curves_of(model, images, constant, targets, PROTOCOLS["vilas2023/positive"])
    expected = torch.tensor([3 / 4, 2 / 4, 1 / 4])
    assert torch.allclose(curves.mean(0), expected, atol=0.07)
    ranks = perturbation_ranks(
        torch.ones(n, 16), "positive", torch.randn(n, 3, generator=generator)
    )
    assert torch.equal(ranks.sort(1).values, torch.arange(16).expand(n, -1))  # permutations
    first = ranks.argmin(1)
    counts = torch.bincount(first, minlength=16).float()
    assert counts.min() > n / 16 / 3  # every unit is sometimes first, none always
    assert ranks.float().mean(0).sub(7.5).abs().max() < 1.2


def test_ties_are_broken_within_tied_units_only():
    values = torch.tensor([[0.0, 2.0, 0.0, 1.0, 2.0, 0.0]]).expand(50, -1)
    images = torch.randn(50, 3, generator=torch.Generator().manual_seed(6))
    ranks = perturbation_ranks(values, "positive", images)
    # the two 2.0 units come first, then the 1.0 unit, then the three zeros
    assert set(ranks[:, [1, 4]].flatten().tolist()) == {0, 1}
    assert (ranks[:, 3] == 2).all()
    assert set(ranks[:, [0, 2, 5]].flatten().tolist()) == {3, 4, 5}
    assert len({tuple(r) for r in ranks.tolist()}) > 1  # not one fixed tie order


@pytest.mark.parametrize("name", ["chefer2021/positive", "vilas2023/negative", "road2022/morf"])
def test_curves_do_not_depend_on_batching(name):
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(5, 1, 4, 4, generator=generator)
    maps = (torch.rand(5, 1, 2, 2, generator=generator) > 0.5).float()  # many ties
    targets = torch.ones(5, dtype=torch.long)
    model = ToyTokenViT(threshold=1.0)
    protocol = PROTOCOLS[name]
    _, whole = curves_of(model, images, maps, targets, protocol)
    _, small_chunks = curves_of(model, images, maps, targets, protocol, max_batch_size=3)
    parts = [
        curves_of(model, images[i : i + 2], maps[i : i + 2], targets[i : i + 2], protocol)[1]
        for i in range(0, 5, 2)
    ]
    reversed_order = curves_of(model, images.flip(0), maps.flip(0), targets, protocol)[1].flip(0)
    assert torch.equal(whole, small_chunks)
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(whole, reversed_order)


class CountingModel(nn.Module):
    """Wraps a model and counts the inputs it is given."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.inputs = model, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs += images.shape[0]
        return self.model(images)


# rise2018/insertion: the first step (all blurred) and the last (the image) of every map agree
@pytest.mark.parametrize(("name", "shared"), [("rise2018/insertion", 2), ("road2022/lerf", 0)])
def test_an_input_repeated_in_the_batch_goes_through_the_model_once(name, shared):
    generator = torch.Generator().manual_seed(8)
    images = torch.randn(2, 3, 8, 8, generator=generator)
    maps = torch.randn(2, 1, 4, 4, generator=generator)
    targets = torch.tensor([0, 2])
    protocol = PROTOCOLS[name]
    alone = CountingModel(linear_model())
    _, expected = perturbation_scores(alone, images, maps, targets, protocol, mean=MEAN, std=STD)
    # three copies of the batch (as three methods with equal maps), one with another map
    other = torch.randn(2, 1, 4, 4, generator=generator)
    repeated = CountingModel(linear_model())
    _, scores = perturbation_scores(
        repeated,
        images.repeat(4, 1, 1, 1),
        torch.cat([maps, maps, other, maps]),
        targets.repeat(4),
        protocol,
        mean=MEAN,
        std=STD,
    )
    steps = len(protocol.steps)
    assert alone.inputs == 2 * steps
    # the copies add nothing; the other map adds its inputs except those shared with the first
    assert repeated.inputs == 2 * (2 * steps - shared)
    _, with_other = perturbation_scores(alone, images, other, targets, protocol, mean=MEAN, std=STD)
    for score, curves in scores.items():
        for copy in (0, 1, 3):
            assert torch.equal(curves[2 * copy : 2 * copy + 2], expected[score])
        assert torch.equal(curves[4:6], with_other[score])


@pytest.mark.parametrize("name", ["road2022/morf", "chefer2021/positive"])
def test_pixel_curves_do_not_move_with_float_noise_of_the_map(name, shared_models):
    # Another CPU (or another batch size) computes the same maps up to the last bit. The
    # pixel protocols must then perturb the same pixels: bilinear upsampling in float32 gave
    # pixels of mathematically equal value (the clamped border rows) different last bits, so
    # one ulp of noise in the patch map reordered whole tie groups and moved ROAD AUCs by 1e-4.
    from class_space_saliency import testing

    model = shared_models.get(testing.tiny_vit, "plain")
    images = testing.tiny_images("plain")
    generator = torch.Generator().manual_seed(6)
    maps = torch.randn(images.shape[0], 1, 4, 4, generator=generator)
    ulp = torch.nextafter(maps, torch.full_like(maps, torch.inf)) - maps
    noisy = maps + ulp * torch.randint(-1, 2, maps.shape, generator=generator)
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    protocol = PROTOCOLS[name]
    kwargs = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    _, clean = perturbation_scores(model, images, maps, labels, protocol, **kwargs)
    _, moved = perturbation_scores(model, images, noisy, labels, protocol, **kwargs)
    for score in clean:
        torch.testing.assert_close(moved[score], clean[score], atol=1e-6, rtol=0)
