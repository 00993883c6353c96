"""``fastflow benchmark``: datasets x backbones x recipes (x seeds) -> markdown tables.

Each run trains on a category's normal images and tests on its test split exactly as
``fastflow train`` / ``fastflow test`` do, writes one JSON file, and the tables (image AUROC,
pixel AUROC, image F1, pixel F1, AUPRO) get one row per category, one column per backbone and
recipe, and an Average row. With several seeds a cell shows the mean and the spread (min-max).

Every run also counts, at each target false-alarm rate (``--false-alarm-rates``, default 0.01 and
0.05), the false calls on the test set's normal images and the escapes among its anomalous
ones at the threshold its held-out normals give for that rate, with exact 95 % intervals,
beside the rate the calibration guarantees (and whether its held-out images are too few for
the target): the table of what a line can expect from a model.

With ``robustness`` (``--robustness``) every run is also scored under the invisible changes of
``fastflow.apps.robustness`` and a last table gives, per change, image and pixel AUROC with their
change against clean and the median drift of normal scores.

``write_table_json`` (``--table-json PATH``) writes a summary table, one row per category and
model with every metric, as a results-table record (``fastflow.apps.result_tables``) that
``docs/render.py`` renders into the documentation; the robustness table goes beside it.

A dataset argument is a folder, or the name of a built-in generated dataset (``textures``,
``small_defects``), which is written under ``OUTPUT/data`` the first time and reused after that.

``--jobs N`` trains N runs at once in worker processes (``fastflow.apps.workers``: many categories
on one machine, each worker with its share of the cores and, on GPUs, a GPU in turn), for
machines where one run does not keep every core busy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastflow.apps.knn_reference import knn_reference_metrics
from fastflow.apps.result_tables import markdown_table, table_record, write_table
from fastflow.apps.robustness import measure
from fastflow.apps.small_defects import make_small_defects
from fastflow.apps.synthetic import make_textures
from fastflow.apps.workers import check_jobs, run_in_workers, worker_device
from fastflow.core.errors import FastFlowError, first_line
from fastflow.core.files import atomic_write
from fastflow.estimator.calibration import check_false_alarm_rate
from fastflow.estimator.data import load_samples
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.evaluation import evaluate_detector, rates_at
from fastflow.estimator.training import TrainConfig

__all__ = [
    "BUILTIN_DATASETS",
    "FALSE_ALARM_RATES",
    "KNN_REFERENCE",
    "TABLE_METRICS",
    "BenchmarkRun",
    "markdown_tables",
    "resolve_dataset",
    "run_benchmark",
    "summary_rows",
    "write_table_json",
]

# The target false-alarm rates whose false calls and escapes every run counts.
FALSE_ALARM_RATES = (0.01, 0.05)
# The recipe name under which the nearest-neighbour reference's runs appear in the tables.
KNN_REFERENCE = "kNN reference"

TABLE_METRICS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "image_f1": "Image F1",
    "pixel_f1": "Pixel F1",
    "aupro": "AUPRO",
}

# The summary table's metrics (``write_table_json``), in the documentation's column order.
SUMMARY_METRICS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "image_f1": "image F1",
    "pixel_f1": "pixel F1",
}
ROBUSTNESS_TITLE = "Robustness (image AUROC (delta) / pixel AUROC (delta) / median normal drift)"

# The second benchmark dataset, unlike MVTec bottle in every way the loader cares about:
# generated periodic textures, grayscale, each image its own size (200..320 px a side),
# faint defects (20 % opacity; docs/measurements.md#textures-opacity says why) of three kinds with
# exact masks.
BUILTIN_DATASETS: dict[str, Callable[[Path], Path]] = {
    "textures": lambda root: make_textures(
        root,
        n_train=150,
        n_test_good=30,
        n_test_defect=15,
        seed=3,
        grayscale=True,
        mixed_sizes=True,
        defect_opacity=0.2,
    ),
    # Small defects on large non-square images, as in real inspection: a machined metal part,
    # 480 x 1200 (H x W), grayscale (a monochrome camera), defects of 0.05-0.5 % of the image
    # (1.2-3 px scratches, pin-holes, faint stains). Squeezed into a 256 x 256 input, the image
    # shrinks 4.7x along its length and 1.9x across: a scratch becomes sub-pixel, a pin-hole a
    # pixel or two, and the aspect ratio is lost; this set shows what an input size or a
    # model's resolution costs there, where bottle and textures cannot.
    "small_defects": lambda root: make_small_defects(
        root, n_train=120, n_test_good=30, n_test_defect=15, seed=0, grayscale=True
    ),
}


def resolve_dataset(dataset: str | Path, output: Path) -> Path:
    """A dataset folder as given, or a built-in dataset's folder (generated under ``output/data``)."""
    name = str(dataset)
    if name in BUILTIN_DATASETS and not Path(dataset).exists():
        root = output / "data" / name
        if not (root / "train").exists():
            BUILTIN_DATASETS[name](root)
        return root
    return Path(dataset)


