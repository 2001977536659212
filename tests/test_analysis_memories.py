"""Memories in class space (value vectors, key-value agreement) against hand computations."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wilcoxon

from class_space_saliency import UnsupportedModelError, ViTAnatomy, analysis, testing
from class_space_saliency._stats import permutation_test
from class_space_saliency.testing import (
    assert_state_unchanged,
    class_logits,
    embed_by_hand,
    model_state,
    tiny_images,
)


@torch.no_grad()
def keys_by_hand(model, images) -> dict[str, list[torch.Tensor]]:
    """Per block: the MLP's first linear output and the attention's concatenated head outputs."""
    x, _ = embed_by_hand(model, images)
    found = {"fc1": [], "heads": []}
    for block in model.blocks:
        h = block.norm1(x)
        b, n, d = h.shape
        qkv = block.attn.qkv(h).reshape(b, n, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        probs = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        heads = (probs @ v).transpose(1, 2).reshape(b, n, d)
        x = x + block.ls1(block.attn.proj(heads))
        pre = block.mlp.fc1(block.norm2(x))
        x = x + block.ls2(block.mlp.fc2(F.gelu(pre)))
        found["fc1"].append(pre)
        found["heads"].append(heads)
    return found


def test_capture_records_module_inputs_and_outputs(tiny_vit):
    model = copy.deepcopy(tiny_vit("plain")).train()
    images = tiny_images("plain")
    anatomy = ViTAnatomy.from_model(model)
    before = model_state(model)
    sites = {("fc1", 1): (model.blocks[1].mlp.fc1, "output")}
    sites[("heads", 2)] = (model.blocks[2].attn.proj, "input")
    with torch.no_grad(), anatomy.capture(modules=sites) as cap:
        anatomy.forward(images)
    want = keys_by_hand(model.eval(), images)
    model.train()
    torch.testing.assert_close(cap.tokens[("fc1", 1)], want["fc1"][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cap.tokens[("heads", 2)], want["heads"][2], rtol=1e-4, atol=1e-5)
    assert_state_unchanged(model, before)  # hooks off, training mode back
    with (
        pytest.raises(ValueError, match="side"),
        anatomy.capture(modules={("fc1", 0): (model.blocks[0].mlp.fc1, "weights")}),
    ):
        pass
    assert_state_unchanged(model, before)


# ---------------------------------------------------------------------------- references
def embeddings_by_hand(model, norm_scale: bool = True) -> torch.Tensor:
    """(C, D) head rows (DeiT: both heads averaged), times the final norms' weights."""
    weight = model.head.weight
    if hasattr(model, "head_dist"):
        weight = (model.head.weight + model.head_dist.weight) / 2
    if norm_scale:
        for norm in (model.norm, model.fc_norm):
            if isinstance(norm, torch.nn.LayerNorm):
                weight = weight * norm.weight
    return weight.detach()


def values_by_hand(model, block: int, component: str) -> torch.Tensor:
    """(D, M) value vectors times the block's layer scale (BEiT gamma, timm ls gamma)."""
    layer = model.blocks[block]
    number, linear = (2, layer.mlp.fc2) if component == "mlp" else (1, layer.attn.proj)
    values = linear.weight.detach()
    gamma = getattr(layer, f"gamma_{number}", None)
    if gamma is None:
        gamma = getattr(getattr(layer, f"ls{number}"), "gamma", None)
    return values if gamma is None else values * gamma.detach()[:, None]


def cosines_by_hand(model, block, component, norm_scale=True) -> torch.Tensor:
    embeddings = F.normalize(embeddings_by_hand(model, norm_scale), dim=1)
    return embeddings @ F.normalize(values_by_hand(model, block, component), dim=0)


