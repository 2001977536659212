"""Class names: look-up by name or synonym, class-name files, ImageNet names.

ImageNet descriptions list synonyms (``"tabby, tabby cat"``); :func:`class_index` matches the
whole description or any one synonym, case-insensitively, so ``"tabby"`` and
``"Tabby Cat"`` both give 281.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

MAX_CANDIDATES = 10
"""At most this many candidate names are listed in an error message."""


def _synonyms(name: str) -> list[str]:
    return [part.strip().lower() for part in name.split(",") if part.strip()]


def class_index(query: str | int, class_names: Sequence[str] | None) -> int:
    """Index of a class given by number, full name or one synonym (case-insensitive).

    Args:
        query: A class index (int or digits), a class name, or one comma-separated synonym
            of a name (``"tabby"`` for ``"tabby, tabby cat"``).
        class_names: The model's class names, or ``None`` where unknown (then only numbers
            are accepted).

    Returns:
        The class index.

    Raises:
        ValueError: For an unknown name, an ambiguous synonym (at most 10 candidates are
            listed), or a number outside ``class_names``.

    Example:
        >>> class_index("tabby", imagenet_class_names())
        281
    """
    known = len(class_names or ())
    if isinstance(query, bool) or not isinstance(query, (str, int)):
        raise TypeError(f"class must be a name or an int, got {query!r}")
    if isinstance(query, int) or query.strip().lstrip("-").isdigit():
        index = int(query)
        if known and not 0 <= index < known:
            raise ValueError(
                f"class index {index} is out of range for {known} classes (valid: 0 .. {known - 1})"
            )
        return index
    if class_names is None:
        raise ValueError(f"class {query!r} is a name, but the model's class names are unknown")
    wanted = query.strip().lower()
    exact = [i for i, name in enumerate(class_names) if name.strip().lower() == wanted]
    if len(exact) == 1:
        return exact[0]
    matches = exact or [i for i, name in enumerate(class_names) if wanted in _synonyms(name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(f"{i} ({class_names[i]!r})" for i in matches[:MAX_CANDIDATES])
        more = f" and {len(matches) - MAX_CANDIDATES} more" if len(matches) > MAX_CANDIDATES else ""
        raise ValueError(f"class name {query!r} is ambiguous: {listed}{more}; give the index")
    raise ValueError(f"unknown class name {query!r}{_suggestions(wanted, class_names)}")


def _suggestions(wanted: str, class_names: Sequence[str]) -> str:
    """A short hint for an unknown name: names containing it as a word, or close spellings."""
    if len(class_names) <= MAX_CANDIDATES:
        return f"; known: {list(class_names)}"
    words = [
        i for i, name in enumerate(class_names) if wanted in name.lower().replace(",", " ").split()
    ]
    if not words:
        vocabulary: dict[str, int] = {}
        for i, name in enumerate(class_names):
            for synonym in _synonyms(name):
                vocabulary.setdefault(synonym, i)
        close = difflib.get_close_matches(wanted, list(vocabulary), n=MAX_CANDIDATES, cutoff=0.75)
        words = list(dict.fromkeys(vocabulary[c] for c in close))
    if not words:
        return f" among the {len(class_names)} classes"
    listed = ", ".join(
        f"{i} ({class_names[i].split(',')[0].strip()})" for i in words[:MAX_CANDIDATES]
    )
    return f"; did you mean {listed}?"


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names from a text file, one per line (blank lines ignored).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it holds no names or a name twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file {path} does not exist")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise ValueError(f"class-names file {path} holds no names (expected one per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class-names file {path} repeats {duplicates[:MAX_CANDIDATES]}")
    return names


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k descriptions in class order, from timm (offline)."""
    import timm

    info = timm.data.ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids (``"n01440764"`` ...) in class order, from timm."""
    import timm

    info = timm.data.ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(1000))
