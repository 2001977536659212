"""analysis.sublayers (logit increment, sublayer changes, residual composition) and the
block-input capture it rests on, against plain-torch references on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from class_space_saliency import ViTAnatomy, testing
from class_space_saliency.testing import embed_by_hand, token_states


@pytest.mark.parametrize("family", ["plain", "registers", "beit", "torchvision"])
def test_block_input_capture_is_the_stream_entering_each_block(tiny_vit, family):
    model = tiny_vit(family)
    images = testing.tiny_images(family)
    anatomy = ViTAnatomy.from_model(model)
    with torch.no_grad():
        states = token_states(model, images)
        with anatomy.capture([("block_input", b) for b in range(anatomy.depth)]) as cap:
            anatomy.forward(images)
        if family == "torchvision":
            x = model._process_input(images)
            x = torch.cat([model.class_token.expand(len(images), -1, -1), x], 1)
            embedded = x + model.encoder.pos_embedding
        else:
            embedded = embed_by_hand(model, images)[0]
    torch.testing.assert_close(cap.tokens[("block_input", 0)], embedded)
    for block in range(1, anatomy.depth):
        want = states["residual"][block - 1]
        torch.testing.assert_close(cap.tokens[("block_input", block)], want)
    assert all(not block._forward_pre_hooks for block in anatomy.blocks)


def test_block_input_capture_reads_keyword_inputs(tiny_hf_vit):
    model = tiny_hf_vit("vit")
    images = testing.tiny_images()
    anatomy = ViTAnatomy.from_model(model)
    with torch.no_grad():  # transformers hooks a model for hidden states: ask a copy
        hidden = copy.deepcopy(model)(images, output_hidden_states=True).hidden_states
        with anatomy.capture([("block_input", 0), ("block_input", 1)]) as cap:
            anatomy.blocks[0](hidden_states=hidden[0])  # keyword call: the pre-hook reads kwargs
            anatomy.blocks[1](hidden[1])
    torch.testing.assert_close(cap.tokens[("block_input", 0)], hidden[0])
    torch.testing.assert_close(cap.tokens[("block_input", 1)], hidden[1])
