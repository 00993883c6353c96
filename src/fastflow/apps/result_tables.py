"""Result tables as data: one JSON record per table, rendered to one markdown pipe table.

A record holds a table's figures with where they came from, so a page never needs a figure typed
by hand: the documentation's measurement tables are ``docs/results/NAME.json``, which
``docs/render.py`` renders into the pages between ``<!-- results: NAME -->`` and
``<!-- /results -->``; ``fastflow benchmark --table-json`` and the scripts in ``benchmarks/``
(``--table-json PATH``) write records of the same shape for a re-measured table.

A record is a JSON object with these keys (``check_table`` refuses anything else):

- ``title``: what the table shows (not rendered; the page's prose introduces the table).
- ``command``: the command that produced the figures, ``machine``: the CPU they were measured on,
  ``date``: when (ISO ``YYYY-MM-DD``), ``version``: the fastflow version or commit; each a string,
  ``"not recorded"`` where unknown.
- ``columns``: the header cells; ``rows``: lists of cells, one per column. A cell is a string,
  rendered as it is (markdown such as ``**bold**`` or a formatted ``0.990 (0.989-0.991)``), a
  number, rendered with the column's entry of ``formats`` (a Python format spec, ``""`` by
  default), or ``null``, an empty cell.
- optional ``align`` (per column: ``""``, ``"left"``, ``"right"`` or ``"center"``),
  ``formats`` (per column) and ``notes`` (a string: conditions the columns do not say).

The rendering is deterministic: ``| a | b |`` rows, one space either side of a cell (an empty
cell is ``| |``), and a ``|---|---:|`` separator line.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastflow.core.errors import FastFlowError
from fastflow.core.files import atomic_write

__all__ = [
    "ALIGNMENTS",
    "FIELDS",
    "add_table_json_option",
    "check_table",
    "dumps_table",
    "fastflow_version",
    "markdown_row",
    "markdown_table",
    "read_table",
    "render_table",
    "script_command",
    "table_record",
    "today",
    "write_table",
]

# Every key a record may hold, in the order written; the first seven are required.
FIELDS = ("title", "command", "machine", "date", "version", "columns", "align", "formats", "rows", "notes")
_REQUIRED = ("title", "command", "machine", "date", "version", "columns", "rows")
_TEXT = ("title", "command", "machine", "date", "version", "notes")
# A column's alignment -> its cell in the separator line.
ALIGNMENTS = {"": "---", "left": ":---", "right": "---:", "center": ":---:"}

Cell = str | int | float | None


def _cell_text(cell: Cell, spec: str) -> str:
    if cell is None:
        return ""
    if isinstance(cell, str):
        return cell
    return format(cell, spec)


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a markdown pipe table (a script that prints rows as they are measured prints
    ``markdown_table(columns, [])`` first: the header and separator lines)."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def markdown_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    align: Sequence[str] | None = None,
    formats: Sequence[str] | None = None,
) -> str:
    """A markdown pipe table (no trailing newline) of ``columns`` and ``rows``."""
    align = align or [""] * len(columns)
    formats = formats or [""] * len(columns)
    lines = [markdown_row(columns), "|" + "|".join(ALIGNMENTS[a] for a in align) + "|"]
    lines += [markdown_row([_cell_text(c, f) for c, f in zip(row, formats, strict=True)]) for row in rows]
    return "\n".join(lines)


def render_table(record: dict[str, Any], indent: str = "") -> str:
    """A checked record's table in markdown, each line prefixed by ``indent`` (a table inside a
    list item); no trailing newline."""
    text = markdown_table(record["columns"], record["rows"], record.get("align"), record.get("formats"))
    return "\n".join(indent + line for line in text.split("\n"))


def check_table(record: object, source: str = "table") -> dict[str, Any]:
    """``record`` if it is a well-formed table record; else a one-line ``FastFlowError`` that
    names ``source`` (a file, usually) and what is wrong."""

    def fail(problem: str) -> FastFlowError:
        return FastFlowError(f"{source}: {problem}")

    if not isinstance(record, dict):
        raise fail(f"a table record is a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise fail(f"missing {', '.join(missing)} (a table record needs {', '.join(_REQUIRED)})")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(FIELDS)})")
    for key in _TEXT:
        if key in record and not (isinstance(record[key], str) and record[key].strip()):
            raise fail(f"'{key}' must be a non-empty string (write \"not recorded\" where unknown)")
    columns = record["columns"]
    if not (isinstance(columns, list) and columns and all(isinstance(c, str) and c for c in columns)):
        raise fail("'columns' must be a non-empty list of non-empty strings")
    width = len(columns)
    for key, valid in (("align", ALIGNMENTS), ("formats", None)):
        value = record.get(key)
        if value is None:
            continue
        if not (isinstance(value, list) and len(value) == width and all(isinstance(v, str) for v in value)):
            raise fail(f"'{key}' must be a list of {width} strings, one per column")
        if valid is not None and any(v not in valid for v in value):
            raise fail(f"'{key}' entries must be one of {', '.join(map(repr, valid))}, got {value}")
    rows = record["rows"]
    if not isinstance(rows, list):
        raise fail("'rows' must be a list of rows")
    formats = record.get("formats") or [""] * width
    for number, row in enumerate(rows, 1):
        if not (isinstance(row, list) and len(row) == width):
            raise fail(f"row {number} must be a list of {width} cells, one per column, got {row!r}")
        for cell, spec in zip(row, formats):
            if isinstance(cell, bool) or not isinstance(cell, (str, int, float, type(None))):
                raise fail(f"row {number}: a cell is a string, a number or null, got {cell!r}")
            text = _cell_text(cell, spec) if not isinstance(cell, str) else cell
            if "\n" in text or text != text.strip() or "|" in text.replace("\\|", ""):
                raise fail(
                    f"row {number}: cell {text!r} must be one line without surrounding spaces or an "
                    "unescaped '|'"
                )
    return record


def dumps_table(record: dict[str, Any]) -> str:
    """The record as JSON text: keys in ``FIELDS`` order, one row per line (readable diffs)."""
    lines = []
    for key in (key for key in FIELDS if key in record):
        value = record[key]
        if key == "rows":
            body = ",\n".join("    " + json.dumps(row, ensure_ascii=False) for row in value)
            lines.append(f'  "rows": [\n{body}\n  ]' if value else '  "rows": []')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_table(path: Path, record: dict[str, Any]) -> Path:
    """Check ``record`` and write it to ``path`` atomically (a failure leaves any earlier file)."""
    text = dumps_table(check_table(record, str(path)))
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_table(path: Path) -> dict[str, Any]:
    """The checked record in ``path``; a one-line ``FastFlowError`` naming it where it is not one."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise FastFlowError(f"{path}: cannot read it ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise FastFlowError(f"{path}: not JSON ({error})") from None
    return check_table(record, str(path))