# ---------------------------------------------------------------------------- value vectors
@pytest.mark.parametrize("family", ["plain", "beit", "avgpool", "distilled"])
@pytest.mark.parametrize("norm_scale", [True, False])
def test_value_vector_scores_match_hand_computation(tiny_vit, family, norm_scale):
    model = tiny_vit(family)
    result = analysis.value_vectors(model, norm_scale=norm_scale)
    for component in ("mlp", "attention"):
        for block in range(3):
            cosines = cosines_by_hand(model, block, component, norm_scale)
            best = cosines.max(1)
            torch.testing.assert_close(result.best_score[component][block], best.values)
            assert torch.equal(result.best_memory[component][block], best.indices)
        torch.testing.assert_close(
            result.agreement(component), result.best_score[component].mean(1)
        )


def test_value_vectors_baseline_wilcoxon_matches_scipy(tiny_vit):
    model = tiny_vit("plain")
    baseline = testing.perturb_weights(testing.tiny_vit("plain"), scale=1.0, seed=5)
    result = analysis.value_vectors(model, baseline=baseline, layers=[0, 2])
    assert result.layers == [0, 2] and result.baseline.layers == [0, 2]
    for component in ("mlp", "attention"):
        for row, block in enumerate([0, 2]):
            mine = cosines_by_hand(model, block, component).max(1).values.numpy()
            theirs = cosines_by_hand(baseline, block, component).max(1).values.numpy()
            expected = wilcoxon(mine, theirs, alternative="greater", method="exact").pvalue
            assert result.p_values[component][row].item() == pytest.approx(expected, rel=1e-9)
    table = result.table()
    assert "mlp p (> baseline)" in table and table.count("\n| 2 |") == 1
    assert result.to_dict()["baseline"]["components"]["mlp"]["p_value_vs_baseline"] is None


def test_value_vector_classes_are_each_memorys_top_classes(tiny_vit):
    model = tiny_vit("beit")
    names = [f"class {c}" for c in range(testing.NUM_CLASSES)]
    result = analysis.value_vector_classes(model, -1, "attention", k=3, class_names=names)
    cosines = cosines_by_hand(model, 2, "attention")  # (C, M)
    assert result.block == 2 and result.indices.shape == (32, 3)
    for memory in range(32):
        ranked = sorted(range(testing.NUM_CLASSES), key=lambda c: -cosines[c, memory].item())
        assert result.indices[memory].tolist() == ranked[:3]
        torch.testing.assert_close(result.scores[memory], cosines[ranked[:3], memory])
    best = result.scores[:, 0]
    assert best[result.order].tolist() == sorted(best.tolist(), reverse=True)
    strongest = int(best.argmax())
    lines = result.table(limit=4).splitlines()
    assert len(lines) == 2 + 2 + 4 and lines[4].startswith(f"| {strongest} | class ")
    assert result.classes_of(strongest)[0][0] == names[int(result.indices[strongest, 0])]


