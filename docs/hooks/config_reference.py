"""MkDocs hook: the configuration reference, generated from the Config fields.

``docs/configuration.md`` holds the marker :data:`MARKER` on a line of its own;
this hook replaces it with the Markdown that
``smtp_tracker.cli.flags.reference_markdown()`` makes from each Config field and
its metadata (key, flag, default, help): the same text ``--help`` prints, so
the page cannot drift from the code.

The build fails (``mkdocs build`` exits non-zero with one line naming the
cause) when the function cannot be imported, when it raises, or when the page
has lost its marker.
"""

from __future__ import annotations

from typing import Any

from mkdocs.exceptions import PluginError

#: The line in docs/configuration.md that the reference replaces.
MARKER = "<!-- config-reference -->"

#: The page (relative to docs/) that carries the marker.
PAGE = "configuration.md"


def _reference() -> str:
    try:
        from smtp_tracker.cli.flags import reference_markdown
    except ImportError as exc:
        raise PluginError(
            "docs/hooks/config_reference.py: cannot import "
            "smtp_tracker.cli.flags.reference_markdown, which writes the configuration "
            f"reference ({exc}); is the project installed in this environment "
            "(pip install -e '.[test]') and up to date?"
        ) from exc
    try:
        text = reference_markdown()
    except Exception as exc:
        raise PluginError(
            "docs/hooks/config_reference.py: smtp_tracker.cli.flags.reference_markdown() "
            f"raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(text, str) or not text.strip():
        raise PluginError(
            "docs/hooks/config_reference.py: smtp_tracker.cli.flags.reference_markdown() "
            "returned no Markdown"
        )
    return text


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    """Replace :data:`MARKER` in the configuration page with the reference.

    :param markdown: the page's Markdown source.
    :param page: the MkDocs page (``page.file.src_uri`` is relative to docs/).
    :returns: *markdown*, with the reference in place of the marker on
        configuration.md; any other page unchanged.
    :raises PluginError: the marker is missing from configuration.md, or the
        reference cannot be made (see :func:`_reference`).
    """
    if page.file.src_uri != PAGE:
        return markdown
    if markdown.count(MARKER) != 1:
        raise PluginError(
            f"docs/hooks/config_reference.py: docs/{PAGE} must hold the line {MARKER} "
            f"exactly once (found {markdown.count(MARKER)})"
        )
    return markdown.replace(MARKER, _demoted(_reference()))


def _demoted(text: str) -> str:
    """*text* with each heading one level down, so its sections sit under the
    page's "Reference" heading (``## Keys`` becomes ``### Keys``); code fences
    are left alone."""
    lines = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines) + "\n"