def today() -> str:
    """Today's date (UTC), ISO ``YYYY-MM-DD``."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def script_command() -> str:
    """This Python process's command line, as ``python SCRIPT ARGS`` (quoted for a shell)."""
    return shlex.join(["python", *sys.argv])


def fastflow_version() -> str:
    """fastflow's version, and the git commit of its source tree where it is a checkout
    (``0.1.0 (git 1a2b3c4)``; ``+ uncommitted changes`` where tracked files differ from it)."""
    try:
        version = importlib.metadata.version("fastflow")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (git {commit}{', uncommitted changes' if dirty else ''})"


def table_record(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    command: str | None = None,
    machine: str | None = None,
    date: str | None = None,
    version: str | None = None,
    align: Sequence[str] | None = None,
    formats: Sequence[str] | None = None,
    notes: str | None = None,
) -> dict[str, Any]:
    """A checked record of a table measured now: ``command`` defaults to this process's command
    line (``script_command``), ``machine`` to this CPU (``fastflow.core.hardware.cpu_model`` and
    its physical cores), ``date`` to today and ``version`` to ``fastflow_version()``."""
    from fastflow.core.hardware import cpu_model, physical_cores

    record: dict[str, Any] = {
        "title": title,
        "command": command or script_command(),
        "machine": machine or f"{cpu_model()} ({physical_cores()} physical cores)",
        "date": date or today(),
        "version": version or fastflow_version(),
        "columns": list(columns),
        "rows": [list(row) for row in rows],
    }
    if align is not None:
        record["align"] = list(align)
    if formats is not None:
        record["formats"] = list(formats)
    if notes:
        record["notes"] = notes
    return check_table(record, title)


def add_table_json_option(parser: argparse.ArgumentParser, what: str = "the table") -> None:
    """``--table-json PATH``, the option every script in ``benchmarks/`` offers for writing its
    table as a record (``write_table``), with one help text for all of them."""
    parser.add_argument(
        "--table-json",
        type=Path,
        help=f"also write {what} as a results-table JSON (fastflow.apps.result_tables: with the command, "
        "CPU, date and version), e.g. docs/results/NAME.json, which python docs/render.py renders into the docs",
    )
