"""Class identifiability against a hand computation from the reference token states."""

from __future__ import annotations

import pytest
import torch

from class_space_saliency import class_identifiability
from class_space_saliency.testing import (
    class_logits,
    num_prefix_tokens_of,
    tiny_images,
    token_states,
)


@pytest.mark.parametrize("family", ["plain", "distilled", "registers", "avgpool", "torchvision"])
@torch.no_grad()
def test_identifiability_matches_hand_computation(tiny_vit, family):
    model = tiny_vit(family)
    images = tiny_images(family, batch=5)
    labels = torch.tensor([0, 1, 2, 3, 4])
    states = token_states(model, images)
    prefix = num_prefix_tokens_of(model)
    result = class_identifiability(model, images, labels, max_batch_size=2)
    assert result.layers == [0, 1, 2] and result.num_images == 5
    for block, tokens in enumerate(states["residual"]):
        logits = class_logits(model, tokens)  # (B, N, C)
        label_logit = logits[torch.arange(5), :, labels]  # (B, N)
        rank = 1 - (logits > label_logit[..., None]).sum(-1).float() / logits.shape[-1]
        top1 = logits.argmax(-1) == labels[:, None]
        image_rate = top1[:, prefix:].float().mean(1).mean() * 100
        torch.testing.assert_close(result.token_rank[block], rank[:, prefix:].mean())
        torch.testing.assert_close(result.token_rate[block], image_rate)
        if prefix:
            torch.testing.assert_close(result.cls_rank[block], rank[:, 0].mean())
            torch.testing.assert_close(result.cls_rate[block], top1[:, 0].float().mean() * 100)
        else:
            assert result.cls_rank is None
    assert "class identifiability" in str(result)
    assert len(result.to_dict()["token_rate"]) == 3


def test_identifiability_rejects_missing_labels(tiny_vit):
    with pytest.raises(ValueError, match="labels"):
        class_identifiability(tiny_vit("plain"), tiny_images("plain"), None)
