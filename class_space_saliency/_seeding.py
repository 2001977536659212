"""Seeds derived from an image's own values, so randomness never depends on batching.

The same image gets the same seed at any batch position, for any batch size, under any
sharding of a data set and on every device; the global RNG is never touched.
"""

from __future__ import annotations

import hashlib

import torch


def image_seed(image: torch.Tensor, *salt: int) -> int:
    """A 63-bit seed from the bytes of ``image`` and integer ``salt`` values.

    Args:
        image: Any tensor (moved to the CPU to read its bytes).
        *salt: Integers mixed into the hash (a user seed, a step index ...).

    Returns:
        A non-negative int usable by ``torch.Generator.manual_seed``.

    Example:
        >>> image_seed(torch.zeros(3, 4, 4), 0) == image_seed(torch.zeros(3, 4, 4), 0)
        True
    """
    digest = hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=8)
    for value in salt:
        digest.update(int(value).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def image_generator(image: torch.Tensor, *salt: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`image_seed` of ``image`` and ``salt``."""
    return torch.Generator().manual_seed(image_seed(image, *salt))
