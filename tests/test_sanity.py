"""Cascading randomisation sanity check (Adebayo et al. 2018): steps, correlations, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from class_space_saliency import ClassSpaceSaliency, ViTAnatomy, testing
from class_space_saliency.cli import main
from class_space_saliency.sanity import (
    SanityResult,
    cascading_randomization,
    randomization_cascade,
    spearman,
)
from class_space_saliency.testing import NUM_CLASSES, model_state, tiny_images
from class_space_saliency.testing import assert_state_unchanged as assert_unchanged

CONTROLS = ["sobel", "intensity", "random"]


def labels_for(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(-1)


def test_class_space_decorrelates_and_controls_stay_at_one(tiny_vit):
    model = copy.deepcopy(tiny_vit("plain")).train()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    images = tiny_images("plain", batch=10)
    before = model_state(model)
    result = cascading_randomization(
        model, images, labels_for(model, images), ["class_space", "rollout", *CONTROLS]
    )
    assert_unchanged(model, before)
    assert result.steps == ["original", "head", "layer 2", "layer 1", "layer 0"]
    assert result.correlations.shape == (5, 5, 10) and result.num_images == 10
    table = dict(zip(result.methods, result.spearman.T, strict=True))
    assert torch.equal(result.spearman[0], torch.ones(5, dtype=torch.float64))
    for name in CONTROLS:  # maps that ignore the model cannot change
        torch.testing.assert_close(table[name], torch.ones(5, dtype=torch.float64))
    # the class-space map reads the head: it decorrelates as soon as the head is redrawn
    assert result.abs_spearman[1:, result.methods.index("class_space")].max() < 0.6
    # rollout is class-agnostic attention: the head does not matter, the blocks do
    assert table["rollout"][1] == pytest.approx(1.0) and table["rollout"][-1] < 0.9


def test_randomisation_is_top_down_and_cumulative(tiny_vit):
    """A block-1 class-space map changes with the head and block 1, not blocks 2 and 3."""
    model = tiny_vit("torchvision")
    images = tiny_images("torchvision", batch=4)
    result = cascading_randomization(
        model, images, [1, 2, 3, 4], ["class_space"], method_kwargs={"class_space": {"layer": 0}}
    )
    column = result.correlations[:, 0]
    assert torch.equal(column[1], column[2]) and torch.equal(column[1], column[3])
    assert not torch.equal(column[3], column[4]) and column[1].abs().mean() < 0.6


@pytest.mark.parametrize("family", ["distilled", "torchvision"])
def test_cascade_redraws_each_part_once_in_order(tiny_vit, family):
    model = tiny_vit(family)
    before = model_state(model)
    anatomy = ViTAnatomy.from_model(model)
    name_of = {id(p): name for name, p in model.named_parameters()}

    def names(*modules: torch.nn.Module) -> set[str]:
        return {name_of[id(p)] for module in modules for p in module.parameters()}

    steps = ["original", "head", *(f"layer {b}" for b in range(anatomy.depth - 1, -1, -1))]
    expected = [set(), names(anatomy.norm, *anatomy.heads)]
    expected += [names(block) for block in reversed(anatomy.blocks)]
    assert set(name_of.values()) - set().union(*expected)  # embeddings and tokens stay
    previous = {name: p.detach().clone() for name, p in model.named_parameters()}
    cascade = randomization_cascade(model, seed=5)
    for (step, randomized), name, want in zip(cascade, steps, expected, strict=True):
        assert step == name
        current = dict(randomized.named_parameters())
        changed = {n for n, p in current.items() if not torch.equal(p, previous[n])}
        assert changed == want, step
        for changed_name in changed:  # each tensor keeps its own scale
            old, new = previous[changed_name].double(), current[changed_name].detach().double()
            if old.numel() >= 500:
                assert abs(new.mean() - old.mean()) < 0.15 * old.std()
                assert abs(new.std() / old.std() - 1) < 0.15
        previous = {n: p.detach().clone() for n, p in current.items()}
    assert_unchanged(model, before)


def test_cascade_is_seeded(tiny_vit):
    model = tiny_vit("plain")

    def final_state(seed: int) -> list[torch.Tensor]:
        *_, (_, randomized) = randomization_cascade(model, seed)
        return [p.detach().clone() for p in randomized.parameters()]

    same, other = final_state(3), final_state(4)
    assert all(torch.equal(a, b) for a, b in zip(final_state(3), same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other, strict=True))
    with pytest.raises(TypeError, match="seed"):
        next(randomization_cascade(model, seed=1.5))


def test_spearman_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 4, (6, 1, 3, 5), generator=generator).float()  # many ties
    second = first + torch.randint(0, 3, first.shape, generator=generator)
    got = spearman(first, second)
    want = [
        spearmanr(a.flatten(), b.flatten()).statistic for a, b in zip(first, second, strict=True)
    ]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert spearman(first, -first).tolist() == pytest.approx([-1.0] * 6)
    constant = spearman(torch.ones(2, 4), torch.randn(2, 4, generator=generator))
    assert constant.isnan().all()
    with pytest.raises(ValueError, match="same shape"):
        spearman(first, second[:2])


def test_result_table_json_and_plot():
    correlations = torch.tensor(
        [[[1.0, 1.0], [1.0, 1.0]], [[0.5, -0.3], [float("nan"), float("nan")]]],
        dtype=torch.float64,
    )
    result = SanityResult(["original", "head"], ["class_space", "sobel"], correlations, seed=2)
    torch.testing.assert_close(result.abs_spearman[1, 0], torch.tensor(0.4, dtype=torch.float64))
    text = str(result).splitlines()
    assert text[0].startswith("mean Spearman rank correlation") and "2 images, seed 2" in text[0]
    assert text[1].split() == ["step", "class_space", "sobel"]
    assert text[3].split() == ["head", "0.1000", "nan"]
    assert text[5].startswith("mean |Spearman|") and text[8].split()[1] == "0.4000"
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["spearman"] == {"class_space": [1.0, 0.1], "sobel": [1.0, None]}
    assert data["steps"] == ["original", "head"] and data["num_images"] == 2
    figure = result.plot(absolute=True)
    assert [line.get_label() for line in figure.axes[0].get_lines()][:2] == result.methods


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(methods=["class_space", "nope"]), ValueError, "method"),
        (dict(methods=["sobel", "sobel"]), ValueError, "unique"),
        (dict(methods=[ClassSpaceSaliency(testing.tiny_vit())]), TypeError, "registry names"),
        (dict(targets=None), ValueError, "targets must be given"),
        (dict(targets=NUM_CLASSES), ValueError, "out of range"),
        (dict(inputs=torch.randn(2, 3, 16, 16)), ValueError, "spatial size"),
        (dict(seed="0"), TypeError, "seed"),
        (dict(method_kwargs={"gradcam": {}}), ValueError, "method_kwargs"),
    ],
)
def test_bad_arguments(tiny_vit, kwargs, error, match):
    model = tiny_vit("plain")
    before = model_state(model)
    arguments = {
        **dict(inputs=tiny_images("plain", batch=2), targets=0, methods=["sobel"]),
        **kwargs,
    }
    with pytest.raises(error, match=match):
        cascading_randomization(model, **arguments)
    assert_unchanged(model, before)


def test_sanity_command(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sanity", "--methods", "class_space", "sobel", "--n", "3", "--out", str(out)]) == 0
    data = json.loads((out / "sanity.json").read_text())
    assert data["steps"] == ["original", "head", *(f"layer {b}" for b in range(5, -1, -1))]
    assert data["num_images"] == 3 and data["spearman"]["sobel"] == [1.0] * 8
    assert (out / "sanity.txt").read_text().startswith("mean Spearman")
    assert (out / "sanity.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert main(["sanity", "--num-images", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "n must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()
