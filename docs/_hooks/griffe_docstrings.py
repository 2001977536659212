"""Griffe extension of the docs build: the package's docstrings as mkdocstrings renders them.

The docstrings are Google style with Sphinx cross-reference roles (``:class:`~x.Y```) and
``Example:`` sections, which read well in code and in ``help()``; here roles become inline code
(``~`` keeps the last name, as Sphinx shows it) and ``Example:`` the ``Examples:`` section that
griffe parses into code blocks.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|exc|obj):`(~?)([^`]+)`")
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _role(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.split('.')[-1] if short else target.lstrip('.')}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite Sphinx roles as inline code and ``Example:`` as ``Examples:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: object) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(_role, obj.docstring.value)
            obj.docstring.value = EXAMPLE.sub(r"\1Examples:", text)
