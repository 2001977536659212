"""Noisy linear imputation against pytorch-grad-cam's ROAD imputer (the authors' code)."""

import pytest
import torch

from class_space_saliency.evaluation import imputation, noisy_linear_impute

road = pytest.importorskip("pytorch_grad_cam.metrics.road")
# the reference imputer hands torch tensors to NumPy 2, which warns
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


def masks(height: int, width: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    edges = torch.ones(height, width, dtype=torch.bool)
    edges[0], edges[:, -1] = False, False  # a full border row and column
    corners = torch.ones(height, width, dtype=torch.bool)
    corners[0, 0] = corners[-1, -1] = corners[0, -1] = corners[-1, 0] = False
    block = torch.ones(height, width, dtype=torch.bool)
    block[2:7, 3:9] = False  # a fully removed interior block
    corner_block = torch.ones(height, width, dtype=torch.bool)
    corner_block[:4, :5] = False
    return {
        "random30": torch.rand(height, width, generator=generator) > 0.3,
        "random90": torch.rand(height, width, generator=generator) > 0.9,
        "edges": edges,
        "corners": corners,
        "block": block,
        "corner_block": corner_block,
        "one_kept": torch.arange(height * width).view(height, width) == 17,
    }


@pytest.mark.parametrize("name", list(masks(10, 12)))
def test_noiseless_equals_reference(name):
    keep = masks(10, 12)[name]
    image = torch.randn(3, 10, 12, generator=torch.Generator().manual_seed(1))
    expected = road.NoisyLinearImputer(noise=0)(image, keep.float())
    ours = noisy_linear_impute(image[None], keep[None], noise=0)[0]
    assert torch.allclose(ours, expected, atol=1e-4)
    assert torch.equal(ours[:, keep], image[:, keep])  # kept pixels untouched


def test_batch_equals_images_one_by_one_and_fill_is_a_neighbour_mean():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 2, 8, 9, generator=generator)
    keep = torch.rand(3, 8, 9, generator=generator) > 0.5
    keep[1] = True  # nothing to impute
    batch = noisy_linear_impute(images, keep, noise=0)
    assert torch.equal(batch[1], images[1])
    for i in range(3):
        single = noisy_linear_impute(images[i : i + 1], keep[i : i + 1], noise=0)
        assert torch.allclose(batch[i], single[0])
    # an isolated interior hole is the 1/6, 1/12 weighted mean of its 8 neighbours
    hole = torch.ones(1, 8, 9, dtype=torch.bool)
    hole[0, 4, 4] = False
    filled = noisy_linear_impute(images[:1], hole, noise=0)[0, :, 4, 4]
    patch = images[0, :, 3:6, 3:6]
    weights = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
    assert torch.allclose(filled, (patch * weights).sum((1, 2)), atol=1e-6)


def test_noise_statistics_and_generator():
    image = torch.zeros(1, 1, 40, 40)
    keep = torch.ones(1, 40, 40, dtype=torch.bool)
    keep[0, 5:35, 5:35] = False
    one = noisy_linear_impute(image, keep, 0.5, torch.Generator().manual_seed(3))
    two = noisy_linear_impute(image, keep, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(one, two)
    filled = one[0, 0][~keep[0]]
    assert filled.std().item() == pytest.approx(0.5, rel=0.05)  # zero image: fill is the noise
    assert abs(filled.mean().item()) < 0.05


def test_bad_arguments():
    images, keep = torch.zeros(2, 3, 5, 5), torch.ones(2, 5, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="keep"):
        noisy_linear_impute(images, keep.float())
    with pytest.raises(TypeError, match="images"):
        noisy_linear_impute(images.long(), keep)
    with pytest.raises(ValueError, match="keep must have shape"):
        noisy_linear_impute(images, keep[:, :4])
    with pytest.raises(ValueError, match="images must have shape"):
        noisy_linear_impute(images[0], keep)
    with pytest.raises(ValueError, match="noise"):
        noisy_linear_impute(images, keep, noise=-0.1)
    with pytest.raises(ValueError, match="at least one pixel"):
        noisy_linear_impute(images, torch.zeros_like(keep))


def test_stacked_images_equal_the_reference_and_per_image_generators(monkeypatch):
    keeps = masks(10, 12)
    keep = torch.stack(list(keeps.values()))
    images = torch.randn(len(keeps), 3, 10, 12, generator=torch.Generator().manual_seed(5))
    batch = noisy_linear_impute(images, keep, noise=0)  # one stacked banded system
    for i in range(len(keeps)):
        expected = road.NoisyLinearImputer(noise=0)(images[i], keep[i].float())
        assert torch.allclose(batch[i], expected, atol=1e-4)
    monkeypatch.setattr(imputation, "GROUP_PIXELS", 2 * 10 * 12)  # groups of two images
    assert torch.allclose(noisy_linear_impute(images, keep, noise=0), batch, atol=1e-6)
    # one generator per image draws exactly what the image alone draws from it
    seeds = range(len(keeps))
    noisy = noisy_linear_impute(
        images, keep, 0.1, [torch.Generator().manual_seed(s) for s in seeds]
    )
    for i, seed in zip(range(len(keeps)), seeds, strict=True):
        single = noisy_linear_impute(
            images[i : i + 1], keep[i : i + 1], 0.1, torch.Generator().manual_seed(seed)
        )
        assert torch.allclose(noisy[i], single[0], atol=1e-6)
        assert not torch.equal(noisy[i], batch[i])
    with pytest.raises(ValueError, match="one per image"):
        noisy_linear_impute(images, keep, 0.1, [torch.Generator()])
