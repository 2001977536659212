"""Data sets and reading their files (a core module: the analyses and the benchmark share it)."""

from .files import UnreadableImageError

__all__ = ["UnreadableImageError"]
