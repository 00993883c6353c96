"""``fastflow test RUN DATA --report DIR``: the HTML page, its figures and links, the per-defect
table, and that a failure leaves no half-written report.

One small Lite0 model is trained per module on generated textures (three defect types) and one
report is written through the CLI; the other tests reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from fastflow import FastFlow
from fastflow.apps.cli import main
from fastflow.apps.report import defect_rows, write_report
from fastflow.apps.synthetic import DEFECTS, make_textures
from fastflow.estimator.evaluation import EvaluationReport, evaluate_detector

pytestmark = pytest.mark.usefixtures("one_thread")

N_GOOD, N_PER_DEFECT = 4, 2
FIGURES = ("roc.png", "pro.png", "scores.png", "training.png")


class Page(HTMLParser):
    """Every ``src``/``href`` value, the whole text, and each table as rows of cell texts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self.in_cell = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag: str) -> None:
        self.in_cell = self.in_cell and tag not in ("td", "th")

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.in_cell:
            self.tables[-1][-1][-1] += data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report") / "textures"
    return make_textures(root, n_train=16, n_test_good=N_GOOD, n_test_defect=N_PER_DEFECT, size=(128, 128))


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = (
        Path(__file__).resolve().parents[2].parent
        / "shared"
        / "weights"
        / "tf_efficientnet_lite0.safetensors"
    )
    if not weights.exists():
        pytest.skip(f"shared weights not found at {weights}")
    folder = tmp_path_factory.mktemp("report") / "run"
    code = main(
        [
            "train",
            str(data),
            "--output",
            str(folder),
            "--backbone",
            "tf_efficientnet_lite0",
            "--weights",
            str(weights),
            "--input-size",
            "64x96",
            "--epochs",
            "3",
            "--batch-size",
            "8",
        ]
    )
    assert code == 0
    return folder


