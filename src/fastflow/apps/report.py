"""The test report of ``fastflow test --report DIR``: PNG figures and one HTML page from an evaluation.

``index.html`` links only the PNG files beside it, by relative name, so the folder can be
copied, zipped or opened from anywhere. Figures are drawn with matplotlib's Agg canvas (the
``report`` extra), imported only here and only when a report is asked for, and without pyplot,
so a report changes no global matplotlib state of a program that calls it. The numbers on the
page are the evaluation's own (``fastflow.estimator.evaluation``, ``fastflow.estimator.metrics``); only the ROC
curve's points and the per-defect AUROCs are computed here, with the same metric functions.

The page speaks a line's language first: what the calibration guarantees, the false calls on
normal test images and the escapes per defect type with exact 95 % intervals, the confusion
matrix at the deployment threshold, a warning where the false calls exceed the guarantee, and
every image with its score, p-value and label. ``guarantee_text`` and ``rate_text`` give the
same sentences to the commands that print them (``calibrate``, ``test``, ``demo``).
"""

from __future__ import annotations

import datetime
import hashlib
import html
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_curve

from fastflow.apps.viz import overlay
from fastflow.core.errors import FastFlowError
from fastflow.core.files import replaced_folder
from fastflow.estimator.calibration import Calibration, normals_needed
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.evaluation import EvaluationReport, Rate, escapes, false_calls
from fastflow.estimator.metrics import image_auroc

__all__ = [
    "check_report_folder",
    "defect_rows",
    "exceeds_guarantee",
    "guarantee_text",
    "rate_text",
    "summary_lines",
    "write_report",
]

WORST = 4  # false positives and false negatives shown, each
_OVERLAY_SIDE = 320  # longest side of a heat-map picture on the page, in pixels
_FIGURE_SIZE = (5.0, 3.6)  # inches, at 100 dpi


def _figure_class() -> Any:
    """matplotlib's ``Figure``, or the one-line error that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise FastFlowError(
            'the test report (--report) needs matplotlib; pip install "fastflow[report]"'
        ) from None
    return Figure


def check_report_folder(directory: Path) -> None:
    """Fail before any image is scored if the report cannot be written: matplotlib missing, or
    ``directory`` holding something else than an earlier report (it is replaced whole)."""
    _figure_class()
    directory = Path(directory)
    if directory.exists() and (
        not directory.is_dir() or (any(directory.iterdir()) and not (directory / "index.html").is_file())
    ):
        raise FastFlowError(
            f"report folder {directory} exists and holds no earlier report; pass a new or empty folder to --report"
        )


def _percent(value: float) -> str:
    return f"{100 * value:.3g} %"


def rate_text(rate: Rate) -> str:
    """'2 of 10 (20 %, 95 % interval 2.52-55.6 %)': a measured rate with its exact interval."""
    if rate.total == 0:
        return "0 of 0"
    low, high = rate.interval
    return f"{rate.count} of {rate.total} ({_percent(rate.value)}, 95 % interval {100 * low:.3g}-{_percent(high)})"


def guarantee_text(calibration: Calibration) -> str:
    """What the deployment threshold promises about false calls, in one sentence."""
    rate = calibration.false_alarm_rate
    if rate is None:
        return f"no false-alarm guarantee: {calibration.source}"
    low, high = calibration.realised_range()
    text = (
        f"target false-alarm rate {rate:g}, calibrated on {calibration.source}: a new normal image is "
        f"flagged with probability at most {_percent(calibration.guaranteed_rate())} (split-conformal; "
        "for images like the calibration images, on average over calibration sets); this calibration's "
        f"own rate lies between {100 * low:.3g} and {_percent(high)} with 95 % probability"
    )
    if calibration.too_few() is not None:
        text += (
            f"; {calibration.n} images are too few for {rate:g}, which needs {normals_needed(rate)} "
            "normal images (fastflow calibrate RUN NORMALS)"
        )
    return text


def summary_lines(calibration: Calibration, images: list[dict[str, Any]]) -> list[str]:
    """The report's false calls, escapes and guarantee as printed lines (``fastflow test``, ``demo``)."""
    measured = false_calls(images)
    lines = [
        f"false calls: {rate_text(measured)} normal test images flagged",
        f"escapes: {rate_text(escapes(images))} anomalous test images passed",
        f"guarantee: {guarantee_text(calibration)}",
    ]
    if exceeds_guarantee(calibration, measured):
        lines.append(
            "warning: more false calls than guaranteed: the test's normal images differ from the "
            "calibration images; calibrate on recent normal images (fastflow calibrate RUN NORMALS)"
        )
    return lines


