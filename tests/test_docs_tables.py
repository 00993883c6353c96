"""The measurement tables of the documentation and the README are rendered from their data.

Every table between ``<!-- results: NAME -->`` and ``<!-- /results -->`` must be exactly what
``docs/render.py`` makes of ``docs/results/NAME.json``: a figure changed in the JSON without
re-rendering, or typed into a page by hand, fails here. Every JSON must be used by a marker and
every marker must have its JSON. The check itself is shown to fail on a copy of the pages with
a changed figure, a hand-edited table, a missing or unused JSON and broken markers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from fastflow.apps.result_tables import read_table, render_table
from fastflow.core.errors import FastFlowError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


@pytest.fixture(scope="module")
def render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastflow_docs_render", ROOT / "docs" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The pages, the README and the tables' JSON, copied into a root of their own."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.py", "*.png", "*.jpg"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path


def _markers(render: ModuleType, root: Path) -> dict[str, list[str]]:
    """Page (relative path) -> the table names its markers name."""
    return {
        str(page.relative_to(root)): [block.name for block in render.blocks(page.read_text(), page.name)]
        for page in render.pages(root)
    }


def test_every_marked_table_is_its_json_rendered(render: ModuleType) -> None:
    tables = render.load_tables(RESULTS)
    for page in render.pages(ROOT):
        text = page.read_text(encoding="utf-8")
        assert render.rendered_page(text, tables, page.name) == text, (
            f"{page.relative_to(ROOT)}: a marked table differs from its docs/results JSON; "
            "run python docs/render.py (or edit the JSON, not the page)"
        )


def test_every_json_has_a_marker_and_every_marker_its_json(render: ModuleType) -> None:
    names = [name for found in _markers(render, ROOT).values() for name in found]
    stems = {path.stem for path in RESULTS.glob("*.json")}
    assert len(names) == len(set(names)), f"a table is marked twice: {sorted(names)}"
    assert set(names) - stems == set(), "markers without their docs/results JSON"
    assert stems - set(names) == set(), "docs/results JSON files that no page uses"
    assert render.render_all(ROOT, write=False) == []


def test_the_measurement_pages_and_the_readme_have_their_tables(render: ModuleType) -> None:
    markers = _markers(render, ROOT)
    for page in ("README.md", "docs/results.md", "docs/training-at-scale.md"):
        assert markers[page], f"{page} has no marked table"
    for page in ("docs/inference-and-export.md", "docs/serving.md"):
        assert markers[page], f"{page} has no marked table"


def test_every_json_is_a_complete_record() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        record = read_table(path)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]), f"{path.name}: date {record['date']}"
        assert record["rows"], f"{path.name} has no rows"


def test_check_names_the_page_and_table_whose_figure_changed(render: ModuleType, copy: Path) -> None:
    assert render.render_all(copy, write=False) == []
    path = copy / "docs" / "results" / "readme-headline.json"
    record = json.loads(path.read_text())
    assert record["rows"][1][2] == "1.000"
    row = f"| {record['rows'][1][0]} | {record['rows'][1][1]} |"
    record["rows"][1][2] = "0.999"
    path.write_text(json.dumps(record))
    problems = render.render_all(copy, write=False)
    assert len(problems) == 1 and "README.md" in problems[0] and "'readme-headline'" in problems[0], problems
    assert f"{row} 1.000 |" in (copy / "README.md").read_text()  # --check wrote nothing
    # Rendering rewrites the table, and nothing else, from the JSON.
    before = (copy / "README.md").read_text()
    assert render.render_all(copy, write=True) == []
    after = (copy / "README.md").read_text()
    assert after == before.replace(f"{row} 1.000 |", f"{row} 0.999 |")
    assert render.render_all(copy, write=False) == []
    assert not list(copy.glob(".*.tmp")), "a temporary file was left beside the page"


def test_check_notices_a_table_edited_by_hand(render: ModuleType, copy: Path) -> None:
    page = copy / "docs" / "serving.md"
    text = page.read_text()
    assert "| 1 | 17.96 | 53 |" in text
    page.write_text(text.replace("| 1 | 17.96 | 53 |", "| 1 | 18.96 | 53 |"))
    problems = render.render_all(copy, write=False)
    assert problems == [problems[0]] and problems[0].startswith("docs/serving.md:"), problems
    assert "'serve-load-idle'" in problems[0]
    assert render.render_all(copy, write=True) == []
    assert page.read_text() == text


def test_check_notices_a_missing_and_an_unused_json(render: ModuleType, copy: Path) -> None:
    (copy / "docs" / "results" / "tiling-seams.json").rename(copy / "docs" / "results" / "tiling-seam.json")
    problems = render.render_all(copy, write=False)
    assert any("docs/training-at-scale.md" in p and "tiling-seams.json" in p for p in problems), problems
    assert any(p.startswith("docs/results/tiling-seam.json") for p in problems), problems


def test_main_exits_1_and_names_the_table(
    render: ModuleType, copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(render, "ROOT", copy)
    assert render.main(["--check"]) == 0
    path = copy / "docs" / "results" / "context-cost.json"
    path.write_text(path.read_text().replace("1.04x / 1.15x", "1.05x / 1.15x"))
    assert render.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/results.md" in err and "'context-cost'" in err, err
    assert render.main([]) == 0
    assert "| pool 3x3 | 1.05x / 1.15x |" in (copy / "docs" / "results.md").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- results: a -->\n\n| x |\n", "never closed"),
        ("<!-- /results -->\n", "closes no"),
        ("<!-- results: a -->\n<!-- results: b -->\n<!-- /results -->\n", "opens before"),
        ("<!--results: a -->\n<!-- /results -->\n", "alone on its line"),
        ("<!-- results: a -->\n<!-- /results -->\n", "no docs/results/a.json"),
    ],
)
def test_broken_markers_are_one_line_errors_naming_the_line(
    render: ModuleType, text: str, message: str
) -> None:
    with pytest.raises(FastFlowError, match=message) as raised:
        render.rendered_page(text, {}, "page.md")
    assert str(raised.value).startswith("page.md:")


def test_a_table_inside_a_list_item_keeps_its_indentation(render: ModuleType) -> None:
    record = {"columns": ["a", "b"], "rows": [["1", None]], "align": ["", "right"]}
    text = "- item:\n\n  <!-- results: t -->\n  stale\n  <!-- /results -->\n\nafter\n"
    assert render.rendered_page(text, {"t": record}, "page.md") == (
        "- item:\n\n  <!-- results: t -->\n\n  | a | b |\n  |---|---:|\n  | 1 | |\n\n  <!-- /results -->\n\nafter\n"
    )
    assert render_table(record, "  ").startswith("  | a | b |")


def test_readme_headline_is_the_results_tables_means() -> None:
    """The README's figures are the means of the reference and default rows of the results page."""
    results = read_table(RESULTS / "bottle-textures-recipes.json")
    headline = read_table(RESULTS / "readme-headline.json")

    def mean(cell: str) -> str:
        return cell.replace("**", "").split(" ")[0]

    rows = {(row[0], row[1].replace("**", "")): row for row in results["rows"]}
    for dataset, recipe, *figures in headline["rows"]:
        source = rows[
            dataset, "reference" if recipe.startswith("reference") else "improved (default: + JPEG copies)"
        ]
        assert figures == [mean(cell) for cell in source[2:5]], (dataset, recipe)


def test_result_json_is_no_site_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    excluded = config["exclude_docs"].split()
    assert "results/" in excluded and "render.py" in excluded
