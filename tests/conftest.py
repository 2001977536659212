"""Fixtures: tiny models built once per session and handed out read-only.

The factories and reference computations live in ``class_space_saliency.testing``; this file
only caches models. A test that changes its model (training mode, frozen parameters, new
weights) must change a ``copy.deepcopy`` of it: after every test, each shared model it was
given is checked against the snapshot taken when the model was built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from class_space_saliency import testing

# Tiny models gain nothing from threads, and competing OpenMP threads slow them badly.
torch.set_num_threads(1)


class SharedModels:
    """Models built once per session by the factories of ``class_space_saliency.testing``."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, str], tuple[nn.Module | tuple, dict]] = {}

    def get(self, factory: Callable[[str], nn.Module | tuple], kind: str) -> nn.Module | tuple:
        """The session's ``factory(kind)`` (built on first use)."""
        key = (factory.__name__, kind)
        if key not in self._built:
            model = factory(kind)
            self._built[key] = (model, testing.model_state(_module(model)))
        return self._built[key][0]

    def assert_unchanged(self, keys: set[tuple[str, str]] | None = None) -> None:
        """Every shared model (or those of ``keys``) is as it was built."""
        for key, (model, state) in self._built.items():
            if keys is None or key in keys:
                testing.assert_state_unchanged(_module(model), state)


def _module(model: nn.Module | tuple) -> nn.Module:
    """``tiny_clip`` gives (clip, classifier): the classifier holds the whole CLIP."""
    return model[1] if isinstance(model, tuple) else model


@pytest.fixture(scope="session")
def shared_models() -> Iterator[SharedModels]:
    """The session's model cache; checks at the end that no test changed a model."""
    models = SharedModels()
    yield models
    models.assert_unchanged()


def _getter(
    shared_models: SharedModels, factory: Callable[[str], nn.Module | tuple], default: str
) -> Iterator[Callable[..., nn.Module | tuple]]:
    """Yields ``get(kind=default)``; afterwards checks the models it handed out."""
    used: set[tuple[str, str]] = set()

    def get(kind: str = default) -> nn.Module | tuple:
        used.add((factory.__name__, kind))
        return shared_models.get(factory, kind)

    yield get
    shared_models.assert_unchanged(used)


@pytest.fixture
def tiny_vit(shared_models: SharedModels) -> Iterator[Callable[..., nn.Module]]:
    """``tiny_vit(family="plain")``: the shared ``testing.tiny_vit``; must not be changed."""
    yield from _getter(shared_models, testing.tiny_vit, "plain")


@pytest.fixture
def tiny_timm(shared_models: SharedModels) -> Iterator[Callable[..., nn.Module]]:
    """``tiny_timm(architecture)``: the shared ``testing.tiny_timm``; must not be changed."""
    yield from _getter(shared_models, testing.tiny_timm, "vit_base_patch16_rpn_224")


@pytest.fixture
def tiny_hf_vit(shared_models: SharedModels) -> Iterator[Callable[..., nn.Module]]:
    """``tiny_hf_vit(family="vit")``: the shared ``testing.tiny_hf_vit``; must not be changed."""
    pytest.importorskip("transformers")
    yield from _getter(shared_models, testing.tiny_hf_vit, "vit")


@pytest.fixture
def tiny_swin(shared_models: SharedModels) -> Iterator[Callable[..., nn.Module]]:
    """``tiny_swin(library="timm")``: the shared ``testing.tiny_swin``; must not be changed."""
    yield from _getter(shared_models, testing.tiny_swin, "timm")


@pytest.fixture
def tiny_clip(shared_models: SharedModels) -> Iterator[Callable[..., tuple]]:
    """``tiny_clip(pool="tok")``: the shared ``(clip, classifier)``; must not be changed."""
    pytest.importorskip("open_clip")
    yield from _getter(shared_models, testing.tiny_clip, "tok")


@pytest.fixture(params=testing.VIT_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every timm / torchvision ViT family of ``testing.tiny_vit``."""
    return request.param