@pytest.fixture(scope="module")
def report(run: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The report folder written by the CLI, and the ``--json`` output of the same call."""
    folder = tmp_path_factory.mktemp("report") / "html"
    scores = folder.parent / "scores.json"
    assert main(["test", str(run), str(data), "--report", str(folder), "--json", str(scores)]) == 0
    return folder, json.loads(scores.read_text())


@pytest.fixture(scope="module")
def evaluation(run: Path, data: Path) -> EvaluationReport:
    return evaluate_detector(FastFlow.load(run), data, keep_pro_curve=True)


def page(folder: Path) -> Page:
    return Page((folder / "index.html").read_text(encoding="utf-8"))


def test_cli_writes_the_page_and_every_figure(report: tuple[Path, dict]) -> None:
    folder, _ = report
    assert (folder / "index.html").is_file()
    for name in FIGURES:
        with Image.open(folder / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 100, name
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_every_link_is_a_file_in_the_report_folder(report: tuple[Path, dict]) -> None:
    folder, _ = report
    links = page(folder).links
    assert set(FIGURES) <= set(links)
    for link in links:
        assert "/" not in link and ":" not in link, link
        assert (folder / link).is_file(), link


def test_defect_table_has_one_row_per_type_with_counts(report: tuple[Path, dict]) -> None:
    folder, result = report
    table = next(t for t in page(folder).tables if t[0][0] == "defect type")
    rows = {row[0]: row for row in table[1:]}
    assert set(rows) == {*DEFECTS, "good (normal)"}
    for name in DEFECTS:
        images = [row for row in result["images"] if row["defect"] == name]
        assert rows[name][1:3] == [str(N_PER_DEFECT), str(sum(row["predicted"] for row in images))]
        assert 0.0 <= float(rows[name][4]) <= 1.0
    false_alarms = sum(row["predicted"] for row in result["images"] if row["label"] == 0)
    assert rows["good (normal)"][1:3] == [str(N_GOOD), str(false_alarms)]


def test_page_shows_threshold_metrics_and_worst_mistakes(run: Path, report: tuple[Path, dict]) -> None:
    folder, result = report
    parsed = page(folder)
    text = "".join(parsed.text)
    assert f"{FastFlow.load(run).threshold_:.6g}" in text
    metrics = next(t for t in parsed.tables if t[0] == ["metric", "value"])
    assert [row[0] for row in metrics[1:]] == [k for k in result if k != "images"]
    mistakes = [
        sum(row["label"] == label and row["predicted"] != label for row in result["images"])
        for label in (0, 1)
    ]
    worst = [link for link in parsed.links if link.startswith("worst_")]
    assert len(worst) == sum(min(count, 4) for count in mistakes)


def test_defect_rows_auroc_is_against_the_good_images() -> None:
    images = [{"label": 0, "defect": "good", "score": s, "predicted": int(s > 0.5)} for s in (0.1, 0.2, 0.6)]
    images += [{"label": 1, "defect": "crack", "score": s, "predicted": int(s > 0.5)} for s in (0.7, 0.9)]
    images += [{"label": 1, "defect": "dent", "score": s, "predicted": int(s > 0.5)} for s in (0.15, 0.3)]
    rows = defect_rows(images)
    assert [(r["defect"], r["images"], r["flagged"]) for r in rows] == [
        ("crack", 2, 2),
        ("dent", 2, 0),
        ("good (normal)", 3, 1),
    ]
    # What a line counts: escapes of each defect type, false calls of the good images.
    assert [(r["rate"].count, r["rate"].total) for r in rows] == [(0, 2), (2, 2), (1, 3)]
    assert rows[0]["auroc"] == 1.0 and rows[1]["auroc"] == pytest.approx(3 / 6)


def test_worst_mistakes_are_overlays_of_at_most_four_each(
    run: Path, data: Path, evaluation: EvaluationReport, tmp_path: Path
) -> None:
    """Every verdict flipped: each normal image a false positive, each anomalous one a false negative."""
    flipped = [{**row, "predicted": 1 - row["label"]} for row in evaluation.images]
    folder = tmp_path / "html"
    write_report(folder, FastFlow.load(run), dataclasses.replace(evaluation, images=flipped), run, data)
    worst = [link for link in page(folder).links if link.startswith("worst_")]
    assert len(worst) == 8
    for name in worst:
        with Image.open(folder / name) as picture:
            assert picture.format == "PNG" and picture.mode == "RGB"


def test_failure_keeps_the_earlier_report_and_leaves_nothing_half_written(
    run: Path, data: Path, evaluation: EvaluationReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = FastFlow.load(run)
    folder = tmp_path / "html"
    folder.mkdir()
    (folder / "index.html").write_text("earlier report")
    (folder / "worst_9.png").write_bytes(b"stale")

    def broken(*args: object) -> str:
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr("fastflow.apps.report._page", broken)
        with pytest.raises(RuntimeError):
            write_report(folder, detector, evaluation, run, data)
    assert (folder / "index.html").read_text() == "earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["html"]

    write_report(folder, detector, evaluation, run, data)
    assert not (folder / "worst_9.png").exists()
    assert "<h1>" in (folder / "index.html").read_text()


def test_cli_refuses_a_folder_that_is_no_report_and_a_missing_matplotlib(
    capsys: pytest.CaptureFixture[str], run: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["test", str(run), str(data), "--report", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(other) in err and len(err.splitlines()) == 1
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert main(["test", str(run), str(data), "--report", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "fastflow[report]"' in err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- the line's numbers


def _table(parsed: Page, first_header: str) -> list[list[str]]:
    return next(t for t in parsed.tables if t and t[0] and t[0][0] == first_header)


def test_page_gives_the_calibration_model_hash_version_and_date(run: Path, report: tuple[Path, dict]) -> None:
    import hashlib
    import importlib.metadata

    folder, _ = report
    parsed = page(folder)
    about = {row[0]: row[1] for row in parsed.tables[0]}
    digest = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert about["model file"] == f"{run / 'model.safetensors'}, sha256 {digest}"
    assert about["fastflow"] == importlib.metadata.version("fastflow")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", about["date"])
    # 16 training images, 10 % held out: 2 calibration images, too few for the default 0.01.
    assert about["calibration"].startswith(
        "target false-alarm rate 0.01, calibrated on 2 held-out normal images: a new normal image is "
        "flagged with probability at most 33.3 %"
    )
    assert "2 images are too few for 0.01, which needs 99 normal images" in about["calibration"]
    # Beta(1, 2): one set of 2 images may realise anything from 1.26 % to 84.2 %.
    assert (
        "this calibration's own rate lies between 1.26 and 84.2 % with 95 % probability"
        in about["calibration"]
    )


def test_page_counts_false_calls_and_escapes_with_intervals(report: tuple[Path, dict]) -> None:
    from fastflow.estimator.metrics import clopper_pearson

    folder, result = report
    parsed = page(folder)
    text = " ".join(parsed.text)
    normal = [row for row in result["images"] if row["label"] == 0]
    anomalous = [row for row in result["images"] if row["label"] == 1]
    calls, missed = sum(r["predicted"] for r in normal), sum(1 - r["predicted"] for r in anomalous)
    low, high = clopper_pearson(calls, len(normal))
    assert (
        f"{calls} of {len(normal)} ({100 * calls / len(normal):.3g} %, 95 % interval "
        f"{100 * low:.3g}-{100 * high:.3g} %)" in text
    )
    assert f"{missed} of {len(anomalous)} (" in text
    matrix = _table(parsed, "test images")
    assert matrix[1] == ["normal", str(len(normal) - calls), f"{calls} (false calls)"]
    assert matrix[2] == ["anomalous", f"{missed} (escapes)", str(len(anomalous) - missed)]
    defects = {row[0]: row for row in _table(parsed, "defect type")[1:]}
    for name in DEFECTS:
        passed = sum(1 - r["predicted"] for r in anomalous if r["defect"] == name)
        assert defects[name][3].startswith(f"escapes {passed} of {N_PER_DEFECT} (")
    assert defects["good (normal)"][3].startswith(f"false calls {calls} of {N_GOOD} (")


def test_page_lists_every_image_worst_first_with_its_p_value(report: tuple[Path, dict]) -> None:
    folder, result = report
    table = _table(page(folder), "image")
    assert table[0] == ["image", "truth", "score", "p-value", "label"]
    expected = sorted(result["images"], key=lambda row: -row["score"])
    assert [row[0] for row in table[1:]] == [row["path"] for row in expected]
    for cells, row in zip(table[1:], expected, strict=True):
        assert cells[1] == ("good" if row["label"] == 0 else row["defect"])
        assert cells[3] == f"{row['p_value']:.4g}" and 0 < row["p_value"] <= 1
        assert cells[4] == ("anomalous" if row["predicted"] else "normal")
    # 2 calibration scores: every p-value is 1/3, 2/3 or 1, and anomalous exactly at 1/3.
    assert {round(3 * row["p_value"]) for row in result["images"]} <= {1, 2, 3}
    assert all(row["predicted"] == (row["p_value"] <= 1 / 3 + 1e-12) for row in result["images"])


@pytest.mark.parametrize("all_flagged", [True, False])
def test_a_warning_block_where_false_calls_exceed_the_targets_range(
    run: Path, data: Path, evaluation: EvaluationReport, tmp_path: Path, all_flagged: bool
) -> None:
    """Calibrated on its 16 training images at 0.1, one calibration set's own rate lies below
    20.6 % with 95 % probability (Beta(1, 16)). Every good image flagged: 4 of 4, whose interval
    (47-100 %) lies above that: a warning. None flagged: no warning. (With the run's own 2
    held-out images the range reaches 84 %, which 4 test images cannot exceed.)"""
    detector = FastFlow.load(run).set_params(false_alarm_rate=0.1)
    detector.calibrate(data / "train" / "good")
    assert detector.calibration_.realised_range()[1] == pytest.approx(0.2059, abs=1e-4)
    images = [
        {**row, "predicted": int(all_flagged) if row["label"] == 0 else row["predicted"]}
        for row in evaluation.images
    ]
    folder = tmp_path / "html"
    write_report(folder, detector, dataclasses.replace(evaluation, images=images), run, data)
    text = (folder / "index.html").read_text()
    assert ('class="warning"' in text) == all_flagged
    if all_flagged:
        assert "more false calls than guaranteed" in text and "fastflow calibrate RUN NORMALS" in text
        assert "lies below 20.6 % with 95 % probability (at most 5.88 % on average)" in text


def test_cli_test_prints_the_false_calls_and_the_guarantee(
    capsys: pytest.CaptureFixture[str], run: Path, data: Path
) -> None:
    capsys.readouterr()
    assert main(["test", str(run), str(data)]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^false calls: \d+ of 4 \(.*95 % interval .*\) normal test images flagged$", out, re.MULTILINE
    )
    assert re.search(r"^escapes: \d+ of 6 \(", out, re.MULTILINE)
    assert "guarantee: target false-alarm rate 0.01, calibrated on 2 held-out normal images" in out
