"""Attention knock-outs and activation patching, against hand-written plain-torch forwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wilcoxon
from torch.utils.data import DataLoader, TensorDataset

from class_space_saliency import UnsupportedModelError, ViTAnatomy, analysis, testing
from class_space_saliency.analysis import Site
from class_space_saliency.testing import class_logits, embed_by_hand, token_states

EDITED = "class_space_saliency_edited"


def data(family: str = "plain", n: int = 5, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    images = testing.tiny_images(family, batch=n, seed=seed)
    return images, torch.arange(n) % testing.NUM_CLASSES


def knocked_by_hand(mode: str, prefix: int, renormalise: bool = False, blocks=None):
    """The official edit, row by row (``vit_edited.py``), on the chosen blocks."""

    def edit(block: int, probs: torch.Tensor) -> torch.Tensor:
        if blocks is not None and block not in blocks:
            return probs
        probs = probs.clone()
        for t in range(prefix, probs.shape[-1]):
            if mode == "self_only":
                probs[:, :, t, :] = 0
                probs[:, :, t, t] = 1
            else:
                probs[:, :, t, 0] = 0
                if renormalise:
                    probs[:, :, t, :] = probs[:, :, t, :] / probs[:, :, t, :].sum(-1, keepdim=True)
        return probs

    return edit


def timm_by_hand(model, images, probs=None, heads=None, residual=None) -> torch.Tensor:
    """Logits of a timm ViT (pre-norm blocks, layer scale) with optional edits per block of the
    attention probabilities (B, H, N, N), the heads' outputs (B, H, N, d) and the block output."""
    x, _ = embed_by_hand(model, images)
    for b, block in enumerate(model.blocks):
        attn, h = block.attn, block.norm1(x)
        B, N, D = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        p = p if probs is None else probs(b, p)
        o = p @ v
        o = o if heads is None else heads(b, o)
        x = x + block.ls1(attn.proj(o.transpose(1, 2).reshape(B, N, D)))
        x = x + block.ls2(block.mlp(block.norm2(x)))
        x = x if residual is None else residual(b, x)
    return model.forward_head(model.norm(x))


def hf_vit_by_hand(model, images, probs=None, heads=None, residual=None) -> torch.Tensor:
    """The same for a Hugging Face ``ViTForImageClassification`` (transformers 5 layout)."""
    x = model.vit.embeddings(images)
    for b, layer in enumerate(model.vit.layers):
        attn, h = layer.attention, layer.layernorm_before(x)
        B, N, D = h.shape
        H = model.config.num_attention_heads
        q, k, v = (proj(h).reshape(B, N, H, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
        p = (q @ k.transpose(-2, -1) * (D // H) ** -0.5).softmax(-1)
        p = p if probs is None else probs(b, p)
        o = p @ v
        o = o if heads is None else heads(b, o)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(B, N, D))
        x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.layernorm_after(x))))
        x = x if residual is None else residual(b, x)
    return model.classifier(model.vit.layernorm(x)[:, 0])


def enter(model, *args, **kwargs) -> None:
    """Enter and leave a knock-out (its checks run on entry)."""
    with analysis.knockout(model, *args, **kwargs):
        pass


def assert_hf_restored(model) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert model.config._attn_implementation == "sdpa"
    assert EDITED not in ALL_ATTENTION_FUNCTIONS


