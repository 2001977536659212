"""Guarantees of every registered method and of the harness: the user's model comes back as
it was (after success, an exception or Ctrl-C inside the forward pass, and a benchmark
interrupted with Ctrl-C), maps are bit-identical across calls, and bad arguments fail early
with the argument's name."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from class_space_saliency.cli import main
from class_space_saliency.evaluation import load_records, run_benchmark
from class_space_saliency.methods import METHODS, SaliencyMethod, create_method
from class_space_saliency.testing import (
    assert_state_unchanged,
    build_method,
    model_state,
    tiny_images,
)

MODEL_FREE = {"random", "sobel", "intensity"}
"""Controls that never run the model."""
TARGETS = [0, 3, 6]
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def prepared_model(tiny_vit) -> nn.Module:
    """A tiny ViT with state to restore: training mode, fused attention on, a frozen part."""
    model = copy.deepcopy(tiny_vit("plain")).train()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    model.patch_embed.requires_grad_(False)
    return model


@contextlib.contextmanager
def raising_hook(module: nn.Module, error: type[BaseException]) -> Iterator[list[int]]:
    """While active, every forward of ``module`` raises ``error``; yields the call log."""
    calls: list[int] = []

    def hook(*_) -> None:
        calls.append(1)
        raise error("inside the forward pass")

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- model state
@pytest.mark.parametrize("name", sorted(METHODS))
def test_model_unchanged_after_success(prepared_model, name):
    model = prepared_model
    before = model_state(model)
    maps = build_method(name, model).attribute(tiny_images("plain"), target=TARGETS)
    assert maps.shape == (3, 1, 4, 4)
    assert_state_unchanged(model, before)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_model_unchanged_after_an_exception_inside_the_forward_pass(prepared_model, name, error):
    model = prepared_model
    explainer = build_method(name, model)
    before = model_state(model)
    with raising_hook(explainer.anatomy.blocks[1], error) as calls:
        if name in MODEL_FREE:
            explainer.attribute(tiny_images("plain"), target=TARGETS)
            assert not calls
        else:
            with pytest.raises(error, match="inside the forward pass"):
                explainer.attribute(tiny_images("plain"), target=TARGETS)
    assert_state_unchanged(model, before)


class InterruptedOnSecondBatch:
    """Explains the first batch with ``method``; Ctrl-C strikes inside its forward pass on the
    second."""

    def __init__(self, method: SaliencyMethod) -> None:
        self.method, self.calls = method, 0

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.method.attribute(inputs, target)
        with raising_hook(self.method.anatomy.blocks[1], KeyboardInterrupt):
            return self.method.attribute(inputs, target)


def test_model_unchanged_after_ctrl_c_in_the_benchmark(prepared_model, tmp_path):
    model = prepared_model
    methods = {name: build_method(name, model) for name in METHODS}
    methods["interrupted"] = InterruptedOnSecondBatch(create_method("chefer", model))
    before = model_state(model)
    with pytest.raises(KeyboardInterrupt, match="inside the forward pass"):
        run_benchmark(
            model,
            (tiny_images("plain", batch=4), torch.tensor([0, 1, 2, 3])),
            methods,
            ["chefer2021/positive"],
            **NORM,
            out_dir=tmp_path,
            batch_size=2,
            progress=False,
        )
    assert methods["interrupted"].calls == 2
    assert_state_unchanged(model, before)
    assert {r["image"] for r in load_records(tmp_path)} == {0, 1}  # the first batch was kept


# ---------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", sorted(METHODS))
def test_maps_are_bit_identical_across_calls_and_instances(tiny_vit, name):
    model = tiny_vit("registers")
    images = tiny_images("registers")
    first = build_method(name, model).attribute(images, target=TARGETS)
    explainer = build_method(name, model)
    for _ in range(2):
        assert torch.equal(explainer.attribute(images, target=TARGETS), first)


# ---------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(n=0), "n must be a positive int"),
        (dict(n=-1), "n must be a positive int"),
        (dict(n=2.5), "n must be a positive int"),
        (dict(methods=["sobel", "nope"]), "method must be one of"),
        (dict(protocols=["chefer2021", "nope"]), "unknown protocol 'nope'"),
        (dict(batch_size=0), "batch sizes must be >= 1"),
        (dict(max_batch_size=0), "batch sizes must be >= 1"),
    ],
)
def test_benchmark_arguments_are_checked_before_anything_is_written(
    tiny_vit, change, match, tmp_path
):
    options = {**dict(methods=["sobel"], protocols=["chefer2021"]), **change}
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        run_benchmark(
            tiny_vit("plain"),
            (tiny_images("plain"), torch.tensor(TARGETS)),
            options.pop("methods"),
            options.pop("protocols"),
            **NORM,
            out_dir=out,
            progress=False,
            **options,
        )
    assert not out.exists()


@pytest.mark.parametrize("target", ["10", "-1"])
def test_attribute_command_out_of_range_target_exits_2(target, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attribute", "image.png", "--target", target, "--out", str(out)]) == 2
    assert "out of range for 10 classes" in capsys.readouterr().err and not out.exists()


def test_benchmark_command_bad_n_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["benchmark", "--n", "0", "--methods", "sobel", "--out", str(out)]) == 2
    assert "n must be a positive int" in capsys.readouterr().err and not out.exists()
