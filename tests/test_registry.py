"""The method registry: metadata that matches what each method does, filters, errors, layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import class_space_saliency
from class_space_saliency import SaliencyMethod, UnsupportedModelError, register_method
from class_space_saliency.methods import (
    COSTS,
    FLAGS,
    METHODS,
    VARIANTS,
    MethodOptions,
    create_method,
    create_methods,
    list_methods,
    method_info,
    register_variant,
    unregister_method,
)
from class_space_saliency.testing import build_method

PACKAGE = Path(class_space_saliency.__file__).parent
NUM_CLASSES = 6


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, **options, **kwargs)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_vit().eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def registered():
    """Names registered by a test, unregistered afterwards (variants first)."""
    names: list[str] = []
    yield names
    for name in sorted(names, key=lambda n: method_info(n).variant_of is None):
        unregister_method(name)


class Dummy(SaliencyMethod):
    """An unregistered method, for registry errors."""


def count_forwards(model: nn.Module):
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


# ---------------------------------------------------------------------------- the metadata is true
def test_every_method_and_variant_is_listed_and_built(model, images):
    names = list_methods()
    assert names[: len(METHODS)] == list(METHODS) and names[len(METHODS) :] == list(VARIANTS)
    assert "class_space_gradient_paper" in names and "class_space" in names
    for name in names:
        explainer = build_method(name, model)
        assert isinstance(explainer, method_info(name).method)
        assert explainer.attribute(images, target=[1, 2]).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("name", list_methods(class_specific=False))
def test_class_agnostic_methods_ignore_the_target(model, images, name):
    explainer = create_method(name, model)
    assert torch.equal(explainer.attribute(images, target=0), explainer.attribute(images, 5))


@pytest.mark.parametrize("name", list_methods(class_specific=True))
def test_class_specific_methods_depend_on_the_target(model, images, name):
    explainer = build_method(name, model)
    assert not torch.allclose(explainer.attribute(images, target=0), explainer.attribute(images, 5))


@pytest.mark.parametrize("name", list_methods(model_agnostic=True))
def test_model_agnostic_methods_never_run_the_model(model, images, name):
    calls, handle = count_forwards(model)
    try:
        create_method(name, model).attribute(images)
    finally:
        handle.remove()
    assert calls == []
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())  # no adapter supports it
    maps = create_method(name, cnn, patch_size=4, num_classes=3).attribute(images)
    assert maps.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("name", list_methods(model_agnostic=False))
def test_model_methods_run_the_model(model, images, name):
    explainer = build_method(name, model)  # fitting (probes) runs the model: build first
    calls, handle = count_forwards(model)
    try:
        explainer.attribute(images, target=1)
    finally:
        handle.remove()
    assert len(calls) >= 1


@pytest.mark.parametrize("name", list_methods(needs_gradients=False))
def test_gradient_free_methods_run_in_inference_mode(model, name):
    with torch.inference_mode():
        images = torch.randn(2, 3, 16, 16)
        assert build_method(name, model).attribute(images, target=1).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("name", list_methods(needs_gradients=True))
def test_gradient_methods_need_autograd(model, name):
    with torch.inference_mode():
        images = torch.randn(2, 3, 16, 16)
        with pytest.raises(RuntimeError):
            create_method(name, model).attribute(images, target=1)


def test_needs_cls_is_checked_on_pooled_models():
    pooled = tiny_vit(class_token=False, global_pool="avg")
    for name in list_methods():
        if method_info(name).needs_cls:
            with pytest.raises(UnsupportedModelError, match=r"\[CLS\]"):
                create_method(name, pooled)
        else:
            build_method(name, pooled).attribute(torch.randn(1, 3, 16, 16), target=0)


def test_needs_attention_is_checked_where_attention_cannot_be_read():
    torchvision_vit = torchvision.models.VisionTransformer(16, 4, 2, 2, 16, 32, num_classes=3)
    for name in list_methods(needs_attention=True, needs_gradients=True, needs_cls=False):
        with pytest.raises(UnsupportedModelError, match="differentiable"):
            create_method(name, torchvision_vit)
    for name in list_methods(needs_attention=True, needs_gradients=False):
        create_method(name, torchvision_vit)


def test_cost_is_derived_from_the_flags():
    for name in list_methods():
        info = method_info(name)
        assert info.method.cost == info.cost in COSTS
    assert list_methods(cost="no model pass") == list_methods(model_agnostic=True)
    assert set(list_methods(cost="forward + backward")) == set(list_methods(needs_gradients=True))


# ---------------------------------------------------------------------------- filters and errors
def test_filters_combine_and_variants_follow_their_method():
    assert list_methods(needs_gradients=False, model_agnostic=False, variants=False) == [
        "class_space",
        "class_space_contributions",
        "rollout",
        "raw_attention",
        "linear_probe",
    ]
    assert list_methods(needs_fitting=True) == ["linear_probe"]
    paper, base = method_info("class_space_gradient_paper"), method_info("class_space_gradient")
    assert all(getattr(paper, flag) == getattr(base, flag) for flag in FLAGS)
    assert paper.variant_of == "class_space_gradient" and dict(paper.fixed_options) == {
        "paper_exact": True
    }
    assert "class_space_gradient_paper" not in list_methods(variants=False)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: list_methods(gradients=True), TypeError, "gradients"),
        (lambda: list_methods(needs_gradients="yes"), TypeError, "needs_gradients"),
        (lambda: list_methods(cost="cheap"), ValueError, "cost"),
        (lambda: method_info("nope"), ValueError, "class_space"),
        (lambda: register_method("class_space")(Dummy), ValueError, "already registered"),
        (lambda: register_method("not a name")(Dummy), ValueError, "identifier"),
        (lambda: register_method("x_bad")(object), TypeError, "SaliencyMethod"),
        (lambda: register_variant("v", "class_space", colour=1), ValueError, "colour"),
        (lambda: register_variant("v", "class_space_gradient_paper"), ValueError, "variant"),
        (lambda: unregister_method("class_space_gradient"), ValueError, "variants"),
    ],
)
def test_registry_errors_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert "v" not in list_methods() and "x_bad" not in list_methods()


def test_create_method_errors(model):
    with pytest.raises(ValueError, match="fixes"):
        create_method("class_space_gradient_paper", model, paper_exact=False)
    with pytest.raises(ValueError, match="method must be one of"):
        create_method("class-space", model)
    with pytest.raises(TypeError, match="colour"):
        create_method("class_space", model, colour="red")
    with pytest.raises(ValueError, match="unique"):
        create_methods(model, ["sobel", "sobel"])
    with pytest.raises(ValueError, match="method_kwargs"):
        create_methods(model, ["sobel"], {"gradcam": {}})
    built = create_methods(model, ["sobel", "class_space"], {"class_space": {"layer": 0}})
    assert list(built) == ["sobel", "class_space"] and built["class_space"].layer == [0]


# ---------------------------------------------------------------------------- adding a method
def test_a_new_method_is_one_class_and_one_decorator_line(model, images, registered):
    @register_method("test_norms", class_specific=False)
    class TokenNorms(SaliencyMethod):
        """Norm of each image token of the last block."""

        def _attribute(self, inputs, target, grid, options):
            prefix = self.anatomy.num_prefix_tokens
            with self.anatomy.capture([("residual", -1)]) as cap:
                self.anatomy.forward(inputs)
            norms = cap.tokens[("residual", self.anatomy.depth - 1)][:, prefix:].norm(dim=-1)
            return norms.reshape(len(inputs), 1, *grid)

    registered.append("test_norms")
    assert "test_norms" in list_methods(class_specific=False, needs_gradients=False)
    upsampled = create_method("test_norms", model).attribute(images, upsample=True)
    assert upsampled.shape == (2, 1, 16, 16)
    outputs = []  # independent reference: the last block's output, read by a plain hook
    handle = model.blocks[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        model(images)
    handle.remove()
    want = outputs[0][:, 1:].norm(dim=-1).reshape(2, 1, 4, 4)
    torch.testing.assert_close(create_method("test_norms", model).attribute(images), want)


def test_a_method_with_options(model, images, registered):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ScaleOptions(MethodOptions):
        factor: float = 1.0

        def __post_init__(self) -> None:
            if not isinstance(self.factor, int | float) or isinstance(self.factor, bool):
                raise TypeError(f"factor must be a number, got {self.factor!r}")

    @register_method("test_scaled", class_specific=False, model_agnostic=True)
    class Scaled(SaliencyMethod):
        Options = ScaleOptions

        def _attribute(self, inputs, target, grid, options):
            return torch.full((len(inputs), 1, *grid), float(options.factor))

    registered.append("test_scaled")
    register_variant("test_scaled_twice", "test_scaled", factor=2.0)
    registered.append("test_scaled_twice")
    assert create_method("test_scaled", model, factor=3).attribute(images).unique().item() == 3
    assert create_method("test_scaled_twice", model).attribute(images).unique().item() == 2
    assert Scaled(model).attribute(images, factor=5).unique().item() == 5
    with pytest.raises(TypeError, match="factor"):
        Scaled(model).attribute(images, factor="5")


def test_a_method_cannot_define_attribute():
    with pytest.raises(TypeError, match="final"):

        class Bad(SaliencyMethod):
            def attribute(self, inputs, target=None):  # the base owns attribute()
                return inputs


def test_options_must_be_a_method_options_dataclass():
    with pytest.raises(TypeError, match="Options"):

        class Bad(SaliencyMethod):
            Options = dict


# ---------------------------------------------------------------------------- structure
def test_exactly_one_attribute_definition_in_the_methods():
    found = [
        f"{path.name}:{number}"
        for path in sorted((PACKAGE / "methods").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"def attribute\b", line)
    ]
    assert len(found) == 1 and found[0].startswith("base.py"), found


LAYERS = {
    "methods": 1,
    "evaluation": 2,
    "sanity": 2,
    "analysis": 2,
    "testing": 3,
    "reproduce": 3,
}
TOP = {"cli", "_cli_common", "__main__", "interop", "__init__", "evaluation.cli", "analysis.cli"}


def layer_of(module: str) -> int:
    """core 0 <- methods 1 <- evaluation, sanity 2 <- cli / interop / testing / root 3."""
    if module in TOP:
        return 3
    return LAYERS.get(module.split(".")[0], 0)


def imported_modules(path: Path) -> set[str]:
    """Package modules imported anywhere in ``path`` (also inside functions), dotted."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    package = list(relative.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [alias.name for alias in node.names]
            for name in names:  # "from . import x" imports module x
                candidate = PACKAGE.joinpath(*target, f"{name}.py")
                found.add(".".join([*target, name] if candidate.exists() else target))
    return {name for name in found if name}


