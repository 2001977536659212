"""analysis.sublayers (logit increment, sublayer changes, residual composition) and the
block-input capture it rests on, against plain-torch references on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import timm
import torch
import torchvision
from scipy.stats import binomtest
from timm.models.vision_transformer import ResPostBlock
from torch.utils.data import DataLoader, TensorDataset

from class_space_saliency import UnsupportedModelError, ViTAnatomy, analysis, testing
from class_space_saliency.testing import (
    class_logits,
    embed_by_hand,
    num_prefix_tokens_of,
    token_states,
)


@pytest.mark.parametrize("family", ["plain", "registers", "beit", "torchvision"])
def test_block_input_capture_is_the_stream_entering_each_block(tiny_vit, family):
    model = tiny_vit(family)
    images = testing.tiny_images(family)
    anatomy = ViTAnatomy.from_model(model)
    with torch.no_grad():
        states = token_states(model, images)
        with anatomy.capture(inputs=[("block", b) for b in range(anatomy.depth)]) as cap:
            anatomy.forward(images)
        if family == "torchvision":
            x = model._process_input(images)
            x = torch.cat([model.class_token.expand(len(images), -1, -1), x], 1)
            embedded = x + model.encoder.pos_embedding
        else:
            embedded = embed_by_hand(model, images)[0]
    torch.testing.assert_close(cap.inputs[("block", 0)], embedded)
    for block in range(1, anatomy.depth):
        want = states["residual"][block - 1]
        torch.testing.assert_close(cap.inputs[("block", block)], want)
    assert all(not block._forward_pre_hooks for block in anatomy.blocks)


def test_block_input_capture_reads_keyword_inputs(tiny_hf_vit):
    model = tiny_hf_vit("vit")
    images = testing.tiny_images()
    anatomy = ViTAnatomy.from_model(model)
    with torch.no_grad():  # transformers hooks a model for hidden states: ask a copy
        hidden = copy.deepcopy(model)(images, output_hidden_states=True).hidden_states
        with anatomy.capture(inputs=[("block", 0), ("block", 1)]) as cap:
            anatomy.blocks[0](hidden_states=hidden[0])  # keyword call: the pre-hook reads kwargs
            anatomy.blocks[1](hidden[1])
    torch.testing.assert_close(cap.inputs[("block", 0)], hidden[0])
    torch.testing.assert_close(cap.inputs[("block", 1)], hidden[1])


# ---------------------------------------------------------------------------- references
def data(family: str = "plain", n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    images = testing.tiny_images(family, batch=n, seed=4)
    return images, torch.arange(n) % testing.NUM_CLASSES


def embedded_by_hand(model, images) -> torch.Tensor:
    if isinstance(model, torchvision.models.VisionTransformer):
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(len(images), -1, -1), x], 1)
        return x + model.encoder.pos_embedding
    return embed_by_hand(model, images)[0]


@torch.no_grad()
def states_by_hand(model, images) -> dict[str, list[torch.Tensor]]:
    """The five states of every block: input, attention branch, x + attention, MLP, output."""
    states = token_states(model, images)
    inputs = [embedded_by_hand(model, images), *states["residual"][:-1]]
    between = [x + a for x, a in zip(inputs, states["attention"], strict=True)]
    return dict(
        block_input=inputs,
        attention=states["attention"],
        mlp_input=between,
        mlp=states["mlp"],
        block_output=states["residual"],
    )


@torch.no_grad()
def logits_by_hand(model, images) -> dict[str, torch.Tensor]:
    """{state: (L, B, N, C)} class logits of every token state."""
    return {
        state: torch.stack([class_logits(model, tokens) for tokens in per_block])
        for state, per_block in states_by_hand(model, images).items()
    }


def label_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(L, B, N, C) -> (L, B, N) logit of each image's label."""
    return logits[:, torch.arange(len(labels)), :, labels].permute(1, 0, 2)


def groups_of(model) -> dict[str, slice]:
    prefix = num_prefix_tokens_of(model)
    pooled = not isinstance(model, torchvision.models.VisionTransformer) and (
        model.global_pool != "token"
    )
    found = {"image": slice(prefix, None)}
    if not pooled:
        found["cls"] = slice(0, 1)
    return found


def share(rises: torch.Tensor) -> torch.Tensor:
    """(L, B, n) bool -> (L,) % true."""
    return 100 * rises.flatten(1).double().mean(1)


