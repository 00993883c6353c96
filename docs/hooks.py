"""MkDocs hook: the CLI reference page is generated from the CLI itself at every build.

``docs/cli.md`` holds a short introduction and a marker; the marker becomes the Markdown that
``typer ... utils docs`` writes for ``fastflow.apps.cli.app`` (every command, argument and option
with its help and default), so the reference cannot drift from ``fastflow COMMAND --help``.
typer's own command line cannot load this app (it executes the module without registering it,
and the CLI's dataclasses need their module registered), so this calls the same function it
uses, ``typer.cli.get_docs_for_click``, on the imported app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
import typer.cli
import typer.core
import typer.main

if TYPE_CHECKING:
    from mkdocs.structure.pages import Page

PAGE = "cli.md"
MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """The reference of every ``fastflow`` command, as ``typer utils docs`` renders it, without
    its top heading (the page has its own): the app's help and usage, its command list, then one
    ``## `fastflow COMMAND` `` section per command."""
    from fastflow.apps.cli import app

    command = typer.main.get_command(app)
    # As ``typer utils docs`` does: the app's markup mode decides how help text becomes HTML
    # (rich: HTML-escaped, so help naming OUTPUT/<folder> keeps its angle brackets).
    context = typer.Context(
        command, info_name="fastflow", obj={typer.core.MARKUP_MODE_KEY: app.rich_markup_mode}
    )
    text = typer.cli.get_docs_for_click(obj=command, ctx=context, name="fastflow")
    heading, body = text.split("\n\n", 1)
    assert heading.startswith("# "), heading
    return body.strip() + "\n"


def on_page_markdown(markdown: str, page: Page, **kwargs: Any) -> str:
    """Put the generated reference where ``docs/cli.md`` has the marker."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lacks the marker {MARKER} where the CLI reference goes")
    return markdown.replace(MARKER, cli_reference())
