"""The documentation site's generated references cover what they document.

The CLI reference page is generated from the CLI by ``docs/hooks.py`` at build time; these tests
run that generator without MkDocs or a network, so a command or option that reaches the CLI
without help text, or a page that loses its marker, fails here rather than on the site. The API
reference page names the objects mkdocstrings renders; a name ``fastflow`` exports but the page
leaves out fails too. CI's ``mkdocs build --strict`` checks links and that every name resolves.
"""

from __future__ import annotations

import html
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import typer.main

import fastflow
from fastflow.apps.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastflow_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(hooks: ModuleType) -> str:
    return str(hooks.cli_reference())


def _sections(reference: str) -> dict[str, str]:
    """Command name -> its section of the generated reference."""
    parts = re.split(r"^## `fastflow (\S+)`$", reference, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_has_a_section_for_every_command(reference: str) -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert len(commands) >= 9
    assert set(_sections(reference)) == set(commands)


def _entries(section: str) -> dict[str, str]:
    """Every flag and argument name of a section's "* `-o, --output <path>`: help  [default: x]"
    lines -> its help, without the [default: ...], [required] or [env var: ...] typer appends."""
    entries: dict[str, str] = {}
    for line in section.splitlines():
        match = re.match(r"\* `([^`]*)`(?:: (.*))?$", line)
        if match:
            help_text = re.sub(r"(\s*\[(default|required|env var)[^\]]*\])+$", "", match.group(2) or "")
            for token in re.split(r"[\s,/]+|\.\.\.", match.group(1)):
                entries[token] = help_text.strip()
    return entries


def test_every_command_argument_and_option_has_its_help_in_the_reference(reference: str) -> None:
    sections = _sections(reference)
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        # The reference holds help text HTML-escaped (typer renders it through rich).
        assert command.help and html.escape(command.help.splitlines()[0]) in sections[name], (
            f"fastflow {name} has no help text"
        )
        entries = _entries(sections[name])
        for param in command.params:
            for label in (
                param.opts + param.secondary_opts if param.param_type_name == "option" else [param.name]
            ):
                assert label in entries, f"fastflow {name}: {label} is missing from the reference"
                assert entries[label], f"fastflow {name}: {label} has no help text"


def test_hook_puts_the_reference_into_the_cli_page_only(hooks: ModuleType, reference: str) -> None:
    page_text = (DOCS / "cli.md").read_text()
    assert hooks.MARKER in page_text
    filled = hooks.on_page_markdown(page_text, page=SimpleNamespace(file=SimpleNamespace(src_uri="cli.md")))
    assert hooks.MARKER not in filled
    assert reference in filled
    assert filled.startswith("# CLI reference")
    other = "# Other\n\n" + hooks.MARKER
    assert (
        hooks.on_page_markdown(other, page=SimpleNamespace(file=SimpleNamespace(src_uri="data.md"))) == other
    )


def test_hook_refuses_a_cli_page_without_its_marker(hooks: ModuleType) -> None:
    with pytest.raises(ValueError, match="marker"):
        hooks.on_page_markdown(
            "# CLI reference\n", page=SimpleNamespace(file=SimpleNamespace(src_uri="cli.md"))
        )


def test_api_reference_renders_every_exported_name() -> None:
    page = (DOCS / "api.md").read_text()
    rendered = set(re.findall(r"^::: fastflow\.(\w+)$", page, flags=re.MULTILINE))
    missing = sorted({*fastflow.__all__, "load"} - rendered)
    assert not missing, f"docs/api.md does not render {missing}"