# ---------------------------------------------------------------------------- key-value agreement
def control_by_hand(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The documented draw: image i's control is label + 1 + rng((seed, i)).integers(C - 1)."""
    C = testing.NUM_CLASSES
    draws = [int(np.random.default_rng((seed, i)).integers(C - 1)) for i in range(len(labels))]
    return (labels + 1 + torch.tensor(draws)) % C


@torch.no_grad()
def agreement_by_hand(model, images, labels, k, keys="pre", seed=0):
    """{component: (rate (B, L), control (B, L), cls (B, L), compositional (L,))} by loops."""
    found = keys_by_hand(model, images)
    embeddings = embeddings_by_hand(model)
    controls = control_by_hand(labels, seed)
    out = {}
    for component, name in (("mlp", "fc1"), ("attention", "heads")):
        rates, control_rates, cls, shares = [], [], [], []
        for block in range(3):
            layer = model.blocks[block]
            scores = embeddings @ values_by_hand(model, block, component)  # (C, M)
            activations = found[name][block]
            if component == "mlp" and keys == "post":
                activations = F.gelu(activations)
            if component == "mlp":
                output = layer.ls2(layer.mlp.fc2(F.gelu(found["fc1"][block])))
            else:
                output = layer.ls1(layer.attn.proj(found["heads"][block]))
            top1 = class_logits(model, output).argmax(-1)  # (B, N)
            memory_class = scores.argmax(0)
            rate, control, first, matches = [], [], [], 0
            for i in range(len(images)):
                mine = set(scores[labels[i]].topk(k).indices.tolist())
                other = set(scores[controls[i]].topk(k).indices.tolist())
                tokens = [set(t.topk(k).indices.tolist()) for t in activations[i]]
                rate.append(100 * sum(bool(t & mine) for t in tokens) / len(tokens))
                control.append(100 * sum(bool(t & other) for t in tokens) / len(tokens))
                first.append(bool(tokens[0] & mine))
                matches += sum(
                    int(top1[i, n]) in {int(memory_class[m]) for m in t}
                    for n, t in enumerate(tokens)
                )
            rates.append(rate)
            control_rates.append(control)
            cls.append(first)
            shares.append(100 * matches / (len(images) * activations.shape[1]))
        out[component] = (
            torch.tensor(rates).T,
            torch.tensor(control_rates).T,
            torch.tensor(cls).T,
            torch.tensor(shares),
        )
    return out


@pytest.mark.parametrize(("family", "keys", "k"), [("plain", "pre", 5), ("registers", "post", 3)])
def test_key_value_agreement_matches_hand_computation(tiny_vit, family, keys, k):
    model = tiny_vit(family)
    images = tiny_images(family, batch=6, seed=3)
    with torch.no_grad():  # three correctly and three wrongly classified images
        predicted = model(images).argmax(-1)
    labels = torch.cat([predicted[:3], (predicted[3:] + 1) % testing.NUM_CLASSES])
    result = analysis.key_value_agreement(model, (images, labels), k=k, keys=keys, batch_size=4)
    want = agreement_by_hand(model, images, labels, k, keys)
    for component, (rate, control, cls, shares) in want.items():
        torch.testing.assert_close(result.image_rate[component], rate.float())
        torch.testing.assert_close(result.control_rate[component], control.float())
        assert torch.equal(result.cls_agrees[component], cls)
        torch.testing.assert_close(result.compositional[component], shares.float())
        torch.testing.assert_close(result.rate(component), rate.float().mean(0))
    correct = torch.tensor([True] * 3 + [False] * 3)
    assert torch.equal(result.correct, correct)
    for component in want:
        for group in (True, False):
            by_hand = want[component][2][correct == group].double().mean(0) * 100
            torch.testing.assert_close(result.cls_rate(component, group), by_hand)
    assert result.keys == keys and result.k == k and result.num_images == 6


def test_key_value_agreement_tests_match_scipy_and_the_permutation_test(tiny_vit):
    model = tiny_vit("plain")
    images = tiny_images("plain", batch=12, seed=5)
    with torch.no_grad():  # every third image correctly classified
        predicted = model(images).argmax(-1)
    labels = torch.where(torch.arange(12) % 3 == 0, predicted, (predicted + 2) % 7)
    result = analysis.key_value_agreement(
        model, (images, labels), components="mlp", seed=3, permutations=500
    )
    rate, control, cls, _ = agreement_by_hand(model, images, labels, 5, seed=3)["mlp"]
    tokens = 17  # [CLS] and a 4x4 grid
    correct = torch.arange(12) % 3 == 0
    for block in range(3):  # scipy on agreeing-token counts (exact integers keep ties tied)
        x, y = (rate[:, block] * tokens / 100).round(), (control[:, block] * tokens / 100).round()
        expected = wilcoxon(x.double().numpy(), y.double().numpy(), "wilcox", alternative="greater",
                            method="approx")  # fmt: skip
        assert result.p_values["mlp"][block].item() == pytest.approx(expected.pvalue, rel=1e-9)
        first, second = (
            torch.bincount(cls[g, block].long(), minlength=2) for g in (correct, ~correct)
        )
        expected = permutation_test(first, second, np.array([0.0, 1.0]), 500, seed=3)[1]
        assert result.cls_p_values["mlp"][block].item() == expected
    assert not torch.isnan(result.p_values["mlp"]).any()
    assert result.cls_p_values["mlp"].min() < 1


def test_key_value_agreement_streams_in_any_batch_size(tiny_vit):
    model = tiny_vit("plain")
    images, labels = tiny_images("plain", batch=7, seed=2), torch.arange(7)
    whole = analysis.key_value_agreement(model, (images, labels), batch_size=7)
    parts = analysis.key_value_agreement(model, (images, labels), batch_size=2)
    for component in ("mlp", "attention"):
        assert torch.equal(whole.image_rate[component], parts.image_rate[component])
        assert torch.equal(whole.control_rate[component], parts.control_rate[component])
        torch.testing.assert_close(whole.compositional[component], parts.compositional[component])
    # the control draws depend on the seed, not on the batching
    other = analysis.key_value_agreement(model, (images, labels), batch_size=3, seed=9)
    assert not torch.equal(other.control_rate["mlp"], whole.control_rate["mlp"]) or torch.equal(
        control_by_hand(labels, 9), control_by_hand(labels, 0)
    )


def test_memories_on_pooled_and_torchvision_models(tiny_vit):
    pooled = analysis.key_value_agreement(tiny_vit("avgpool"), tiny_images("avgpool"))
    assert pooled.cls_agrees == {} and "[CLS]" not in pooled.table()
    torchvision = tiny_vit("torchvision")
    mlp = analysis.key_value_agreement(torchvision, tiny_images("torchvision"), components="mlp")
    assert mlp.image_rate["mlp"].shape == (3, 3)
    before = model_state(torchvision)
    with pytest.raises(UnsupportedModelError, match="never called as a module"):
        analysis.key_value_agreement(
            torchvision, tiny_images("torchvision"), components="attention"
        )
    assert_state_unchanged(torchvision, before)
    weights = analysis.value_vectors(torchvision)  # torchvision heads: Sequential(Linear)
    head = torchvision.heads.head.weight * torchvision.encoder.ln.weight
    values = torchvision.encoder.layers[1].mlp[3].weight
    cosines = F.normalize(head, dim=1) @ F.normalize(values, dim=0)
    torch.testing.assert_close(weights.best_score["mlp"][1], cosines.detach().max(1).values)


def test_memory_analyses_reject_bad_arguments(tiny_vit):
    model = tiny_vit("plain")
    data = (tiny_images("plain"), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="k must be"):
        analysis.key_value_agreement(model, data, k=0)
    with pytest.raises(ValueError, match="k must be"):
        analysis.value_vector_classes(model, 0, k=testing.NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="components"):
        analysis.value_vectors(model, components="residual")
    with pytest.raises(ValueError, match="keys"):
        analysis.key_value_agreement(model, data, keys="mid")
    with pytest.raises(ValueError, match="permutations"):
        analysis.key_value_agreement(model, data, permutations=0)
    with pytest.raises(ValueError, match="class_names"):
        analysis.value_vector_classes(model, 0, class_names=["a"])
    with pytest.raises(TypeError, match="norm_scale"):
        analysis.value_vectors(model, norm_scale="yes")
    with pytest.raises(UnsupportedModelError, match="baseline"):
        analysis.value_vectors(model, baseline=testing.tiny_vit("registers"))


def test_memory_results_render(tiny_vit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model = tiny_vit("plain")
    results = [
        analysis.value_vectors(model, baseline=testing.perturb_weights(testing.tiny_vit(), 1.0)),
        analysis.value_vector_classes(model, 1, k=2),
        analysis.key_value_agreement(model, (tiny_images("plain"), torch.tensor([0, 1, 2]))),
    ]
    for result in results:
        paths = result.save(tmp_path)
        assert [p.suffix for p in paths] == [".json", ".md", ".png"]
        assert all(p.stat().st_size > 0 for p in paths)
        assert json.loads(paths[0].read_text())
