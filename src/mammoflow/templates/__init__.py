"""The page templates (``*.html.j2``, ``*.md.j2`` beside this file) and their one renderer.

The templates hold the pages' text and layout; the Python that calls :func:`render` holds the
numbers, already formatted (so a page cannot change a number). HTML templates are autoescaped —
a dataset name or a label with ``<script>`` shows as text — and markdown ones are not. A field a
template names but the caller did not pass is an error (``StrictUndefined``), not a blank.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

HERE = Path(__file__).parent


def code_spans(text: str) -> Any:
    """``text`` escaped for HTML, its markdown `code` spans as ``<code>`` (a safe Markup)."""
    from markupsafe import Markup, escape

    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


@cache
def environment() -> jinja2.Environment:
    """The one template environment (built on first use; jinja2 is imported lazily)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), disabled_extensions=("md.j2",), default=True
        ),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["code"] = code_spans
    return env


def render(name: str, **context: Any) -> str:
    """Template ``name`` (e.g. ``card.md.j2``) filled with ``context``.

    Raises:
        jinja2.UndefinedError: the template names a field that ``context`` lacks.
    """
    return environment().get_template(name).render(**context)
