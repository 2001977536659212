"""Docstring examples (``--doctest-modules``): the names they take as given, and a scratch folder.

Examples in the package say ``model``, ``images``, ``labels``, ``maps`` and ``masks`` for the
reader's own model and data; here these are a tiny random timm ViT
(``class_space_saliency.testing``), three 32x32 images, the model's predicted classes, random
(3, 1, 4, 4) saliency maps and box-shaped object masks; ``PROTOCOLS`` is the evaluation's
preset table. Every example runs in its own empty working folder, so paths such as
``runs/a`` are written there.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest) -> None:
    if not hasattr(request.node, "dtest"):  # not a docstring example
        return
    from class_space_saliency import _fashion_mnist
    from class_space_saliency.evaluation import PROTOCOLS
    from class_space_saliency.testing import box_masks, tiny_images, tiny_vit

    if request.node.name.startswith("class_space_saliency.scenes") and not any(
        (folder / "t10k-images-idx3-ubyte.gz").exists()
        for folder in _fashion_mnist.FASHION_MNIST_DIRS
    ):
        pytest.skip("Debian's dataset-fashion-mnist package is not installed")
    request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    model = tiny_vit("plain")
    images = tiny_images("plain")
    with torch.no_grad():
        labels = model(images).argmax(-1)
    namespace = request.getfixturevalue("doctest_namespace")
    namespace.update(
        torch=torch,
        model=model,
        images=images,
        labels=labels,
        maps=torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
        masks=box_masks(images),
        PROTOCOLS=PROTOCOLS,
    )
