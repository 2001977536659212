"""Property tests: random small timm ViTs, batches and targets (hypothesis).

Every drawn model (patch size, depth, [CLS]/register/distillation tokens or average pooling,
fixed grid or dynamic size with non-square and padded inputs) must give maps of the patch
grid's shape that are finite, equal for a batch and its images one by one, and leave the
model exactly as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from class_space_saliency.anatomy import COMPONENTS
from class_space_saliency.methods import create_method
from class_space_saliency.testing import assert_state_unchanged, model_state, perturb_weights

NUM_CLASSES = 5


@dataclass
class Case:
    """One drawn model, input size, batch and method options."""

    patch: int
    depth: int
    distilled: bool
    class_token: bool
    reg_tokens: int
    global_pool: str
    init_values: float | None
    dynamic: bool
    pad: bool
    size: tuple[int, int]
    targets: list[int]
    training: bool
    seed: int
    layer: int | str
    component: str

    def model(self) -> torch.nn.Module:
        name = "deit_tiny_distilled_patch16_224" if self.distilled else "vit_tiny_patch16_224"
        options = dict(class_token=self.class_token, global_pool=self.global_pool)
        if self.reg_tokens:
            options["reg_tokens"] = self.reg_tokens
        if self.dynamic:
            options.update(img_size=4 * self.patch, dynamic_img_size=True, dynamic_img_pad=self.pad)
        else:
            options["img_size"] = self.size
        with torch.random.fork_rng():  # timm initialises from the global RNG
            torch.manual_seed(self.seed)
            model = timm.create_model(
                name,
                pretrained=False,
                patch_size=self.patch,
                depth=self.depth,
                embed_dim=16,
                num_heads=2,
                mlp_ratio=2.0,
                num_classes=NUM_CLASSES,
                init_values=self.init_values,
                **options,
            )
            model = perturb_weights(model)
        return model.train(self.training)

    def inputs(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(len(self.targets), 3, *self.size, generator=generator)

    @property
    def grid(self) -> tuple[int, int]:
        return (math.ceil(self.size[0] / self.patch), math.ceil(self.size[1] / self.patch))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    patch = draw(st.sampled_from([2, 4, 8]))
    depth = draw(st.integers(1, 3))
    distilled = draw(st.booleans())
    class_token = distilled or draw(st.booleans())
    pools = ["token", "avg"] if class_token and not distilled else ["token" if distilled else "avg"]
    pool = draw(st.sampled_from(pools))
    dynamic = draw(st.booleans())
    pad = dynamic and draw(st.booleans())
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    # padded dynamic models take sizes that are not a multiple of the patch
    extra = [draw(st.integers(0, patch - 1)) if pad else 0 for _ in grid]
    return Case(
        patch=patch,
        depth=depth,
        distilled=distilled,
        class_token=class_token,
        reg_tokens=0 if distilled else draw(st.integers(0, 2)),
        global_pool=pool,
        init_values=draw(st.sampled_from([None, 0.5])),
        dynamic=dynamic,
        pad=pad,
        size=(grid[0] * patch + extra[0], grid[1] * patch + extra[1]),
        targets=draw(st.lists(st.integers(0, NUM_CLASSES - 1), min_size=1, max_size=4)),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        layer=draw(st.one_of(st.integers(-depth, depth - 1), st.just("all"))),
        component=draw(st.sampled_from(COMPONENTS)),
    )


@settings(max_examples=15, deadline=None, database=None)
@given(case=cases())
def test_maps_have_the_grid_shape_are_finite_batch_invariant_and_leave_the_model(case):
    model = case.model()
    images = case.inputs()
    before = model_state(model)
    methods = {
        "class_space": dict(layer=case.layer, component=case.component),
        "rollout": {},
        "gradcam": {},
        "class_space_contributions": dict(layer=case.layer),
    }
    for name, options in methods.items():
        explainer = create_method(name, model, **options)
        maps = explainer.attribute(images, target=case.targets)
        assert maps.shape == (len(case.targets), 1, *case.grid), name
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all(), name
        singles = torch.cat(
            [explainer.attribute(images[i : i + 1], t) for i, t in enumerate(case.targets)]
        )
        scale = max(1.0, float(maps.abs().max()))
        torch.testing.assert_close(singles, maps, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert_state_unchanged(model, before)