@dataclass(frozen=True)
class BenchmarkRun:
    """One trained and tested model: where, with what, and its metrics."""

    category: str
    backbone: str
    seed: int
    metrics: dict[str, float]
    recipe: str = "improved"
    robustness: list[dict[str, Any]] = field(default_factory=list)  # fastflow.apps.robustness.measure rows
    false_calls: list[dict[str, Any]] = field(
        default_factory=list
    )  # fastflow.estimator.evaluation.rates_at rows

    @property
    def column(self) -> str:
        """Table column: the backbone, and the recipe when it is not the default."""
        return self.backbone if self.recipe == "improved" else f"{self.backbone} ({self.recipe})"


@dataclass(frozen=True)
class _Task:
    """One (dataset, backbone, recipe, seed) to train and test: everything a worker process needs."""

    root: Path
    backbone: str
    recipe: str
    seed: int
    weights: str | Path | None
    training: TrainConfig
    robustness: tuple[str, ...]
    overrides: dict[str, Any]
    rates: tuple[float, ...] = FALSE_ALARM_RATES

    @property
    def name(self) -> str:
        return f"{self.root.name}__{self.backbone}__{self.recipe}__seed{self.seed}"


def _train_and_test(task: _Task) -> tuple[BenchmarkRun, dict[str, Any]]:
    """Train and test one task; the run and the JSON record of it."""
    config = TrainConfig(
        **{**vars(task.training), "seed": task.seed, "device": worker_device(task.training.device)}
    )
    detector = FastFlow(
        task.backbone, recipe=task.recipe, weights=task.weights, training=config, architecture=task.overrides
    )
    detector.fit(task.root)
    evaluation = evaluate_detector(detector, task.root)
    false_calls = [rates_at(evaluation.images, detector.calibration_, rate) for rate in task.rates]
    changes = list(task.robustness)
    rows = measure(detector, load_samples(task.root, "test"), changes, seed=0) if changes else []
    run = BenchmarkRun(
        task.root.name, task.backbone, task.seed, evaluation.metrics, task.recipe, rows, false_calls
    )
    record = {
        **vars(run),
        "epochs": len(detector.history_),
        "best_epoch": detector.best_epoch_,
        "training": dataclasses.asdict(task.training),
    }
    return run, record


