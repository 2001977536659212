"""analysis.identifiability and the streaming it rests on, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon
from torch.utils.data import DataLoader, TensorDataset

from class_space_saliency import UnsupportedModelError, ViTAnatomy, analysis, testing
from class_space_saliency.testing import class_logits, num_prefix_tokens_of, token_states

COMPONENTS = ("residual", "attention", "mlp")


def data(family: str = "plain", n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    images = testing.tiny_images(family, batch=n, seed=4)
    return images, torch.arange(n) % testing.NUM_CLASSES


@torch.no_grad()
def positions_by_hand(model, images, labels) -> dict[str, torch.Tensor]:
    """{component: (L, B, N)} rank positions of the label, from reference token states."""
    states = token_states(model, images)
    found = {}
    for component in COMPONENTS:
        per_block = []
        for tokens in states[component]:
            logits = class_logits(model, tokens)
            label_logit = logits[torch.arange(len(labels)), :, labels]
            per_block.append((logits > label_logit[..., None]).sum(-1))
        found[component] = torch.stack(per_block)
    return found


@pytest.mark.parametrize("family", ["plain", "beit", "avgpool", "registers"])
def test_distribution_rates_and_shares_match_hand_computation(tiny_vit, family):
    model = tiny_vit(family)
    images, labels = data(family)
    prefix = num_prefix_tokens_of(model)
    result = analysis.identifiability(model, (images, labels), components=COMPONENTS)
    expected = positions_by_hand(model, images, labels)
    C = testing.NUM_CLASSES
    for component in COMPONENTS:
        positions = expected[component]
        image = positions[:, :, prefix:]
        counts = torch.stack([torch.bincount(p.flatten(), minlength=C) for p in image])
        assert torch.equal(result.histograms[(component, "image")].counts, counts)
        top1 = (image == 0).double()
        torch.testing.assert_close(result.image_rate[component], top1.mean(2).mean(1) * 100)
        torch.testing.assert_close(
            result.images_with_identifiable[component], top1.amax(2).mean(1) * 100
        )
        rank = 1 - image.double() / C
        torch.testing.assert_close(
            result.histograms[(component, "image")].mean_rank(), rank.mean((1, 2))
        )
        median = torch.quantile(rank.flatten(1), 0.5, dim=1, interpolation="lower")
        torch.testing.assert_close(
            result.histograms[(component, "image")].quantiles([0.5])[:, 0], median
        )
        if family in ("avgpool", "beit"):  # pooled heads: no [CLS] is read
            assert (component, "cls") not in result.histograms
        else:
            cls = torch.stack([torch.bincount(p[:, 0], minlength=C) for p in positions])
            assert torch.equal(result.histograms[(component, "cls")].counts, cls)


def test_streaming_equals_one_batch(tiny_vit):
    model = tiny_vit("plain")
    images, labels = data(n=9)
    whole = analysis.identifiability(model, (images, labels), components=COMPONENTS)
    sources = {
        "loader": DataLoader(TensorDataset(images, labels), batch_size=4),
        "dataset": TensorDataset(images, labels),
        "dicts": [{"images": images[:5], "labels": labels[:5]}, (images[5:], labels[5:])],
        "chunked": (images, labels),
    }
    for name, source in sources.items():
        parts = analysis.identifiability(model, source, components=COMPONENTS, batch_size=2)
        assert parts.num_images == 9, name
        for key, histogram in whole.histograms.items():
            assert torch.equal(parts.histograms[key].counts, histogram.counts), (name, key)
        for component in COMPONENTS:
            torch.testing.assert_close(parts.image_rate[component], whole.image_rate[component])


def test_num_images_and_predicted_labels(tiny_vit):
    model = tiny_vit("plain")
    images, _ = data(n=6)
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    first = analysis.identifiability(model, images, num_images=4, batch_size=3)
    by_hand = analysis.identifiability(model, (images[:4], predicted[:4]))
    assert first.num_images == 4
    assert torch.equal(
        first.histograms[("residual", "cls")].counts, by_hand.histograms[("residual", "cls")].counts
    )
    # the last block's [CLS] is the model's own prediction: top-1 for every image
    assert first["residual"].cls_rate[-1].item() == 100.0


def test_baseline_wilcoxon_matches_scipy_on_paired_tokens(tiny_vit):
    model = tiny_vit("plain")
    baseline = testing.perturb_weights(testing.tiny_vit("plain"), scale=1.0, seed=5)
    images, labels = data(n=8)
    result = analysis.identifiability(
        model, (images, labels), components=("residual", "mlp"), baseline=baseline
    )
    mine, theirs = (positions_by_hand(m, images, labels) for m in (model, baseline))
    C = testing.NUM_CLASSES
    for component in ("residual", "mlp"):
        for group, pick in (("cls", lambda p: p[:, :, 0]), ("image", lambda p: p[:, :, 1:])):
            for block in range(3):
                # scipy on normalised ranks times C: exact integers, so ties stay ties
                x = (C - pick(mine[component])[block]).flatten().numpy()
                y = (C - pick(theirs[component])[block]).flatten().numpy()
                p_value = result.p_values[(component, group)][block].item()
                if np.all(x == y):
                    assert np.isnan(p_value)
                    continue
                expected = wilcoxon(x, y, alternative="greater", method="approx").pvalue
                assert p_value == pytest.approx(expected, rel=1e-9), (component, group, block)
    assert result.baseline is not None and result.baseline.baseline is None
    table = result.table()
    assert "p (> baseline)" in table and table.count("\n| 2 |") == 2
    assert result.to_dict()["baseline"]["num_images"] == 8


def test_results_render(tiny_vit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    result = analysis.identifiability(
        tiny_vit("plain"), data(), components=("residual", "attention"), baseline=tiny_vit("plain")
    )
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == [
        "identifiability.json",
        "identifiability.md",
        "identifiability.png",
    ]
    assert all(p.stat().st_size > 0 for p in paths)
    # the same model as its own baseline: every paired difference is zero, no test
    assert all(torch.isnan(p).all() for p in result.p_values.values())


def test_bad_data_and_arguments(tiny_vit):
    model = tiny_vit("plain")
    images, labels = data()
    with pytest.raises(TypeError, match="data must be"):
        analysis.identifiability(model, "images/")
    with pytest.raises(TypeError, match="each batch"):
        analysis.identifiability(model, [(images, labels, labels, labels)])
    with pytest.raises(ValueError, match="components must be one of"):
        analysis.identifiability(model, (images, labels), components="queries")
    with pytest.raises(ValueError, match="target"):
        analysis.identifiability(model, (images, labels[:3]))
    with pytest.raises(ValueError, match="batch_size"):
        analysis.identifiability(model, (images, labels), batch_size=0)
    with pytest.raises(UnsupportedModelError, match="baseline"):
        analysis.identifiability(model, (images, labels), baseline=tiny_vit("distilled"))
    with pytest.raises(ValueError, match="masks"):
        list(analysis.stream(ViTAnatomy.from_model(model), (images, labels), masks=True))
