"""Quantus interop for real: explain_func inside a localisation and a faithfulness metric."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch
import torch.nn.functional as F

from class_space_saliency import testing
from class_space_saliency.interop import explain_func
from class_space_saliency.methods import ClassSpaceSaliency


@pytest.fixture(scope="module")
def batch(shared_models):
    model = shared_models.get(testing.tiny_vit, "plain")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = np.array([0, 3, 5, 6])
    masks = np.zeros((4, 1, 32, 32), dtype=np.float32)
    for k, (top, left) in enumerate([(0, 0), (8, 16), (16, 4), (20, 20)]):
        masks[k, 0, top : top + 12, left : left + 10] = 1  # hand-drawn object boxes
    return model, x, y, masks


def test_explain_func_signature_and_output(batch):
    model, x, y, _ = batch
    maps = explain_func(model=model, inputs=x, targets=y, method="class_space", layer=-2)
    assert maps.dtype == np.float32 and maps.shape == (4, 1, 32, 32)
    patch = ClassSpaceSaliency(model, layer=-2).attribute(torch.from_numpy(x), target=y.tolist())
    expected = F.interpolate(patch, size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(maps, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not model.training


def test_relevance_mass_accuracy_with_explain_func(batch):
    model, x, y, masks = batch
    metric = quantus.RelevanceMassAccuracy(abs=True, normalise=False, disable_warnings=True)
    scores = metric(
        model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=masks,
        explain_func=explain_func, explain_func_kwargs={"method": "class_space"},
    )  # fmt: skip
    maps = np.abs(explain_func(model, x, y, method="class_space"))
    by_hand = (maps * masks).sum((1, 2, 3)) / maps.sum((1, 2, 3))
    np.testing.assert_allclose(scores, by_hand, rtol=1e-5)


def test_relevance_rank_accuracy_on_fashion_scenes_masks():
    from class_space_saliency.data import load_default_eval
    from class_space_saliency.models import load_default

    model, _ = load_default()
    images, labels, masks = load_default_eval(6, masks=True)
    x, y, s = images.numpy(), labels.numpy(), masks.numpy().astype(np.float32)
    metric = quantus.RelevanceRankAccuracy(abs=True, normalise=False, disable_warnings=True)
    scores = metric(
        model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=s,
        explain_func=explain_func, explain_func_kwargs={"method": "class_space"},
    )  # fmt: skip
    maps = np.abs(explain_func(model, x, y, method="class_space")).reshape(6, -1)
    for k in range(6):  # share of the mask-area highest pixels inside the mask, by hand
        inside = s[k].reshape(-1).astype(bool)
        top = np.argsort(-maps[k], kind="stable")[: inside.sum()]
        assert abs(scores[k] - inside[top].mean()) < 0.05  # ties may order differently


@pytest.mark.parametrize("method", ["class_space", "chefer"])
def test_faithfulness_correlation_with_explain_func(batch, method):
    model, x, y, _ = batch
    metric = quantus.FaithfulnessCorrelation(
        nr_runs=10, subset_size=64, perturb_baseline="black", disable_warnings=True,
        return_aggregate=False,
    )  # fmt: skip
    np.random.seed(0)
    scores = metric(
        model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
        explain_func_kwargs={"method": method}, device="cpu",
    )  # fmt: skip
    assert len(scores) == 4
    assert all(np.isfinite(s) and -1 <= s <= 1 for s in scores)


def test_documented_relevance_mass_recipe_equals_the_library_metric():
    """The README's recipe on the embedded model's images and object masks: Quantus's
    RelevanceMassAccuracy in its own range [0, 1] and equal to this library's relevance mass
    on the same maps and masks. Quantus's defaults on signed maps leave [0, 1] (issue 22:
    -0.44 and 4.59 on the first two images, where the positive mass is 0.77 and 0.59)."""
    from class_space_saliency.data import load_default_eval
    from class_space_saliency.evaluation import localisation
    from class_space_saliency.models import load_default

    model, _ = load_default()
    images, labels, masks = load_default_eval(8, masks=True)
    batch = dict(
        model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=None,
        s_batch=masks.numpy().astype(np.float32), explain_func=explain_func,
    )  # fmt: skip
    recipe = quantus.RelevanceMassAccuracy(abs=False, normalise=True, disable_warnings=True)
    scores = np.array(
        recipe(**batch, explain_func_kwargs={"method": "class_space", "positive_only": True})
    )
    maps = ClassSpaceSaliency(model).attribute(images, labels)
    ours = localisation(maps, masks, upsample="bilinear")  # Quantus scores pixels
    np.testing.assert_allclose(scores, ours["relevance_mass"].numpy(), rtol=1e-5, atol=1e-6)
    assert ((scores >= 0) & (scores <= 1)).all()

    defaults = quantus.RelevanceMassAccuracy(disable_warnings=True)
    naive = np.array(defaults(**batch, explain_func_kwargs={"method": "class_space"}))
    assert ((naive < 0) | (naive > 1)).any()  # why the recipe asks for positive_only
