"""Faithfulness evaluation: perturbation protocols and curves."""

from .curves import area_under_curve, curve_x, perturbation_curves, step_counts
from .protocols import PRESETS, PROTOCOLS, Protocol, resolve_protocols

__all__ = [
    "PRESETS",
    "PROTOCOLS",
    "Protocol",
    "area_under_curve",
    "curve_x",
    "perturbation_curves",
    "resolve_protocols",
    "step_counts",
]