# ---------------------------------------------------------------------------- analyses
@pytest.mark.parametrize("family", ["plain", "registers", "avgpool", "beit", "torchvision"])
def test_logit_increment_and_sublayer_changes_match_hand_computation(tiny_vit, family):
    model = tiny_vit(family)
    images, labels = data(family)
    logits = logits_by_hand(model, images)
    label = {state: label_logits(value, labels) for state, value in logits.items()}
    increment = analysis.logit_increment(model, (images, labels))
    changes = analysis.sublayer_changes(model, (images, labels))
    official = analysis.sublayer_changes(model, (images, labels), official=True)
    groups = groups_of(model)
    assert set(increment.groups) == set(groups) == set(changes.groups)
    for group, tokens in groups.items():
        rise = label["block_output"][..., tokens] - label["block_input"][..., tokens]
        torch.testing.assert_close(increment.share(group), share(rise > 0))
        torch.testing.assert_close(
            increment.mean_change[("block", group)], rise.flatten(1).double().mean(1)
        )
        attention = label["attention"][..., tokens] > label["block_input"][..., tokens]
        mlp = label["mlp"][..., tokens] > label["mlp_input"][..., tokens]
        mlp_official = label["mlp"][..., tokens] > label["block_input"][..., tokens]
        torch.testing.assert_close(changes.share(group, "attention"), share(attention))
        torch.testing.assert_close(changes.share(group, "mlp"), share(mlp))
        torch.testing.assert_close(official.share(group, "attention"), share(attention))
        torch.testing.assert_close(official.share(group, "mlp"), share(mlp_official))
    assert official.official and not changes.official
    assert not torch.equal(official.share("image", "mlp"), changes.share("image", "mlp"))


@pytest.mark.parametrize("family", ["plain", "registers", "avgpool"])
def test_residual_composition_matches_hand_computation(tiny_vit, family):
    model = tiny_vit(family)
    images, _ = data(family)
    top1 = {state: value.argmax(-1) for state, value in logits_by_hand(model, images).items()}
    out = top1["block_output"]
    same = {s: out == top1[s] for s in ("block_input", "attention", "mlp")}
    none = ~(same["block_input"] | same["attention"] | same["mlp"])
    none_official = ~(same["block_input"] | same["attention"])  # the official "attn twice"
    result = analysis.residual_composition(model, images)  # labels are not needed
    official = analysis.residual_composition(model, images, official=True)
    groups = {"all": slice(None), **groups_of(model)}
    assert set(result.groups) == set(groups)
    for group, tokens in groups.items():
        for source, matched in (*same.items(), ("none", none)):
            torch.testing.assert_close(result.share(group, source), share(matched[..., tokens]))
            if source != "none":
                torch.testing.assert_close(
                    official.share(group, source), result.share(group, source)
                )
        torch.testing.assert_close(official.share(group, "none"), share(none_official[..., tokens]))


def test_hugging_face_blocks_match_their_hidden_states(tiny_hf_vit):
    model = tiny_hf_vit("vit")
    images, labels = data(n=5)
    with torch.no_grad():  # transformers hooks a model for hidden states: ask a copy
        hidden = copy.deepcopy(model)(images, output_hidden_states=True).hidden_states
        norm, head = model.base_model.layernorm, model.classifier
        label = torch.stack([head(norm(h)) for h in hidden])[:, torch.arange(5), :, labels]
    rise = label.permute(1, 0, 2)[1:] > label.permute(1, 0, 2)[:-1]  # (L, B, N)
    result = analysis.logit_increment(model, (images, labels))
    torch.testing.assert_close(result.share("image"), share(rise[..., 1:]))
    torch.testing.assert_close(result.share("cls"), share(rise[..., :1]))
    changes = analysis.sublayer_changes(model, (images, labels))  # x + attention + MLP holds
    assert changes.share("image", "mlp").shape == (2,)


def test_streaming_equals_one_batch(tiny_vit):
    model = tiny_vit("plain")
    images, labels = data(n=9)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    for function in (analysis.logit_increment, analysis.sublayer_changes):
        whole, parts = function(model, (images, labels)), function(model, loader, batch_size=2)
        assert parts.num_images == 9
        for key in whole.keys:
            assert torch.equal(whole.rises[key], parts.rises[key]), key
            assert torch.equal(whole.totals[key], parts.totals[key]), key
            torch.testing.assert_close(whole.mean_change[key], parts.mean_change[key])
    whole = analysis.residual_composition(model, (images, labels))
    parts = analysis.residual_composition(model, loader, batch_size=3)
    for key, counts in whole.matches.items():
        assert torch.equal(parts.matches[key], counts), key