def _saved_run(path: Path, task: _Task) -> BenchmarkRun | None:
    """The run ``path`` holds for ``task`` (``--resume``), or None where there is none. A record
    made with other training settings is an error: reusing it would mix two benchmarks' rows."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        run = BenchmarkRun(
            **{f.name: record[f.name] for f in dataclasses.fields(BenchmarkRun) if f.name in record}
        )
    except (OSError, ValueError, TypeError) as error:
        raise FastFlowError(
            f"cannot reuse {path} ({first_line(error)}); delete it to train that run again"
        ) from None
    saved = record.get("training")  # records written before it was kept: the settings are unknown
    if saved is not None and saved != json.loads(json.dumps(dataclasses.asdict(task.training))):
        raise FastFlowError(
            f"{path} was trained with other settings ({saved}); resume with the same options, "
            "or delete it to train that run again"
        )
    return run


def run_benchmark(
    datasets: Iterable[str | Path],
    backbones: Iterable[str],
    output: Path,
    *,
    weights: Mapping[str, str | Path | None],
    seeds: Iterable[int] = (0,),
    recipes: Iterable[str] = ("improved",),
    training: TrainConfig | None = None,
    robustness: Iterable[str] = (),
    jobs: int = 1,
    knn_reference: bool = True,
    false_alarm_rates: Iterable[float] = FALSE_ALARM_RATES,
    resume: bool = False,
    **overrides: Any,
) -> list[BenchmarkRun]:
    """Train and test every (dataset, backbone, recipe, seed); write one JSON file per run to ``output``.

    With ``knn_reference`` each (dataset, backbone) also gets the nearest-neighbour reference
    (``fastflow.apps.knn_reference``) on the same features and input size, with the first
    recipe's map blur and image score: its own column, ``BACKBONE (kNN reference)``.

    With ``jobs`` > 1 the runs are independent trainings in that many worker processes, each with
    its share of the cores; one progress bar counts finished runs. Runs come back in the same
    order, with the same numbers, as with one job (each run is seeded on its own).

    With ``resume`` a run (or kNN reference) whose JSON is already in ``output`` is read, not
    trained again: an interrupted benchmark continues where it stopped, and one table can gather
    runs that several invocations (or machines) made into the same folder.
    """
    check_jobs(jobs)
    rates = tuple(
        check_false_alarm_rate(rate, "false_alarm_rates (--false-alarm-rates)") for rate in false_alarm_rates
    )
    roots = [resolve_dataset(dataset, output) for dataset in datasets]
    tasks = [
        _Task(
            root,
            backbone,
            recipe,
            seed,
            weights.get(backbone),
            training or TrainConfig(),
            tuple(robustness),
            overrides,
            rates,
        )
        for root in roots
        for backbone in backbones
        for recipe in recipes
        for seed in seeds
    ]
    finished: dict[str, BenchmarkRun] = {}
    if resume:
        for task in tasks:
            if (saved := _saved_run(output / f"{task.name}.json", task)) is not None:
                finished[task.name] = saved
    to_train = [task for task in tasks if task.name not in finished]
    with tqdm(total=len(to_train), desc="benchmark", unit="run", disable=jobs == 1) as bar:
        for task, (run, record) in run_in_workers(
            _train_and_test, to_train, jobs, (training or TrainConfig()).device
        ):
            text = json.dumps(record, indent=2)
            atomic_write(output / f"{task.name}.json", functools.partial(Path.write_text, data=text))
            finished[task.name] = run
            bar.update(1)
            bar.set_postfix_str(f"{task.name}: image AUROC {run.metrics['image_auroc']:.3f}")
    runs = [finished[task.name] for task in tasks]
    if knn_reference:
        runs += [
            _knn_run(root, backbone, weights.get(backbone), next(iter(recipes)), output, overrides, resume)
            for root in roots
            for backbone in backbones
        ]
    return runs


def _knn_run(
    root: Path,
    backbone: str,
    weights: str | Path | None,
    recipe: str,
    output: Path,
    overrides: dict[str, Any],
    resume: bool = False,
) -> BenchmarkRun:
    """The nearest-neighbour reference of one (dataset, backbone), written beside the runs' JSON
    (with ``resume``, read from there if it is)."""
    name = f"{root.name}__{backbone}__knn_reference.json"
    if resume and (output / name).is_file():
        return BenchmarkRun(**json.loads((output / name).read_text()))
    # The input size the fastflow runs of this column use on these images, derived as fit derives it.
    input_size = FastFlow(backbone, recipe=recipe, architecture=overrides).config_for(root).input_size
    metrics = knn_reference_metrics(root, backbone, weights, input_size, recipe)
    run = BenchmarkRun(root.name, backbone, 0, metrics, KNN_REFERENCE)
    text = json.dumps(vars(run), indent=2)
    atomic_write(output / name, functools.partial(Path.write_text, data=text))
    return run


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _metric_rows(runs: list[BenchmarkRun], key: str) -> list[list[str]]:
    """One metric's table: a row per category, a cell per (backbone, recipe) column, an Average row."""
    categories = list(dict.fromkeys(r.category for r in runs))
    columns = list(dict.fromkeys(r.column for r in runs))
    rows = []
    per_column_means: dict[str, list[float]] = {c: [] for c in columns}
    for category in categories:
        cells = [category]
        for column in columns:
            values = [
                r.metrics[key]
                for r in runs
                if r.category == category and r.column == column and key in r.metrics
            ]
            cells.append(_cell(values) if values else "-")
            if values:
                per_column_means[column].append(statistics.mean(values))
        rows.append(cells)
    rows.append(
        ["**Average**"] + [f"{statistics.mean(v):.3f}" if v else "-" for v in per_column_means.values()]
    )
    return rows


def markdown_tables(runs: list[BenchmarkRun]) -> str:
    """One markdown table per metric: categories x (backbone, recipe) columns, with an Average row."""
    categories = list(dict.fromkeys(r.category for r in runs))
    columns = list(dict.fromkeys(r.column for r in runs))
    blocks = [
        f"### {title}\n\n" + markdown_table(["category", *columns], _metric_rows(runs, key))
        for key, title in TABLE_METRICS.items()
    ]
    if any(r.false_calls for r in runs):
        blocks.append(_false_call_table(runs))
    if any(r.robustness for r in runs):
        columns_, rows = _robustness_rows(runs, categories, columns)
        blocks.append(f"### {ROBUSTNESS_TITLE}\n\n" + markdown_table(columns_, rows))
    return "\n\n".join(blocks) + "\n"


