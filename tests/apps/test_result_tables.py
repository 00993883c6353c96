"""Result-table records: what the benchmarks write and ``docs/render.py`` renders.

The writers are tested on synthetic rows (the benchmarks themselves take minutes to hours): a
record written by ``table_record`` + ``write_table`` reads back with ``read_table`` and renders
into a page between markers as ``docs/render.py`` does; a malformed record is refused with one
line naming the problem; and every script in ``benchmarks/`` that prints a markdown table takes
``--table-json PATH`` and writes its table through these functions.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fastflow.apps.result_tables import (
    add_table_json_option,
    check_table,
    dumps_table,
    markdown_row,
    markdown_table,
    read_table,
    render_table,
    table_record,
    write_table,
)
from fastflow.core.errors import FastFlowError
from fastflow.core.hardware import cpu_model

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def render() -> ModuleType:
    return _load(ROOT / "docs" / "render.py", "fastflow_docs_render")


def _record(**changes):
    record = {
        "title": "t",
        "command": "python benchmarks/x.py",
        "machine": "cpu",
        "date": "2026-01-02",
        "version": "0.1.0",
        "columns": ["a", "b"],
        "rows": [["x", "1"]],
    }
    return {**record, **changes}


def test_a_written_record_reads_back_and_renders_into_a_page(tmp_path, render, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/memory.py", "--images", "1000", "3000", "--note", "a b"])
    rows = [["resnet18", 1000, 1.9512, None], ["resnet18", 3000, 1.95, "+0.0 %"]]
    record = table_record(
        "Peak RSS", ["backbone", "images", "peak RSS", "vs first"], rows, align=["", "right", "right", ""],
        formats=["", "", ".2f", ""], notes="synthetic",
    )  # fmt: skip
    assert record["command"] == "python benchmarks/memory.py --images 1000 3000 --note 'a b'"
    assert record["machine"].startswith(cpu_model())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"])
    assert record["version"].startswith(importlib.metadata.version("fastflow"))
    path = write_table(tmp_path / "results" / "memory.json", record)
    assert read_table(path) == record
    text = path.read_text()
    assert text.endswith("}\n") and '\n    ["resnet18", 1000, 1.9512, null],\n' in text  # one row a line
    assert list(json.loads(text)) == ["title", "command", "machine", "date", "version", "columns", "align",
                                      "formats", "rows", "notes"]  # fmt: skip
    table = (
        "| backbone | images | peak RSS | vs first |\n|---|---:|---:|---|\n"
        "| resnet18 | 1000 | 1.95 | |\n| resnet18 | 3000 | 1.95 | +0.0 % |"
    )
    assert render_table(record) == table
    page = "Before.\n\n<!-- results: memory -->\n<!-- /results -->\n\nAfter.\n"
    assert render.rendered_page(page, render.load_tables(path.parent), "page.md") == (
        f"Before.\n\n<!-- results: memory -->\n\n{table}\n\n<!-- /results -->\n\nAfter.\n"
    )


def test_markdown_rows_header_and_empty_cells():
    assert markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"
    assert markdown_row(["1", ""]) == "| 1 | |"
    assert markdown_table(["a"], [["**1.000** (1.000-1.000)"]], ["center"]).split("\n")[1:] == [
        "|:---:|",
        "| **1.000** (1.000-1.000) |",
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rows": [["x"]]}, "row 1 must be a list of 2 cells"),
        ({"rows": [["x", True]]}, "a string, a number or null"),
        ({"rows": [["x", "a\nb"]]}, "one line"),
        ({"rows": [["x", "a | b"]]}, "unescaped '|'"),
        ({"columns": []}, "'columns' must be"),
        ({"align": ["", "middle"]}, "'align' entries"),
        ({"formats": [".3f"]}, "'formats' must be a list of 2"),
        ({"machine": ""}, "'machine' must be a non-empty string"),
        ({"figures": []}, "unknown key"),
        ({"title": None}, "'title' must be"),
    ],
)
def test_malformed_records_are_refused_with_one_line(changes, message):
    with pytest.raises(FastFlowError, match=message) as raised:
        check_table(_record(**changes), "docs/results/x.json")
    assert str(raised.value).startswith("docs/results/x.json: ") and "\n" not in str(raised.value)


def test_missing_keys_and_bad_files_are_named(tmp_path):
    record = _record()
    del record["date"], record["version"]
    with pytest.raises(FastFlowError, match="missing date, version"):
        check_table(record)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FastFlowError, match="bad.json: not JSON"):
        read_table(tmp_path / "bad.json")
    with pytest.raises(FastFlowError, match="cannot read"):
        read_table(tmp_path / "absent.json")


def test_a_refused_record_leaves_the_earlier_file(tmp_path):
    path = write_table(tmp_path / "t.json", _record())
    before = path.read_text()
    with pytest.raises(FastFlowError):
        write_table(path, _record(rows=[["only one cell"]]))
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["t.json"]
    assert dumps_table(_record(rows=[])).count('"rows": []') == 1


# ------------------------------------------------------------------------------ benchmarks/*.py


def _scripts_with_tables() -> list[Path]:
    """The benchmark scripts that print a markdown table (a '|---' separator or markdown_table)."""
    return [
        path
        for path in sorted(BENCHMARKS.glob("*.py"))
        if "|---" in path.read_text() or "markdown_table(" in path.read_text()
    ]


def test_every_script_that_prints_a_table_can_write_its_json():
    scripts = _scripts_with_tables()
    assert {p.name for p in scripts} >= {
        "memory.py",
        "training.py",
        "serve.py",
        "inference.py",
        "robustness.py",
    }
    for path in scripts:
        tree = ast.parse(path.read_text())
        options = [
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ]
        called = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        # The option itself, or result_tables' one definition of it.
        assert "--table-json" in options or "add_table_json_option" in called, (
            f"{path.name} prints a table but has no --table-json"
        )
        assert {"table_record", "write_table"} <= called, (
            f"{path.name} does not write its table through result_tables"
        )
        assert "|---" not in path.read_text(), (
            f"{path.name} types a table separator instead of markdown_table"
        )


@pytest.fixture(scope="module")
def scripts() -> dict[str, ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return {
            name: _load(BENCHMARKS / f"{name}.py", f"bench_{name}") for name in ("inference", "robust_study")
        }
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_inference_speed_table_has_a_column_per_backbone(scripts):
    timings = {
        "resnet18": {"fastflow torch fp32": (17.44, 100.41), "anomalib torch fp32": (18.8, 105.2)},
        "tf_efficientnet_lite0": {"fastflow torch fp32": (25.1, 81.6)},
    }
    columns, rows = scripts["inference"].speed_table(timings)
    assert columns == ["configuration", "resnet18", "tf_efficientnet_lite0"]
    assert rows == [
        ["fastflow torch fp32", "17.4 / 100.4", "25.1 / 81.6"],
        ["anomalib torch fp32", "18.8 / 105.2", "-"],
    ]
    check_table(_record(columns=columns, rows=rows))
    auroc = scripts["inference"].auroc_rows(
        [
            ("torch f32", 1.0, 0.9877, np.array([0.1, 0.2]), 3.2),
            ("openvino bf16", 1.0, 0.9869, np.array([0.1, 0.25]), 9.7),
        ]
    )
    assert auroc[1] == ["openvino bf16", "1.0000 (+0.0000)", "0.9869 (-0.0008)", "0.05", "10"]
    check_table(_record(columns=scripts["inference"].AUROC_COLUMNS, rows=auroc))


def test_robust_study_table_of_synthetic_results(scripts):
    result = {
        "data": "bottle", "seed": 0, "candidate": "default", "input_size": [256, 256], "image_auroc": 0.8984,
        "pixel_auroc": 0.9691, "aupro": 0.6234, "worst_image_drop": 0.0141, "worst_pixel_drop": 0.0006,
        "noise1_drift": float("nan"), "best_epoch": 40, "epochs": 40, "fit_seconds": 612.4,
    }  # fmt: skip
    rows = scripts["robust_study"].study_table([result])
    assert rows == [
        [
            "bottle",
            "0",
            "default",
            "256x256",
            "0.898",
            "0.969",
            "0.623",
            "0.014 / 0.001",
            "-",
            "40 of 40",
            "612",
        ]
    ]
    check_table(_record(columns=scripts["robust_study"].STUDY_COLUMNS, rows=rows))


def test_robustness_table_keeps_its_layout():
    from fastflow.apps.robustness import markdown_table as robustness_table

    row = {
        "perturbation": "noise1", "image_auroc": 0.97, "delta_image_auroc": -0.004, "pixel_auroc": 0.991,
        "delta_pixel_auroc": -0.001, "normal_drift": 0.019, "seconds": 12.4,
    }  # fmt: skip
    assert robustness_table([row]) == (
        "| perturbation | image AUROC | delta | pixel AUROC | delta | median normal drift | seconds |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| noise1 | 0.9700 | -0.0040 | 0.9910 | -0.0010 | +0.0190 | 12 |"
    )


def test_the_shared_table_json_option_parses_a_path() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_table_json_option(parser, "a summary")
    assert parser.parse_args(["--table-json", "docs/results/x.json"]).table_json == Path(
        "docs/results/x.json"
    )
    assert parser.parse_args([]).table_json is None
    assert "also write a summary as a results-table JSON" in parser.format_help().replace("\n", " ").replace(
        "  ", " "
    )