def test_baseline_mcnemar_matches_scipy_on_paired_tokens(tiny_vit):
    model = tiny_vit("plain")
    baseline = testing.perturb_weights(testing.tiny_vit("plain"), scale=1.0, seed=5)
    images, labels = data(n=8)
    result = analysis.logit_increment(model, (images, labels), baseline=baseline)
    changes = analysis.sublayer_changes(model, (images, labels), baseline=baseline)
    mine, theirs = (
        {s: label_logits(v, labels) for s, v in logits_by_hand(m, images).items()}
        for m in (model, baseline)
    )
    for group, tokens in groups_of(model).items():
        for outcome, comparison, (reference, state) in (
            (result, "block", ("block_input", "block_output")),
            (changes, "mlp", ("mlp_input", "mlp")),
        ):
            first = mine[state][..., tokens] > mine[reference][..., tokens]
            second = theirs[state][..., tokens] > theirs[reference][..., tokens]
            for block in range(3):
                a = int((first[block] & ~second[block]).sum())
                b = int((second[block] & ~first[block]).sum())
                p_value = outcome.p_values[(comparison, group)][block].item()
                expected = binomtest(a, a + b, 0.5, alternative="greater").pvalue
                assert p_value == pytest.approx(expected, rel=1e-9), (comparison, group, block)
            torch.testing.assert_close(outcome.baseline.share(group, comparison), share(second))
    table = result.table()
    assert "p (> baseline)" in table and "baseline %" in table
    assert result.to_dict()["baseline"]["num_images"] == 8


def test_analyses_leave_a_training_model_unchanged(tiny_vit):
    model = copy.deepcopy(tiny_vit("plain")).train()
    before = testing.model_state(model)
    images, labels = data(n=4)
    masks = testing.box_masks(images)
    with torch.no_grad():
        reference = model.eval()(images)
    model.train()
    for run in (
        lambda: analysis.logit_increment(model, (images, labels), baseline=tiny_vit("plain")),
        lambda: analysis.sublayer_changes(model, (images, labels)),
        lambda: analysis.residual_composition(model, (images, labels)),
        lambda: analysis.context_identifiability(model, (images, labels, masks)),
        lambda: analysis.context_removal(model, (images, labels, masks)),
    ):
        run()
        testing.assert_state_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference)


def test_post_norm_blocks_read_the_branches_as_added():
    # x + norm1(attn(x)), then + norm2(mlp(.)): the branches as added to the stream, so the
    # MLP's input is rebuilt exactly (the paper's GAP model has these blocks)
    model = testing.perturb_weights(
        timm.create_model("vit_tiny_patch16_224", **{**testing.TIMM_TINY, "block_fn": ResPostBlock})
    )
    images, labels = data(n=4)
    label = {s: label_logits(v, labels) for s, v in logits_by_hand(model, images).items()}
    before = testing.model_state(model)
    changes = analysis.sublayer_changes(model, (images, labels))
    mlp = label["mlp"][..., 1:] > label["mlp_input"][..., 1:]
    torch.testing.assert_close(changes.share("image", "mlp"), share(mlp))
    testing.assert_state_unchanged(model, before)


def test_results_render(tiny_vit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model = tiny_vit("plain")
    results = [
        analysis.logit_increment(model, data(), baseline=tiny_vit("plain")),
        analysis.sublayer_changes(model, data(), layers=[0, 2]),
        analysis.residual_composition(model, data()),
    ]
    for result in results:
        paths = result.save(tmp_path)
        assert [p.suffix for p in paths] == [".json", ".md", ".png"]
        assert paths[0].stem == result.name and all(p.stat().st_size > 0 for p in paths)
        assert json.loads(paths[0].read_text())["num_images"] == 7
    assert results[1].layers == [0, 2] and results[1].share("cls", "mlp").shape == (2,)
    # the same model as its own baseline: no discordant pair, no test
    assert all(torch.isnan(p).all() for p in results[0].p_values.values())


def test_bad_arguments(tiny_vit):
    model = tiny_vit("plain")
    images, labels = data()
    with pytest.raises(TypeError, match="official"):
        analysis.sublayer_changes(model, (images, labels), official="yes")
    no_mlp = dataclasses.replace(ViTAnatomy.from_model(model), mlp_branches=None)
    with pytest.raises(UnsupportedModelError, match="'mlp' is not available"):
        analysis.sublayer_changes(no_mlp, (images, labels))
    result = analysis.sublayer_changes(model, (images, labels), layers=-1)
    with pytest.raises(ValueError, match="comparison must be one of"):
        result.share("image")
    with pytest.raises(ValueError, match="group"):
        analysis.residual_composition(model, images).share("registers", "none")
    with pytest.raises(UnsupportedModelError, match="baseline"):
        analysis.logit_increment(model, (images, labels), baseline=tiny_vit("distilled"))