def test_no_module_imports_from_a_layer_above_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        module = "__init__" if module == "__init__" else module.removesuffix(".__init__")
        for imported in imported_modules(path):
            above = layer_of(imported) > layer_of(module)
            pair = {module.split(".")[0], imported.split(".")[0]}
            # sanity builds methods through the registry, not the runner; the analyses and the
            # benchmark share only the layers below them
            sibling = module not in TOP and pair in (
                {"sanity", "evaluation"},
                {"analysis", "evaluation"},
            )
            if above or sibling:
                violations.append(f"{module} imports {imported}")
    assert violations == []


def test_all_hooks_live_in_one_module():
    # testing/ holds independent references for the tests; they must not use the library's hooks
    hooking = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] != "testing"
        and re.search(r"register_forward(_pre)?_hook\(", path.read_text())
    )
    assert hooking == ["_hooks.py"]


def test_no_two_modules_import_each_other():
    # imports flow one way (cli -> analysis/evaluation -> methods -> core); a pair of modules
    # that import each other, even only for type checking or inside a function, ties them
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        modules[module.removesuffix(".__init__")] = imported_modules(path)
    pairs = sorted(
        (first, second)
        for first, imports in modules.items()
        for second in imports
        if first < second and first in modules.get(second, set())
    )
    assert pairs == []
