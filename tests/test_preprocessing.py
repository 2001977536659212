"""Preprocessing: its own module, crop geometry of every timm crop mode, masks that follow it."""

from __future__ import annotations

from test_registry import PACKAGE, imported_modules


def test_model_loaders_and_preprocessing_import_no_cycle():
    hub = imported_modules(PACKAGE / "hub.py")
    preprocessing = imported_modules(PACKAGE / "preprocessing.py")
    assert "models" not in hub  # models imports hub (lazily): the reverse would be a cycle
    assert not {"models", "hub", "data"} & preprocessing
