"""Memories in class space (value vectors, key-value agreement) against hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from class_space_saliency import ViTAnatomy
from class_space_saliency.testing import (
    assert_state_unchanged,
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
