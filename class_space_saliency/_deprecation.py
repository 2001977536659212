"""Deprecated module-level names: the old name still works and warns, pointing at the new one."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any


def deprecated_aliases(
    module: str, aliases: Mapping[str, str], namespace: Mapping[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves ``aliases`` (old name -> new name) with a warning.

    Args:
        module: The module's ``__name__``, for the messages.
        aliases: Old name -> the name it was renamed to.
        namespace: The module's ``globals()``, where the new names are looked up.

    Returns:
        The function to assign to the module's ``__getattr__``.

    Example:
        >>> import warnings
        >>> from class_space_saliency import projection
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     scores = projection.SCORES
        >>> scores == projection.TOKEN_SCORES, caught[0].category.__name__
        (True, 'DeprecationWarning')
    """

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new = aliases[name]
            warnings.warn(
                f"{module}.{name} is deprecated; use {module}.{new}",
                DeprecationWarning,
                stacklevel=2,
            )
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
