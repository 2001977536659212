"""The linear_probe map (official get_accumulated_linear_probe) against a hand computation."""

from __future__ import annotations

import pytest
import torch

from class_space_saliency import analysis, create_method, list_methods, testing
from class_space_saliency.methods import LinearProbeSaliency, method_info
from class_space_saliency.probing import POOLED, LinearProbes
from class_space_saliency.testing import (
    assert_state_unchanged,
    fitted_probes,
    model_state,
    tiny_images,
    token_states,
)

TARGETS = torch.tensor([0, 3, 6])


@torch.no_grad()
def rank_positions_by_hand(model, probes, images, target, blocks, pooled=False) -> torch.Tensor:
    """(B, 16) sum over blocks of the classes a block's probe scores above the target."""
    states = token_states(model, images)["residual"]
    total = torch.zeros(len(images), 16)
    for block in blocks:
        for token in range(16):  # image token t sits at position t + 1, after [CLS]
            weight, bias = probes.probe(block, "residual", POOLED if pooled else token + 1)
            scores = states[block][:, token + 1] @ weight.T + bias  # (B, C)
            total[:, token] += (scores > scores[torch.arange(len(images)), target][:, None]).sum(1)
    return total


def map_by_hand(model, probes, images, target, blocks, pooled=False) -> torch.Tensor:
    """sum over blocks of the normalised rank 1 - k_b / C, on the patch grid."""
    positions = rank_positions_by_hand(model, probes, images, target, blocks, pooled)
    return (len(blocks) - positions / probes.num_classes).reshape(len(images), 1, 4, 4)


@pytest.fixture(scope="module")
def probes(shared_models) -> LinearProbes:
    return fitted_probes(shared_models.get(testing.tiny_vit, "plain"))


def test_map_sums_the_targets_probe_rank_over_blocks(tiny_vit, probes):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    explainer = create_method("linear_probe", model, probes=probes)
    assert isinstance(explainer, LinearProbeSaliency) and explainer.layer == [0, 1, 2]
    want = map_by_hand(model, probes, images, TARGETS, [0, 1, 2])
    torch.testing.assert_close(explainer.attribute(images, TARGETS), want)
    torch.testing.assert_close(
        explainer.attribute(images, TARGETS, layer=[2, 0]),
        map_by_hand(model, probes, images, TARGETS, [0, 2]),
    )
    torch.testing.assert_close(
        explainer.attribute(images, TARGETS, position="pooled"),
        map_by_hand(model, probes, images, TARGETS, [0, 1, 2], pooled=True),
    )
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    torch.testing.assert_close(explainer.attribute(images), explainer.attribute(images, predicted))


def test_map_is_the_official_token_order(tiny_vit, probes):
    # the official code orders tokens by sum_b k_b, the label's rank positions, ascending
    model = tiny_vit("plain")
    images = tiny_images("plain")
    maps = create_method("linear_probe", model, probes=probes).attribute(images, TARGETS)
    positions = rank_positions_by_hand(model, probes, images, TARGETS, [0, 1, 2])
    recovered = ((3 - maps) * testing.NUM_CLASSES).reshape(3, 16)
    torch.testing.assert_close(recovered, positions, rtol=0, atol=1e-4)
    assert positions.max() > positions.min()  # the map separates tokens


def test_saved_probes_give_the_same_map(tiny_vit, probes, tmp_path):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    probes.save(tmp_path / "probes.pt")
    loaded = create_method("linear_probe", model, probes=LinearProbes.load(tmp_path / "probes.pt"))
    fresh = create_method("linear_probe", model, probes=probes)
    assert torch.equal(loaded.attribute(images, TARGETS), fresh.attribute(images, TARGETS))


def test_registry_marks_it_as_needing_fitting(tiny_vit, probes):
    model = tiny_vit("plain")
    assert method_info("linear_probe").needs_fitting
    assert "linear_probe" not in list_methods(needs_fitting=False)
    with pytest.raises(ValueError, match="needs fitted probes"):
        create_method("linear_probe", model)
    with pytest.raises(TypeError, match="LinearProbes"):
        create_method("linear_probe", model, probes="probes.pt")


def test_probes_must_fit_the_model(tiny_vit, probes):
    model = tiny_vit("plain")
    images = tiny_images("plain")
    before = model_state(model)
    explainer = create_method("linear_probe", model, probes=probes)
    three_classes = testing.tiny_vit("plain")
    three_classes.reset_classifier(3)
    with pytest.raises(ValueError, match="classes"):
        create_method("linear_probe", three_classes, probes=probes)
    pooled_only = analysis.linear_probes(
        model, (images, TARGETS), (images, TARGETS), components="mlp", layers=[1], curve=None
    ).probes
    with pytest.raises(ValueError, match="'residual' probes"):
        create_method("linear_probe", model, probes=pooled_only)
    one_block = analysis.linear_probes(
        model, (images, TARGETS), (images, TARGETS), components="residual", layers=[1],
        positions="tokens", curve=None,
    ).probes  # fmt: skip
    with pytest.raises(ValueError, match=r"no probes for blocks \[2\]"):
        create_method("linear_probe", model, probes=one_block, layer=2)
    with pytest.raises(ValueError, match="pooled"):
        create_method("linear_probe", model, probes=one_block, position="pooled")
    with pytest.raises(ValueError, match="position"):
        explainer.attribute(images, TARGETS, position="mean")
    with pytest.raises(ValueError, match="out of range"):
        explainer.attribute(images, target=7)
    with pytest.raises(ValueError, match="channels"):
        explainer.attribute(torch.randn(1, 1, 32, 32), target=0)
    assert_state_unchanged(model, before)