# ---------------------------------------------------------------------------- knock-outs
@pytest.mark.parametrize("family", ["plain", "registers", "distilled", "beit_token", "eva02"])
def test_knockout_matches_hand_written_attention_on_timm(tiny_vit, family):
    model = tiny_vit(family)
    images, _ = data(family, n=3)
    prefix = model.num_prefix_tokens
    anatomy = ViTAnatomy.from_model(model)
    cases = [("self_only", False, None), ("no_cls", False, None), ("no_cls", True, None)]
    cases.append(("self_only", False, [1]))
    for mode, renormalise, blocks in cases:
        with torch.no_grad():
            want = token_states(model, images, edit_probs=knocked_by_hand(
                mode, prefix, renormalise, blocks))  # fmt: skip
            with (
                analysis.knockout(model, mode, blocks or "all", renormalise=renormalise),
                anatomy.capture([("residual", b) for b in range(3)], attention=[0]) as cap,
            ):
                logits = model(images)
        for block in range(3):
            torch.testing.assert_close(
                cap.tokens[("residual", block)], want["residual"][block], rtol=1e-5, atol=1e-5
            )
        # capture inside the knock-out records the probabilities the model used
        torch.testing.assert_close(cap.attention[0], want["attn_probs"][0])
        if family in ("plain", "registers"):  # the head reads [CLS]
            expected = class_logits(model, want["residual"][-1][:, 0])
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_official_edit_rows_only_image_tokens(tiny_vit):
    anatomy = ViTAnatomy.from_model(tiny_vit("registers"))  # [CLS] + 4 registers
    probs = torch.rand(2, 3, 9, 9).softmax(-1)
    self_only = analysis.interventions.knockout_edit(anatomy, "self_only")(probs)
    no_cls = analysis.interventions.knockout_edit(anatomy, "no_cls")(probs)
    assert torch.equal(self_only[:, :, :5], probs[:, :, :5])  # prefix rows untouched
    assert torch.equal(self_only[:, :, 5:], torch.eye(9)[5:].expand(2, 3, 4, 9))
    assert torch.equal(no_cls[:, :, 5:, 0], torch.zeros(2, 3, 4))
    assert torch.equal(no_cls[:, :, 5:, 1:], probs[:, :, 5:, 1:])  # not renormalised
    assert torch.equal(no_cls[:, :, :5], probs[:, :, :5])


def test_knockout_matches_hand_written_attention_on_hugging_face(tiny_hf_vit):
    model = tiny_hf_vit("vit")
    images, _ = data(n=3)
    for mode, renormalise in (("self_only", False), ("no_cls", False), ("no_cls", True)):
        with torch.no_grad():
            want = hf_vit_by_hand(model, images, knocked_by_hand(mode, 1, renormalise))
            with analysis.knockout(model, mode, renormalise=renormalise) as knocked:
                assert model.config._attn_implementation == EDITED
                got = knocked(images).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert_hf_restored(model)
        with torch.no_grad():  # and the unedited model is back
            torch.testing.assert_close(model(images).logits, hf_vit_by_hand(model, images))


@pytest.mark.parametrize("family", ["deit", "beit", "dinov2_reg"])
def test_knockout_on_other_hugging_face_families_edits_and_restores(tiny_hf_vit, family):
    model = tiny_hf_vit(family)
    anatomy = ViTAnatomy.from_model(model)
    images, _ = data(n=2)
    with torch.no_grad():
        before = model(images).logits
        with analysis.knockout(model, "self_only", blocks=[0]), anatomy.capture([], [0, 1]) as cap:
            edited = model(images).logits
    prefix = anatomy.num_prefix_tokens
    rows = cap.attention[0][:, :, prefix:]
    assert torch.equal(rows, torch.eye(rows.shape[-1])[prefix:].expand_as(rows))
    assert not torch.allclose(cap.attention[1][:, :, prefix:], rows)  # block 1 untouched
    assert not torch.allclose(edited, before)
    assert_hf_restored(model)


@pytest.mark.parametrize("hf", [False, True])
def test_knockouts_nest_and_compose_per_block(tiny_vit, tiny_hf_vit, hf):
    model = tiny_hf_vit("vit") if hf else tiny_vit("plain")
    images, _ = data(n=2)
    before = testing.model_state(model)

    def run() -> torch.Tensor:
        output = model(images)
        return output.logits if hf else output

    with torch.no_grad():
        with analysis.knockout(model, "self_only", blocks=[0, 1]):
            both = run()
        with analysis.knockout(model, "self_only", blocks=0):
            with analysis.knockout(model, "self_only", blocks=1):
                nested = run()
            only_first = run()
        with analysis.knockout(model, "self_only", blocks=0):
            alone = run()
    assert torch.equal(nested, both)
    assert torch.equal(only_first, alone)
    testing.assert_state_unchanged(model, before)
    if hf:
        assert_hf_restored(model)


@pytest.mark.parametrize("hf", [False, True])
def test_model_unchanged_after_an_exception_inside_knockout(tiny_vit, tiny_hf_vit, hf):
    model = tiny_hf_vit("vit") if hf else tiny_vit("plain")
    before = testing.model_state(model)
    with (
        pytest.raises(RuntimeError, match="inside"),
        analysis.knockout(model, "no_cls"),
        analysis.knockout(model, "self_only", blocks=-1),
    ):
        model(testing.tiny_images())
        raise RuntimeError("inside the knock-out")
    testing.assert_state_unchanged(model, before)
    if hf:
        assert_hf_restored(model)