def exceeds_guarantee(calibration: Calibration, measured: Rate) -> bool:
    """Whether the measured false-call rate is above the target's interval: the measured rate's
    95 % interval lies above the 95 % range of this calibration's own rate (few calibration
    images make that range wide: 6 images guarantee 14 % on average, and one set of 6 may
    realise up to 46 %)."""
    if calibration.false_alarm_rate is None or measured.total == 0:
        return False
    return measured.interval[0] > calibration.realised_range()[1]


def defect_rows(images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per defect type (test-set order), then one for the normal images: images, how many
    the deployment threshold flags, the rate a line counts (``Rate``: escapes of that defect type,
    false calls of the normal images) and the image AUROC of that defect type against the good images."""
    good = [row for row in images if row["label"] == 0]
    types = list(dict.fromkeys(row["defect"] for row in images if row["label"] == 1))
    rows = []
    for name in types:
        defective = [row for row in images if row["label"] == 1 and row["defect"] == name]
        both = good + defective
        auroc = image_auroc([row["label"] for row in both], [row["score"] for row in both])
        rows.append(
            {
                "defect": name,
                "images": len(defective),
                "flagged": _flagged(defective),
                "rate": escapes(images, defect=name),
                "auroc": auroc,
            }
        )
    rows.append(
        {
            "defect": "good (normal)",
            "images": len(good),
            "flagged": _flagged(good),
            "rate": false_calls(images),
            "auroc": None,
        }
    )
    return rows


def _flagged(images: list[dict[str, Any]]) -> int:
    return sum(row["predicted"] for row in images)


def write_report(
    directory: Path, detector: FastFlow, evaluation: EvaluationReport, run: Path, data: Path
) -> Path:
    """Draw the figures and write ``directory/index.html``; returns its path.

    The report is built in a folder beside ``directory`` and renamed into place at the end,
    so a failure leaves no half-written report (and an earlier one intact).
    """
    figure = _figure_class()
    check_report_folder(directory)
    images = evaluation.images
    labels = np.array([row["label"] for row in images])
    scores = np.array([row["score"] for row in images])
    threshold = float(detector.threshold_)
    metrics = evaluation.metrics
    with replaced_folder(directory) as tmp:
        _roc_figure(
            figure(figsize=_FIGURE_SIZE), labels, scores, metrics["image_auroc"], threshold, tmp / "roc.png"
        )
        _histogram_figure(figure(figsize=_FIGURE_SIZE), labels, scores, threshold, tmp / "scores.png")
        figures = {"roc": "roc.png", "scores": "scores.png"}
        if evaluation.pro_curve is not None:
            _pro_figure(
                figure(figsize=_FIGURE_SIZE), *evaluation.pro_curve, metrics["aupro"], tmp / "pro.png"
            )
            figures["pro"] = "pro.png"
        if detector.history_:
            _training_figure(
                figure(figsize=_FIGURE_SIZE), detector.history_, detector.best_epoch_, tmp / "training.png"
            )
            figures["training"] = "training.png"
        worst = _worst(images)
        pictures = _overlays(detector, [row for group in worst.values() for row in group], tmp)
        page = _page(detector, evaluation, run, data, figures, worst, pictures)
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return Path(directory) / "index.html"


# ---------------------------------------------------------------------------- figures


def _save(fig: Any, path: Path) -> None:
    """PNG through the Agg canvas, explicitly: no pyplot, no backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def _roc_figure(
    fig: Any, labels: np.ndarray, scores: np.ndarray, auroc: float, threshold: float, path: Path
) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    ax = fig.subplots()
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"AUROC {auroc:.4f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    # The deployment threshold's operating point: what the model flags as it is saved.
    flagged = scores > threshold
    ax.plot(
        flagged[labels == 0].mean(),
        flagged[labels == 1].mean(),
        "o",
        color="C3",
        label=f"threshold {threshold:.4g}",
    )
    ax.set(
        title=f"Image-level ROC (AUROC {auroc:.4f})",
        xlabel="false positive rate (normal images flagged)",
        ylabel="true positive rate",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _pro_figure(fig: Any, fpr: np.ndarray, pro: np.ndarray, aupro: float, path: Path) -> None:
    ax = fig.subplots()
    ax.plot(fpr, pro, label=f"AUPRO {aupro:.4f}")
    ax.set(
        title=f"Per-region overlap up to FPR 0.3 (AUPRO {aupro:.4f})",
        xlabel="false positive rate (normal pixels)",
        ylabel="mean overlap per defect region",
        xlim=(0, 0.3),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _histogram_figure(fig: Any, labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> None:
    ax = fig.subplots()
    edges = np.histogram_bin_edges(np.append(scores, threshold), bins=30)
    ax.hist(
        scores[labels == 0], bins=edges, alpha=0.6, color="C0", label=f"normal ({int((labels == 0).sum())})"
    )
    ax.hist(
        scores[labels == 1],
        bins=edges,
        alpha=0.6,
        color="C1",
        label=f"anomalous ({int((labels == 1).sum())})",
    )
    ax.axvline(threshold, color="C3", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(
        title="Image scores of the test set", xlabel="image score (higher = more anomalous)", ylabel="images"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _training_figure(fig: Any, history: list[dict[str, float]], best_epoch: int, path: Path) -> None:
    """Every per-epoch value of the history (``train_nll``, ``val_nll``), the kept epoch marked."""
    ax = fig.subplots()
    epochs = [row["epoch"] for row in history]
    for key in [k for k in history[0] if k != "epoch"]:
        ax.plot(epochs, [row[key] for row in history], marker=".", label=key)
    if best_epoch:
        ax.axvline(best_epoch, color="grey", ls=":", label=f"kept epoch {best_epoch}")
    ax.set(title="Training: NLL per epoch", xlabel="epoch", ylabel="negative log-likelihood")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------- worst images


def _worst(images: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The highest-scoring normal images the threshold flags, and the lowest-scoring anomalous
    images it misses: the mistakes furthest from the threshold, up to ``WORST`` each."""
    false_positives = [row for row in images if row["label"] == 0 and row["predicted"] == 1]
    false_negatives = [row for row in images if row["label"] == 1 and row["predicted"] == 0]
    return {
        "fp": sorted(false_positives, key=lambda row: -row["score"])[:WORST],
        "fn": sorted(false_negatives, key=lambda row: row["score"])[:WORST],
    }


def _overlays(detector: FastFlow, rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """Score ``rows``' images again (the evaluation keeps no maps) and save heat-map overlays,
    shrunk to ``_OVERLAY_SIDE``; returns the file names, in the order of ``rows``."""
    names: list[str] = []
    paths = [Path(row["path"]) for row in rows]
    for samples, prediction, batch in detector.iter_predictions(paths) if paths else ():
        for i in range(len(samples)):
            pixels = np.ascontiguousarray(batch["image"][i].permute(1, 2, 0).numpy())
            picture = overlay(
                Image.fromarray(pixels), prediction.maps[i], detector.map_floor_, detector.threshold_
            )
            picture.thumbnail((_OVERLAY_SIDE, _OVERLAY_SIDE))
            name = f"worst_{len(names) + 1}.png"
            picture.save(folder / name)
            names.append(name)
    return names


# ---------------------------------------------------------------------------- page

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; max-width: 320px; overflow-wrap: anywhere; }
.warning { border: 2px solid #b00; background: #fee; padding: 0.5em 1em; }
"""


def _model_file(run: Path) -> Path:
    return run / "model.safetensors" if run.is_dir() else run


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _page(
    detector: FastFlow,
    evaluation: EvaluationReport,
    run: Path,
    data: Path,
    figures: dict[str, str],
    worst: dict[str, list[dict[str, Any]]],
    pictures: list[str],
) -> str:
    e = html.escape
    threshold = float(detector.threshold_)
    images = evaluation.images
    n_normal = sum(row["label"] == 0 for row in images)
    n_anomalous = len(images) - n_normal
    height, width = detector.config.input_size
    name = (run.parent if run.suffix == ".safetensors" else run).resolve().name  # the run folder's name
    model_file = _model_file(run)
    about = [
        ("run", str(run)),
        ("model file", f"{model_file}, sha256 {_sha256(model_file)}"),
        ("test data", f"{data} ({n_normal} normal, {n_anomalous} anomalous images)"),
        ("backbone", f"{detector.config.backbone}, input {height}x{width}"),
        ("recipe", detector.recipe_.name),
        ("threshold", f"{threshold:.6g}"),
        ("calibration", guarantee_text(detector.calibration_)),
        ("training", f"kept epoch {detector.best_epoch_} of {len(detector.history_)}"),
        ("fastflow", importlib.metadata.version("fastflow")),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>FastFlow test report: {e(name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>FastFlow test report: {e(name)}</h1>",
        _table(None, [[key, value] for key, value in about]),
        *_line_section(detector.calibration_, images),
        "<h2>Metrics</h2>",
        (
            "<p>The same metrics as <code>fastflow test</code> prints; <code>deploy_*</code> are measured "
            "at the threshold above, the others over all thresholds.</p>"
        ),
        _table(
            ["metric", "value"], [[name, f"{value:.4f}"] for name, value in evaluation.metrics.items()], (1,)
        ),
        "<h2>Curves</h2>",
        _image(figures["roc"], "Image-level ROC curve; the dot is the threshold's operating point."),
    ]
    if "pro" in figures:
        parts.append(_image(figures["pro"], "Per-region overlap curve of the pixel maps, up to FPR 0.3."))
    parts.append(_image(figures["scores"], "Test image scores; the dashed line is the threshold."))
    named = iter(pictures)
    for key, title, none in (
        ("fp", "Worst false calls", "no normal test image scores above the threshold"),
        ("fn", "Worst escapes", "every anomalous test image scores above the threshold"),
    ):
        parts.append(f"<h2>{title}</h2>")
        if not worst[key]:
            parts.append(f"<p>None: {none}.</p>")
        for row in worst[key]:
            caption = f"{row['defect']}, score {row['score']:.4g}: {row['path']}"
            parts.append(_image(next(named), caption))
    parts += _every_image(images)
    parts.append("<h2>Training</h2>")
    if "training" in figures:
        parts.append(
            _image(
                figures["training"], "Training and held-out NLL per epoch; the model keeps the marked epoch."
            )
        )
    else:
        parts.append("<p>The model holds no training history.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _line_section(calibration: Calibration, images: list[dict[str, Any]]) -> list[str]:
    """False calls and escapes at the deployment threshold: the guarantee, the measured rates with
    their intervals, a warning where the false calls exceed the guarantee, the confusion matrix
    and the per-defect table."""
    measured = false_calls(images)
    missed = escapes(images)
    parts = [
        "<h2>False calls and escapes</h2>",
        (
            f"<p>At the deployment threshold, <b>false calls</b> (normal test images flagged): "
            f"{html.escape(rate_text(measured))}; <b>escapes</b> (anomalous test images passed): "
            f"{html.escape(rate_text(missed))}. Intervals are exact (Clopper-Pearson) 95 % binomial "
            "intervals: what these few images say about the rate on many.</p>"
        ),
        f"<p>Guarantee: {html.escape(guarantee_text(calibration))}.</p>",
    ]
    if exceeds_guarantee(calibration, measured):
        parts.append(
            '<div class="warning"><p><b>Warning: more false calls than guaranteed.</b> '
            f"{html.escape(rate_text(measured))} normal test images were flagged, while the calibration's "
            f"own rate lies below {_percent(calibration.realised_range()[1])} with 95 % probability (at most "
            f"{_percent(calibration.guaranteed_rate())} on average). The guarantee holds for images "
            "like the calibration images: these test images differ from them (another batch, lighting, "
            "camera), or the calibration images were not all normal. Calibrate on recent normal images "
            "of the line: <code>fastflow calibrate RUN NORMALS</code>.</p></div>"
        )
    flagged = {label: sum(row["predicted"] for row in images if row["label"] == label) for label in (0, 1)}
    totals = {label: sum(row["label"] == label for row in images) for label in (0, 1)}
    parts += [
        "<h3>Confusion matrix at the deployment threshold</h3>",
        _table(
            ["test images", "labelled normal", "labelled anomalous"],
            [
                ["normal", str(totals[0] - flagged[0]), f"{flagged[0]} (false calls)"],
                ["anomalous", f"{totals[1] - flagged[1]} (escapes)", str(flagged[1])],
            ],
            (1, 2),
        ),
        "<h3>Per defect type</h3>",
        (
            "<p>Flagged: images scored above the threshold. Rate: escapes of the defect type (its "
            "images not flagged), or for the good images the false calls. AUROC: that defect type "
            "against the good images.</p>"
        ),
        _table(
            ["defect type", "images", "flagged", "rate (95 % interval)", "image AUROC"],
            [
                [
                    row["defect"],
                    str(row["images"]),
                    str(row["flagged"]),
                    ("false calls " if row["auroc"] is None else "escapes ") + rate_text(row["rate"]),
                    "" if row["auroc"] is None else f"{row['auroc']:.4f}",
                ]
                for row in defect_rows(images)
            ],
            (1, 2, 4),
        ),
    ]
    return parts


def _every_image(images: list[dict[str, Any]]) -> list[str]:
    """Every test image, highest score first: its score, p-value and label beside its truth."""
    rows = [
        [
            row["path"],
            "good" if row["label"] == 0 else str(row["defect"]),
            f"{row['score']:.6g}",
            "" if row["p_value"] is None else f"{row['p_value']:.4g}",
            "anomalous" if row["predicted"] else "normal",
        ]
        for row in sorted(images, key=lambda row: -row["score"])
    ]
    return [
        "<h2>Every test image, worst first</h2>",
        (
            "<p>p-value: the share of calibration images scoring at least as high (counting the image "
            "itself), near 1 for a typical normal image. With a threshold calibrated for a rate, an image "
            "is labelled anomalous exactly where its p-value is at most the guaranteed rate.</p>"
        ),
        _table(["image", "truth", "score", "p-value", "label"], rows, (2, 3)),
    ]


def _table(columns: list[str] | None, rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """An HTML table of plain-text cells (escaped here); the ``numeric`` columns align right."""

    def cell(tag: str, index: int, text: str) -> str:
        align = ' class="number"' if index in numeric else ""
        return f"<{tag}{align}>{html.escape(text)}</{tag}>"

    lines = ["<table>"]
    if columns is not None:
        lines.append("<tr>" + "".join(cell("th", i, text) for i, text in enumerate(columns)) + "</tr>")
    lines += ["<tr>" + "".join(cell("td", i, text) for i, text in enumerate(row)) + "</tr>" for row in rows]
    return "\n".join([*lines, "</table>"])


def _image(name: str, caption: str) -> str:
    e = html.escape
    return f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
