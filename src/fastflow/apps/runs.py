"""Run folders: what ``fastflow train`` writes for one dataset, and where several datasets go.

A run folder holds ``model.safetensors`` (the best model), ``last.safetensors`` (the resumable
checkpoint of the last epoch) and ``history.json``. With several datasets, ``train`` writes one
run folder each under its ``--output``, named after the dataset's folder, and trains them one
after another or in worker processes (``fastflow.apps.workers``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastflow.apps.workers import worker_device
from fastflow.core.errors import FastFlowError
from fastflow.core.files import atomic_write
from fastflow.estimator import distributed
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.training import TrainConfig

__all__ = ["TrainRun", "check_run_folder", "run_folders", "train_run"]

MODEL = "model.safetensors"
CHECKPOINT = "last.safetensors"


@dataclass(frozen=True)
class TrainRun:
    """One dataset to train on and the run folder to write: everything a worker process needs.

    ``detector`` is an unfitted ``FastFlow`` holding every setting; each run fits its own copy,
    resuming from the folder's checkpoint where ``check_run_folder`` let one stand.
    """

    detector: FastFlow
    data: Path
    output: Path

    def __post_init__(self) -> None:
        # The detector checks its parameters in fit; its lazy config makes the same checks now, so
        # a bad option stops the command before any run folder is looked at or process launched.
        _ = self.detector.config


def run_folders(datasets: list[Path], output: Path) -> list[Path]:
    """The run folder of each dataset: ``output`` itself for one, ``output/<dataset folder name>``
    for several; two datasets whose folders share a name are an error, as they would share a run."""
    if len(datasets) == 1:
        return [output]
    folders: dict[str, Path] = {}
    for dataset in datasets:
        name = dataset.resolve().name
        if name in folders:
            raise FastFlowError(
                f"datasets {folders[name]} and {dataset} would both train into {output / name}; "
                "rename one folder or train them with separate --output folders"
            )
        folders[name] = dataset
    return [output / name for name in folders]


def check_run_folder(output: Path, resume: bool) -> None:
    """A new run needs a folder without one; ``resume`` needs its checkpoint."""
    checkpoint = output / CHECKPOINT
    if not resume and ((output / MODEL).exists() or checkpoint.exists()):
        raise FastFlowError(
            f"run folder {output} already holds a run; pass --resume to continue it or choose a new --output"
        )
    if resume and not checkpoint.exists():
        raise FastFlowError(f"nothing to resume: {checkpoint} does not exist; train without --resume")


def train_run(run: TrainRun) -> list[str]:
    """Fit a copy of ``run.detector`` on ``run.data`` (on this worker's device, if in one) and
    write the run folder; the lines to print (none on the ranks other than 0 under torchrun)."""
    detector = copy.deepcopy(run.detector)
    training = detector.training if detector.training is not None else TrainConfig()
    detector.set_params(training=dataclasses.replace(training, device=worker_device(training.device)))
    start = time.monotonic()
    detector.fit(run.data, checkpoint=run.output / CHECKPOINT)
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    if not distributed.is_main():
        return []
    path = detector.save(run.output / MODEL)
    history = json.dumps(detector.history_, indent=2)
    atomic_write(run.output / "history.json", lambda tmp: tmp.write_text(history))
    height, width = detector.config_.input_size
    calibration = detector.calibration_
    return [
        (
            f"trained in {minutes} min {seconds} s; input {height}x{width}; "
            f"best epoch {detector.best_epoch_} of {len(detector.history_)}; "
            f"threshold {detector.threshold_:.6g} "
            f"for a false-alarm rate of {calibration.false_alarm_rate:g}, guaranteed at most "
            f"{calibration.guaranteed_rate():.3g} by {calibration.n} held-out normal images"
        ),
        f"saved {path}",
    ]