def test_training_mode_is_left_as_it_is(tiny_vit):
    import copy

    model = copy.deepcopy(tiny_vit("plain")).train()
    with analysis.knockout(model, "self_only"):
        assert model.training and all(m.training for m in model.modules())
        assert not any(block.attn.fused_attn for block in model.blocks)
    assert all(m.training for m in model.modules())


def test_unsupported_models_and_bad_arguments(tiny_vit, tiny_swin):
    images = testing.tiny_images()
    for model, reason in ((tiny_vit("torchvision"), "MultiheadAttention"),
                          (tiny_swin(), "windows")):  # fmt: skip
        with pytest.raises(UnsupportedModelError, match=reason):
            enter(model, "self_only")
        with pytest.raises(UnsupportedModelError, match=reason):
            analysis.patch(model, images, images, Site("residual", 0))
    for family in ("avgpool", "reg4gap"):  # no [CLS] token
        with pytest.raises(UnsupportedModelError, match=r"\[CLS\]"):
            enter(tiny_vit(family), "no_cls")
    model = tiny_vit("plain")
    with pytest.raises(ValueError, match="mode must be one of"):
        enter(model, "no_self")
    with pytest.raises(ValueError, match="out of range"):
        enter(model, "self_only", blocks=3)
    with pytest.raises(TypeError, match="renormalise"):
        enter(model, "no_cls", renormalise="yes")
    with pytest.raises(ValueError, match="modes must name"):
        analysis.attention_knockout(model, images, modes=())


def test_attention_knockout_matches_hand_computation(tiny_vit):
    model = tiny_vit("plain")
    images, labels = data(n=6)
    result = analysis.attention_knockout(
        model, (images, labels), components=("residual", "mlp"), batch_size=4
    )
    C = testing.NUM_CLASSES
    positions = {}
    for run in result.runs:
        edit = None if run == "none" else knocked_by_hand(run, 1)
        with torch.no_grad():
            states = token_states(model, images, edit_probs=edit)
        positions[run] = {}
        for component in ("residual", "mlp"):
            logits = torch.stack([class_logits(model, t) for t in states[component]])
            label = logits.gather(-1, labels[None, :, None, None].expand(*logits.shape[:3], 1))
            positions[run][component] = (logits > label).sum(-1)  # (L, B, N)
            image = positions[run][component][:, :, 1:]
            rate = (image == 0).double().mean(2).mean(1) * 100
            torch.testing.assert_close(result[run].image_rate[component], rate)
            counts = torch.stack([torch.bincount(p.flatten(), minlength=C) for p in image])
            assert torch.equal(result[run].histograms[(component, "image")].counts, counts)
        accuracy = class_logits(model, states["residual"][-1][:, 0]).argmax(-1) == labels
        assert result.accuracy[run] == pytest.approx(100 * accuracy.double().mean().item())
    for mode in ("self_only", "no_cls"):
        for block in range(3):
            x = (C - positions[mode]["residual"][block][:, 1:]).flatten().numpy()
            y = (C - positions["none"]["residual"][block][:, 1:]).flatten().numpy()
            p_value = result.p_values[(mode, "residual", "image")][block].item()
            if np.all(x == y):
                assert math.isnan(p_value)
            else:
                expected = wilcoxon(x, y, alternative="two-sided", method="approx").pvalue
                assert p_value == pytest.approx(expected, rel=1e-9)
    assert result.to_dict()["runs"]["self_only"]["identifiability"]["num_images"] == 6


# ---------------------------------------------------------------------------- patching
def replace(where: dict, source: dict):
    """An edit ``f(block, tensor)`` that writes ``source[block][index]`` at ``where[block]``."""

    def edit(block: int, tensor: torch.Tensor) -> torch.Tensor:
        if block not in where:
            return tensor
        tensor = tensor.clone()
        tensor[where[block]] = source[block][where[block]]
        return tensor

    return edit


def recorded_by_hand(by_hand, model, images) -> dict[str, dict[int, torch.Tensor]]:
    """Every block's probabilities, heads' outputs and output, from the hand-written forward."""
    found: dict[str, dict[int, torch.Tensor]] = {"probs": {}, "heads": {}, "residual": {}}

    def keep(kind):
        def read(block, tensor):
            found[kind][block] = tensor
            return tensor

        return read

    by_hand(model, images, keep("probs"), keep("heads"), keep("residual"))
    return found