def summary_rows(runs: list[BenchmarkRun]) -> tuple[list[str], list[list[str]]]:
    """The summary table's columns and rows: one row per (category, backbone and recipe) with every
    metric, mean (min-max) over seeds, as the documentation's results tables show them."""
    columns = ["dataset", "model", *SUMMARY_METRICS.values()]
    rows = []
    for category in dict.fromkeys(r.category for r in runs):
        for column in dict.fromkeys(r.column for r in runs):
            group = [r for r in runs if r.category == category and r.column == column]
            if not group:
                continue
            cells = [category, column]
            for key in SUMMARY_METRICS:
                values = [r.metrics[key] for r in group if key in r.metrics]
                cells.append(_cell(values) if values else "-")
            rows.append(cells)
    return columns, rows


def write_table_json(path: Path, runs: list[BenchmarkRun], command: str) -> list[Path]:
    """Write the benchmark's summary table (``summary_rows``) to ``path`` as a results-table record
    (``fastflow.apps.result_tables``: the command, this CPU, today, fastflow's version), and, where
    the runs were scored under the robustness changes, their table beside it as ``PATH-robustness.json``.
    The written paths."""
    path = Path(path)
    categories = list(dict.fromkeys(r.category for r in runs))
    columns = list(dict.fromkeys(r.column for r in runs))
    seeds = ", ".join(str(seed) for seed in sorted({r.seed for r in runs if r.recipe != KNN_REFERENCE}))
    spread = f"mean (min-max) over seeds {seeds}" if "," in seeds else f"seed {seeds or 0}"
    header, rows = summary_rows(runs)
    written = [
        write_table(
            path,
            table_record(
                f"fastflow benchmark: {', '.join(categories)} ({spread})", header, rows, command=command
            ),
        )
    ]
    if any(r.robustness for r in runs):
        header, rows = _robustness_rows(runs, categories, columns)
        title = f"fastflow benchmark: {', '.join(categories)} under the robustness changes (mean over seeds)"
        record = table_record(title, header, rows, command=command)
        written.append(write_table(path.with_name(f"{path.stem}-robustness{path.suffix or '.json'}"), record))
    return written


def _interval(rate: dict[str, Any]) -> tuple[str, str]:
    """('k of n (x %)', 'low-high %') of a ``Rate.to_dict``."""
    return (
        f"{rate['count']} of {rate['total']} ({100 * rate['rate']:.3g} %)",
        f"{100 * rate['low']:.3g}-{100 * rate['high']:.3g} %",
    )


def _false_call_table(runs: list[BenchmarkRun]) -> str:
    """One row per run and target rate: the calibration's guarantee, then the false calls on the
    test set's normal images and the escapes among its anomalous ones, with 95 % intervals."""
    lines = [
        "### False calls and escapes at a target false-alarm rate",
        "",
        (
            "Threshold: the split-conformal one of each run's held-out normal images for the target. "
            "Guaranteed: the probability at most that it flags a new normal image, on average over "
            "calibration sets (too few: the held-out images cannot guarantee the target; the threshold "
            "is then their largest score). Range: where one calibration set's own rate lies with 95 % "
            "probability. Intervals: exact (Clopper-Pearson) 95 %."
        ),
        "",
        (
            "| category | model | seed | target | held-out images | guaranteed | range | false calls "
            "| 95 % interval | escapes | 95 % interval |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for row in run.false_calls:
            guaranteed = f"{100 * row['guaranteed']:.3g} %" + (" (too few)" if row["too_few"] else "")
            spread = f"{100 * row['realised_low']:.3g}-{100 * row['realised_high']:.3g} %"
            calls, escapes = _interval(row["false_calls"]), _interval(row["escapes"])
            lines.append(
                f"| {run.category} | {run.column} | {run.seed} | {row['target']:g} | "
                f"{row['calibration_images']} | {guaranteed} | {spread} | {' | '.join(calls)} | "
                f"{' | '.join(escapes)} |"
            )
    return "\n".join(lines)


def _robustness_rows(
    runs: list[BenchmarkRun], categories: list[str], columns: list[str]
) -> tuple[list[str], list[list[str]]]:
    """One row per (category, column, change): means over seeds of AUROCs, their deltas and the drift."""
    header = ["category", "model", "change", "image AUROC", "pixel AUROC", "normal drift"]
    rows = []
    for category in categories:
        for column in columns:
            group = [
                r.robustness for r in runs if r.category == category and r.column == column and r.robustness
            ]
            for index, row in enumerate(group[0] if group else []):

                def mean(key: str, index: int = index, group: list = group) -> float:
                    return statistics.mean(measured[index][key] for measured in group)

                rows.append(
                    [
                        category,
                        column,
                        row["perturbation"],
                        f"{mean('image_auroc'):.3f} ({mean('delta_image_auroc'):+.3f})",
                        f"{mean('pixel_auroc'):.3f} ({mean('delta_pixel_auroc'):+.3f})",
                        f"{mean('normal_drift'):+.3f}",
                    ]
                )
    return header, rows
