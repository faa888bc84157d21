"""
A Griffe extension for the API reference: Sphinx roles in docstrings become Markdown.

The docstrings follow Airflow's style (``:param x:`` fields, ``:class:`~pkg.Name``` roles), which
mkdocstrings parses as Sphinx-style fields but renders as Markdown. This turns a role naming an
object of this package into a cross-reference (``[Name][pkg.Name]``) and any other role into
inline code, so no raw role reaches the page.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

PACKAGE = "airflow_provider_blip2"

#: ``:class:`~a.b.C```, ``:meth:`x```, ``:data:`X``` ... (Sphinx's Python roles).
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|data|attr|exc|obj|const):`(?P<target>[^`]+)`")


def markdown_role(match: re.Match[str]) -> str:
    """
    The Markdown of one role.

    :param match: A match of :data:`ROLE`.
    """
    target = match.group("target").strip()
    short = target.startswith("~")
    path = target.lstrip("~").removesuffix("()")
    text = path.rsplit(".", 1)[-1] if short else path.lstrip(".")
    if path.startswith(f"{PACKAGE}."):
        return f"[`{text}`][{path}]"
    return f"`{text}`"


def rewrite_roles(text: str) -> str:
    """
    Replace every Sphinx role of ``text`` by its Markdown.

    :param text: A docstring.
    """
    return ROLE.sub(markdown_role, text)


class SphinxRoles(Extension):
    """Rewrite the Sphinx roles of every docstring once the object tree is complete."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        """
        Rewrite one object's docstring.

        :param obj: The object.
        :param kwargs: Further event arguments.
        """
        if obj.docstring is not None:
            obj.docstring.value = rewrite_roles(obj.docstring.value)