@pytest.mark.parametrize("hf", [False, True])
def test_patch_matches_hand_written_replacement(tiny_vit, tiny_hf_vit, hf):
    model = tiny_hf_vit("vit") if hf else tiny_vit("plain")
    by_hand = hf_vit_by_hand if hf else timm_by_hand
    clean, _ = data(n=3, seed=5)
    corrupted, _ = data(n=3, seed=6)
    with torch.no_grad():
        source = recorded_by_hand(by_hand, model, clean)
        cases = [
            ([Site("residual", 1, tokens=[0, 3])], dict(residual={1: (slice(None), [0, 3])})),
            ([Site("head", 0, 1)], dict(heads={0: (slice(None), 1)})),
            ([Site("head", -1, 0, tokens=2)], dict(heads={1 if hf else 2: (slice(None), 0, 2)})),
            ([Site("pattern", 1, 1)], dict(probs={1: (slice(None), 1)})),
            ([Site("pattern", 0, None, tokens=0), Site("residual", 0, tokens=5)],
             dict(probs={0: (slice(None), slice(None), 0)}, residual={0: (slice(None), 5)})),
        ]  # fmt: skip
        for sites, where in cases:
            edits = {kind: replace(w, source[kind]) for kind, w in where.items()}
            want = by_hand(model, corrupted, edits.get("probs"), edits.get("heads"),
                           edits.get("residual"))  # fmt: skip
            got = analysis.patch(model, clean, corrupted, sites)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(sites))
    if hf:
        assert_hf_restored(model)


@pytest.mark.parametrize("hf", [False, True])
def test_patching_with_itself_or_everywhere(tiny_vit, tiny_hf_vit, hf):
    model = tiny_hf_vit("vit") if hf else tiny_vit("plain")
    clean, _ = data(n=3, seed=5)
    corrupted, _ = data(n=3, seed=6)
    with torch.no_grad():
        output = model(clean)
        clean_logits = output.logits if hf else output
    depth = 2 if hf else 3
    every = [Site("residual", 0), Site("head", 1), Site("pattern", depth - 1, tokens=[0, 2])]
    # a run patched with itself has nothing to change
    torch.testing.assert_close(analysis.patch(model, clean, clean, every), clean_logits)
    # the whole residual stream of any block restores the clean logits
    for block in range(depth):
        restored = analysis.patch(model, clean, corrupted, Site("residual", block))
        torch.testing.assert_close(restored, clean_logits, rtol=1e-5, atol=1e-5)


def shares_by_hand(by_hand, model, clean, corrupted, labels, sites, contrast=None):
    """(sites, B) shares restored, and (sites, B) restored differences, one site at a time."""

    def metric(logits):
        value = logits[torch.arange(len(labels)), labels]
        return value if contrast is None else value - logits[torch.arange(len(labels)), contrast]

    with torch.no_grad():
        source = recorded_by_hand(by_hand, model, clean)
        m_clean, m_corrupted = metric(by_hand(model, clean)), metric(by_hand(model, corrupted))
        restored = []
        for kind, block, column in sites:
            if kind == "token":
                where = {block: (slice(None), column)}
                logits = by_hand(model, corrupted, residual=replace(where, source["residual"]))
            else:
                where = {block: (slice(None), column)}
                logits = by_hand(model, corrupted, heads=replace(where, source["heads"]))
            restored.append(metric(logits) - m_corrupted)
    restored = torch.stack(restored).double()
    return restored / (m_clean - m_corrupted).double(), restored, (m_clean - m_corrupted).double()


