"""analysis.context (object vs context tokens, context removal) against plain-torch references:
token labels by reshaping masks, rank positions from hand-computed token states, shortened
sequences run through hand-written blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon
from torch.utils.data import DataLoader, TensorDataset

from class_space_saliency import UnsupportedModelError, analysis, testing
from class_space_saliency._stats import permutation_test
from class_space_saliency.testing import (
    block_by_hand,
    class_logits,
    embed_by_hand,
    num_prefix_tokens_of,
    token_states,
)

C = testing.NUM_CLASSES


def data(family: str = "plain", n: int = 6):
    """Images, labels and box masks; image 1 has no object, so it keeps no object token."""
    images = testing.tiny_images(family, batch=n, seed=4)
    masks = testing.box_masks(images)
    masks[1] = False
    return images, torch.arange(n) % C, masks


def tokens_by_hand(masks: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """(B, n) object tokens: at least half of the patch's pixels inside the mask."""
    b, _, height, width = masks.shape
    share = masks.float().reshape(b, height // patch, patch, width // patch, patch).mean((2, 4))
    return (share >= 0.5).flatten(1)


def positions_of(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, N) rank positions of the label for token states (B, N, D)."""
    logits = class_logits(model, tokens)
    label = logits[torch.arange(len(labels)), :, labels]
    return (logits > label[..., None]).sum(-1)


def label_logit_of(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return class_logits(model, tokens)[torch.arange(len(labels)), :, labels]


# ---------------------------------------------------------------------------- identifiability
@pytest.mark.parametrize("family", ["plain", "registers", "avgpool", "dynamic"])
def test_context_identifiability_matches_hand_computation(tiny_vit, family):
    model = tiny_vit(family)
    images, labels, masks = data(family)
    prefix = num_prefix_tokens_of(model)
    with torch.no_grad():
        states = token_states(model, images)
        inputs = [embed_by_hand(model, images)[0], *states["residual"][:-1]]
        positions = torch.stack([positions_of(model, h, labels) for h in states["residual"]])
        change = torch.stack(
            [
                label_logit_of(model, a, labels) - label_logit_of(model, x, labels)
                for x, a in zip(inputs, states["attention"], strict=True)
            ]
        )
    objects = tokens_by_hand(masks, model.patch_embed.patch_size[0])
    where = {"object": objects, "context": ~objects}
    result = analysis.context_identifiability(model, (images, labels, masks), seed=3)
    official = analysis.context_identifiability(
        model, (images, labels, masks), seed=3, official=True, permutations=50
    )
    counts = {}
    for location, tokens in where.items():
        found = positions[..., prefix:][:, tokens]  # (L, k)
        counts[location] = torch.stack([torch.bincount(row, minlength=C) for row in found])
        assert torch.equal(result.histograms[location].counts, counts[location])
        torch.testing.assert_close(result.top1(location), 100 * (found == 0).double().mean(1))
        rises = change[..., prefix:][:, tokens] > 0
        torch.testing.assert_close(result.change_share(location), 100 * rises.double().mean(1))
    assert result.images_without == {"object": 1, "context": 0}
    ranks = {loc: 1 - positions[..., prefix:][:, t].double() / C for loc, t in where.items()}
    torch.testing.assert_close(
        result.difference, ranks["object"].mean(1) - ranks["context"].mean(1)
    )
    values = 1 - torch.arange(C, dtype=torch.float64) / C
    for block in range(3):
        first, second = counts["object"][block], counts["context"][block]
        expected = permutation_test(first, second, values, 300, seed=3)[1]
        assert result.p_values[block].item() == expected
        # official: the mean logit change, pooled values, 50 relabellings, official p-value
        obj, ctx = (change[block, :, prefix:][t].double() for t in (objects, ~objects))
        unique, inverse = torch.unique(torch.cat([obj, ctx]), return_inverse=True)
        histograms = [
            torch.bincount(i, minlength=len(unique)) for i in inverse.split([len(obj), len(ctx)])
        ]
        difference, p_value = permutation_test(*histograms, unique, 50, seed=3, official=True)
        assert difference == pytest.approx(obj.mean().item() - ctx.mean().item(), abs=1e-6)
        assert official.change_difference[block].item() == pytest.approx(difference, abs=1e-6)
        assert official.change_p_values[block].item() == p_value
    rate = {loc: result.change_share(loc) for loc in where}
    torch.testing.assert_close(result.change_difference, rate["object"] - rate["context"])
    assert torch.equal(official.histograms["object"].counts, counts["object"])


def test_context_baseline_wilcoxon_matches_scipy(tiny_vit):
    model = tiny_vit("plain")
    baseline = testing.perturb_weights(testing.tiny_vit("plain"), scale=1.0, seed=5)
    images, labels, masks = data()
    result = analysis.context_identifiability(
        model, (images, labels, masks), baseline=baseline, attention_change=False
    )
    objects = tokens_by_hand(masks)
    with torch.no_grad():
        mine, theirs = (
            torch.stack([positions_of(m, h, labels) for h in token_states(m, images)["residual"]])
            for m in (model, baseline)
        )
    for location, tokens in (("object", objects), ("context", ~objects)):
        for block in range(3):
            x = (C - mine[block, :, 1:][tokens]).numpy()
            y = (C - theirs[block, :, 1:][tokens]).numpy()
            expected = wilcoxon(x, y, alternative="greater", method="approx").pvalue
            got = result.baseline_p_values[location][block].item()
            assert got == pytest.approx(expected, rel=1e-9), (location, block)
    assert not result.change_rises and "attn" not in result.table()
    assert "p (> baseline)" in result.table()


# ---------------------------------------------------------------------------- removal
@torch.no_grad()
def removal_by_hand(model, images, labels, kept):
    """Per image: (L, prefix + c) rank positions and the prediction with only ``kept`` image
    tokens (and the prefix) after the position embedding, through hand-written blocks."""
    embedded, _ = embed_by_hand(model, images)
    prefix = model.num_prefix_tokens
    found = []
    for i in range(len(images)):
        if not kept[i].any():  # left out of the analysis
            found.append(None)
            continue
        index = torch.cat([torch.arange(prefix), torch.nonzero(kept[i]).flatten() + prefix])
        x = embedded[i : i + 1, index]
        per_block = []
        for block in model.blocks:
            x = block_by_hand(block, x, None, prefix).output
            per_block.append(positions_of(model, x, labels[i : i + 1])[0])
        prediction = model.forward_head(model.norm(x)).argmax(-1).item()
        found.append((torch.stack(per_block), index, prediction))
    return found


@pytest.mark.parametrize("family", ["plain", "registers", "avgpool", "dynamic"])
def test_context_removal_matches_hand_computation(tiny_vit, family):
    model = tiny_vit(family)
    images, labels, masks = data(family)
    prefix = model.num_prefix_tokens
    objects = tokens_by_hand(masks, model.patch_embed.patch_size[0])
    result = analysis.context_removal(model, (images, labels, masks))
    with torch.no_grad():
        full = torch.stack(
            [positions_of(model, h, labels) for h in token_states(model, images)["residual"]]
        )
        predicted = model(images).argmax(-1)
    for removed, kept in (("context", objects), ("object", ~objects)):
        outcome = result[removed]
        images_kept = [i for i in range(len(images)) if kept[i].any()]
        assert outcome.num_images == len(images_kept)
        assert outcome.num_skipped == len(images) - len(images_kept)
        by_hand = removal_by_hand(model, images, labels, kept)
        after, before, rate, official, correct = [], [], [], [], []
        for i in images_kept:
            positions, index, prediction = by_hand[i]
            after.append(positions[:, prefix:])
            before.append(full[:, i, index[prefix:]])
            rate.append(100 * (positions[:, prefix:] == 0).double().mean(1))
            counted = positions if model.global_pool == "token" else positions[:, prefix:]
            if family == "registers":  # the [CLS] and the image tokens, not the registers
                counted = torch.cat([positions[:, :1], positions[:, prefix:]], 1)
            official.append(100 * (counted == 0).double().mean(1))
            correct.append((prediction == labels[i].item(), predicted[i] == labels[i]))
        after, before = torch.cat(after, 1), torch.cat(before, 1)
        for histogram, positions in (
            (outcome.removed_histogram, after),
            (outcome.unperturbed_histogram, before),
        ):
            counts = torch.stack([torch.bincount(row, minlength=C) for row in positions])
            assert torch.equal(histogram.counts, counts)
        torch.testing.assert_close(outcome.removed_rate, torch.stack(rate).mean(0))
        torch.testing.assert_close(outcome.official_rate, torch.stack(official).mean(0))
        correct = torch.tensor(correct, dtype=torch.float64).mean(0) * 100
        assert outcome.accuracy_removed == pytest.approx(correct[0].item())
        assert outcome.accuracy_unperturbed == pytest.approx(correct[1].item())
        for block in range(3):
            x, y = (C - before[block]).numpy(), (C - after[block]).numpy()
            got = outcome.p_values[block].item()
            if np.all(x == y):
                assert np.isnan(got)
            else:
                expected = wilcoxon(x, y, alternative="two-sided", method="approx").pvalue
                assert got == pytest.approx(expected, rel=1e-9)
    assert result["context"].kept == "object" and result["object"].kept == "context"


@pytest.mark.parametrize("source", ["torchvision", "hf"])
def test_removing_no_token_changes_nothing_in_other_families(tiny_vit, tiny_hf_vit, source):
    model = tiny_vit("torchvision") if source == "torchvision" else tiny_hf_vit("vit")
    images, labels, masks = data(n=4)
    masks[:] = False  # no object: removing the object tokens removes nothing
    masks[0, :, :8, :8] = True  # except one token of image 0
    result = analysis.context_removal(model, (images, labels, masks), remove="object")
    assert set(result["object"].removed_histogram.total().tolist()) == {4 * 16 - 1}  # one gone
    # images 1-3 keep every token: the shortened run is the unperturbed one
    single = analysis.context_removal(model, (images[1:], labels[1:], masks[1:]), remove="object")
    same = single["object"]
    assert torch.equal(same.removed_histogram.counts, same.unperturbed_histogram.counts)
    assert torch.isnan(same.p_values).all()
    assert same.accuracy_removed == same.accuracy_unperturbed


def test_streaming_equals_one_batch(tiny_vit):
    model = tiny_vit("plain")
    images, labels, masks = data(n=7)
    loader = DataLoader(TensorDataset(images, labels, masks), batch_size=3)
    whole = analysis.context_identifiability(model, (images, labels, masks))
    parts = analysis.context_identifiability(model, loader, batch_size=2)
    for location in ("object", "context"):
        assert torch.equal(whole.histograms[location].counts, parts.histograms[location].counts)
        assert torch.equal(whole.change_rises[location], parts.change_rises[location])
        torch.testing.assert_close(whole.change_mean[location], parts.change_mean[location])
    assert torch.equal(whole.p_values, parts.p_values)
    whole = analysis.context_removal(model, (images, labels, masks))
    single = analysis.context_removal(model, loader, batch_size=1)  # one image per run
    for removed in ("context", "object"):
        a, b = whole[removed], single[removed]
        assert torch.equal(a.removed_histogram.counts, b.removed_histogram.counts)
        assert torch.equal(a.unperturbed_histogram.counts, b.unperturbed_histogram.counts)
        torch.testing.assert_close(a.official_rate, b.official_rate)
        assert (a.num_images, a.accuracy_removed) == (b.num_images, b.accuracy_removed)


def test_results_render_and_bad_input(tiny_vit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model = tiny_vit("plain")
    images, labels, masks = data()
    results = [
        analysis.context_identifiability(model, (images, labels, masks), baseline=model),
        analysis.context_removal(model, (images, labels, masks), remove="object", layers=[-1]),
    ]
    for result in results:
        paths = result.save(tmp_path)
        assert [p.suffix for p in paths] == [".json", ".md", ".png"]
        assert json.loads(paths[0].read_text())["num_images"] == 6
    assert list(results[1].outcomes) == ["object"] and results[1].layers == [2]
    with pytest.raises(ValueError, match="masks"):
        analysis.context_identifiability(model, (images, labels))
    with pytest.raises(ValueError, match="remove"):
        analysis.context_removal(model, (images, labels, masks), remove="background")
    with pytest.raises(ValueError, match="rule"):
        analysis.context_removal(model, (images, labels, masks), rule="any")
    with pytest.raises(ValueError, match="threshold"):
        analysis.context_identifiability(model, (images, labels, masks), threshold=1.5)
    with pytest.raises(ValueError, match="permutations"):
        analysis.context_identifiability(model, (images, labels, masks), permutations=0)
    with pytest.raises(UnsupportedModelError, match="token removal"):
        analysis.context_removal(tiny_vit("beit"), (images, labels, masks))
