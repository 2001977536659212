"""untrained_copy: a fresh initialisation of the same architecture, the model left as it was."""

from __future__ import annotations

import pytest
import torch

from class_space_saliency import testing
from class_space_saliency.untrained import untrained_copy


@pytest.mark.parametrize("family", ["plain", "beit", "eva02", "torchvision", "hf", "clip"])
def test_every_learned_tensor_is_redrawn_and_the_model_is_kept(family, shared_models):
    factory, kind = {
        "hf": (testing.tiny_hf_vit, "vit"),
        "clip": (testing.tiny_clip, "tok"),
    }.get(family, (testing.tiny_vit, family))
    if family in ("hf", "clip"):
        pytest.importorskip({"hf": "transformers", "clip": "open_clip"}[family])
    model = shared_models.get(factory, kind)
    model = model[1] if isinstance(model, tuple) else model
    state = testing.model_state(model)
    rng = torch.get_rng_state()
    twin = untrained_copy(model, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    testing.assert_state_unchanged(model, state)
    for (name, learned), (_, fresh) in zip(
        model.named_parameters(), twin.named_parameters(), strict=True
    ):
        constant = bool((fresh == fresh.flatten()[0]).all())
        assert constant or not torch.equal(learned, fresh), name
    again = untrained_copy(model, seed=3)
    pairs = zip(twin.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_untrained_copy_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be"):
        untrained_copy("vit_base_patch16_224")