@pytest.mark.parametrize("hf", [False, True])
def test_patching_grid_matches_hand_computation(tiny_vit, tiny_hf_vit, hf):
    model = tiny_hf_vit("vit") if hf else tiny_vit("plain")
    by_hand = hf_vit_by_hand if hf else timm_by_hand
    clean, labels = data(n=4, seed=5)
    corrupted, _ = data(n=4, seed=6)
    corrupted[0] = clean[0]  # no difference to restore: left out
    depth, N, H = (2 if hf else 3), 17, 2
    contrast = torch.tensor([1, 2, 3, 4])
    result = analysis.patching_grid(model, (clean, labels), corrupted, batch_size=3,
                                    max_batch_size=20, contrast=contrast)  # fmt: skip
    sites = [("token", b, t) for b in range(depth) for t in range(N)]
    sites += [("head", b, h) for b in range(depth) for h in range(H)]
    share, restored, difference = shares_by_hand(
        by_hand, model, clean, corrupted, labels, sites, contrast
    )
    assert result.num_images == 4 and result.num_compared == 3
    share, restored = share[:, 1:], restored[:, 1:]
    tokens = depth * N
    torch.testing.assert_close(
        result.restored["token"], share[:tokens].mean(1).reshape(depth, N).float(),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    torch.testing.assert_close(
        result.restored["head"], share[tokens:].mean(1).reshape(depth, H).float(),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    torch.testing.assert_close(
        result.restored_of_mean["token"],
        (restored[:tokens].sum(1) / difference[1:].sum()).reshape(depth, N).float(),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    # the last block's [CLS] is all the head reads: patching it restores everything
    assert result.restored["token"][-1, 0].item() == pytest.approx(1.0, abs=1e-4)
    assert result.restored["token"][-1, 1:].abs().max().item() < 1e-4
    assert result.metric == "label - contrast logit"


def test_patching_grid_streams_and_batches_alike(tiny_vit):
    model = tiny_vit("plain")
    clean, labels = data(n=5, seed=5)
    corrupted, _ = data(n=5, seed=6)
    whole = analysis.patching_grid(model, (clean, labels), corrupted, grids="head",
                                   batch_size=5, max_batch_size=1000)  # fmt: skip
    loader = DataLoader(TensorDataset(clean, labels), batch_size=2)
    batches = iter([corrupted[:3], corrupted[3:]])  # a one-shot iterable of image batches
    parts = analysis.patching_grid(model, loader, batches, grids="head", batch_size=2,
                                   max_batch_size=3)  # fmt: skip
    torch.testing.assert_close(parts.restored["head"], whole.restored["head"])
    assert parts.grids == ("head",) and parts.num_images == 5


def test_patching_grid_without_any_difference_is_nan(tiny_vit):
    model = tiny_vit("plain")
    images, _ = data(n=2)
    result = analysis.patching_grid(model, images, images, blocks=[-1])
    assert result.num_compared == 0 and result.layers == [2]
    assert all(torch.isnan(grid).all() for grid in result.restored.values())
    assert result.clean_metric == pytest.approx(result.corrupted_metric)


def test_patching_bad_arguments(tiny_vit):
    model = tiny_vit("plain")
    images, _ = data(n=3)
    with pytest.raises(ValueError, match="kind must be one of"):
        Site("mlp", 0)
    with pytest.raises(ValueError, match="no head"):
        Site("residual", 0, 1)
    with pytest.raises(TypeError, match="tokens"):
        Site("residual", 0, tokens="cls")
    with pytest.raises(ValueError, match="head 2 is out of range"):
        analysis.patch(model, images, images, Site("head", 0, 2))
    with pytest.raises(ValueError, match="tokens"):
        analysis.patch(model, images, images, Site("residual", 0, tokens=17))
    with pytest.raises(ValueError, match="same shape"):
        analysis.patch(model, images, images[:2], Site("residual", 0))
    with pytest.raises(TypeError, match="sites"):
        analysis.patch(model, images, images, [])
    with pytest.raises(ValueError, match="same number"):
        analysis.patching_grid(model, images, images[:2], batch_size=2)
    with pytest.raises(ValueError, match="contrast"):
        analysis.patching_grid(model, images, images, contrast=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="grids must be one of"):
        analysis.patching_grid(model, images, images, grids="patch")


def test_results_render(tiny_vit, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = tiny_vit("plain")
    images, labels = data(n=3)
    knocked = analysis.attention_knockout(model, (images, labels), components=("residual", "mlp"))
    patched = analysis.patching_grid(model, (images, labels), images.flip(0))
    for result, stem in ((knocked, "attention_knockout"), (patched, "patching")):
        paths = result.save(tmp_path)
        assert [p.name for p in paths] == [f"{stem}.{ext}" for ext in ("json", "md", "png")]
        assert all(p.stat().st_size > 0 for p in paths)
    assert knocked.table().count("\n| 2 |") == 2  # one row per block and component
    assert "head 1" in patched.table() and "[CLS]" in patched.table()
    plt.close(patched.plot(token_layout="grid"))


def test_token_columns_name_the_prefix_tokens(tiny_vit):
    images = testing.tiny_images()
    for family, prefix in (("registers", ["[CLS]", "prefix 1"]), ("reg4gap", ["prefix 0"])):
        result = analysis.patching_grid(tiny_vit(family), images, images.flip(0), grids="token")
        assert result.token_labels()[: len(prefix)] == prefix
        assert result.to_dict()["token_columns"][-1] == "(3,3)"
        assert result.restored["token"].shape == (3, 16 + tiny_vit(family).num_prefix_tokens)
