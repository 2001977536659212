"""Reading the files of a data set: images as RGB, and what to do with a broken one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


class UnreadableImageError(Exception):
    """An image file of the dataset could not be decoded.

    Attributes:
        path: The file.
        reason: What went wrong.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """The image file ``path`` decoded and converted to ``mode``.

    Raises:
        UnreadableImageError: For a missing, truncated or undecodable file (the benchmark
            runner records it as skipped and goes on).
    """
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from error


def files_fingerprint(entries: Iterable[tuple[str, Iterable[Path]]]) -> str:
    """SHA-256 (16 hex digits) of ``(name, files)`` entries: each name and its files' bytes.

    A missing file contributes ``b"missing"``, so a changed, added or lost file changes it.
    """
    digest = hashlib.sha256()
    for name, paths in entries:
        digest.update(f"{name};".encode())
        for path in paths:
            digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()[:16]
