"""Render the measurement tables of the documentation pages and the README from their data.

    python docs/render.py          # rewrite every marked table from docs/results/NAME.json
    python docs/render.py --check  # change nothing; exit 1 naming each page and table that differs

A measurement table sits between two HTML comments, invisible on the site and on GitHub:

    <!-- results: NAME -->

    | the table, rendered from docs/results/NAME.json |

    <!-- /results -->

The opening marker's indentation is the table's (a table inside a list item). Everything between
the markers is this script's: edit the JSON (``fastflow.apps.result_tables`` describes a record,
and ``fastflow benchmark --table-json`` and ``benchmarks/*.py --table-json`` write one), then
run it. Pages are rewritten atomically (a temporary file renamed into place). Besides a table that
differs, ``--check`` reports a marker without its JSON, a JSON no marker uses, and markers that
do not pair up; ``tests/test_docs_tables.py`` runs the same check. It imports ``fastflow`` (the
records' reader and renderer), so run it where the package is installed, as for the site.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastflow.apps.result_tables import read_table, render_table
from fastflow.core.errors import FastFlowError
from fastflow.core.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
OPEN = re.compile(r"^(?P<indent>[ \t]*)<!-- results: (?P<name>[A-Za-z0-9_.-]+) -->[ \t]*$")
CLOSE = re.compile(r"^[ \t]*<!-- /results -->[ \t]*$")
# A line that starts like a marker but is not spelled as one is an error, not silently ignored
# (prose may name the markers inside backticks).
LOOSE = re.compile(r"^\s*<!--\s*/?\s*results\b")


@dataclass(frozen=True)
class Block:
    """One marked table: its JSON's stem, the opening marker's indentation, and the line indices
    of its two markers (0-based)."""

    name: str
    indent: str
    start: int
    end: int


def pages(root: Path = ROOT) -> list[Path]:
    """The files whose tables are rendered: every documentation page and the README."""
    return sorted((root / "docs").glob("*.md")) + [root / "README.md"]


def results_folder(root: Path = ROOT) -> Path:
    return root / "docs" / "results"


def blocks(text: str, source: str) -> list[Block]:
    """The marked tables of a page; a one-line ``FastFlowError`` (``source:LINE: ...``) where the
    markers do not pair up or one is misspelt."""
    found: list[Block] = []
    opened: tuple[str, str, int] | None = None
    for index, line in enumerate(text.split("\n")):
        opening, closing = OPEN.match(line), CLOSE.match(line)
        where = f"{source}:{index + 1}"
        if opening:
            if opened:
                raise FastFlowError(f"{where}: a results marker opens before line {opened[2] + 1}'s closes")
            opened = (opening["name"], opening["indent"], index)
        elif closing:
            if not opened:
                raise FastFlowError(f"{where}: <!-- /results --> closes no <!-- results: NAME -->")
            found.append(Block(opened[0], opened[1], opened[2], index))
            opened = None
        elif LOOSE.search(line):
            raise FastFlowError(
                f"{where}: a results marker is '<!-- results: NAME -->' or '<!-- /results -->' alone on "
                f"its line, got {line.strip()!r}"
            )
    if opened:
        raise FastFlowError(f"{source}:{opened[2] + 1}: <!-- results: {opened[0]} --> is never closed")
    return found


def rendered_page(text: str, tables: dict[str, dict[str, Any]], source: str) -> str:
    """``text`` with every marked table rendered from ``tables`` (name -> record); a one-line
    ``FastFlowError`` for a marker whose table is missing."""
    lines = text.split("\n")
    out: list[str] = []
    position = 0
    for block in blocks(text, source):
        if block.name not in tables:
            raise FastFlowError(
                f"{source}:{block.start + 1}: no docs/results/{block.name}.json for <!-- results: {block.name} -->"
            )
        out += lines[position : block.start + 1]
        out += ["", *render_table(tables[block.name], block.indent).split("\n"), ""]
        position = block.end
    out += lines[position:]
    return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def load_tables(folder: Path) -> dict[str, dict[str, Any]]:
    """Every ``NAME.json`` in ``folder``, checked, by NAME."""
    return {path.stem: read_table(path) for path in sorted(folder.glob("*.json"))}


def render_all(root: Path = ROOT, write: bool = True) -> list[str]:
    """Render every page's tables (writing the pages that change, where ``write``); the problems
    found, one line each: a table that differs (``write=False``), a bad or missing JSON, a JSON
    no marker uses, markers that do not pair up."""
    problems: list[str] = []
    try:
        tables = load_tables(results_folder(root))
    except FastFlowError as error:
        return [str(error)]
    used: set[str] = set()
    for page in pages(root):
        if not page.exists():
            continue
        source = str(page.relative_to(root))
        text = page.read_text(encoding="utf-8")
        try:
            found = blocks(text, source)
            used.update(block.name for block in found)
            new = rendered_page(text, tables, source)
        except FastFlowError as error:
            problems.append(str(error))
            continue
        if new == text:
            continue
        if write:
            atomic_write(page, functools.partial(_write_text, text=new))
            print(f"rendered {source}")
            continue
        old_blocks, new_blocks = blocks(text, source), blocks(new, source)
        lines, new_lines = text.split("\n"), new.split("\n")
        for old, fresh in zip(old_blocks, new_blocks, strict=True):
            if lines[old.start : old.end] != new_lines[fresh.start : fresh.end]:
                problems.append(
                    f"{source}:{old.start + 1}: table '{old.name}' differs from "
                    f"docs/results/{old.name}.json (run python docs/render.py)"
                )
    problems += [
        f"docs/results/{name}.json: no page has <!-- results: {name} -->"
        for name in sorted(set(tables) - used)
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table differs")
    args = parser.parse_args(argv)
    problems = render_all(ROOT, write=not args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
