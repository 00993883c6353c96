"""Training speed: ``FastFlow.fit`` against anomalib's FastflowModel training loop, one process.

    python benchmarks/training.py --backbone resnet18 --backbone tf_efficientnet_lite0 --epochs 5

Both train on the same images (default: MVTec bottle's normal training images from
``../shared``, resized to 256x256) for the same number of epochs at batch 32 with Adam (lr 1e-3,
weight decay 1e-5, anomalib's settings). anomalib's side is its ``FastflowModel`` and
``FastflowLoss`` in a bare loop of what its Lightning ``training_step`` does (forward through
backbone and flows, loss, backward, step), on images already decoded, resized and normalised in
memory: no data loading, validation or logging is timed, which flatters it. fastflow's side is a
whole ``fit`` with the library's defaults (improved recipe): reading and decoding the images,
caching the frozen backbone's features once (twice with the recipe's pixel-noise copies), the
epochs on the cached features, the held-out NLL after each epoch and the threshold calibration.
fastflow trains on 90 % of the images (10 % are held out), so the rate compared is training
images per second: images x epochs / seconds. Random backbone weights for resnet18 (speed does
not depend on their values); Lite0 uses the real weights file on both sides.

``--anomalib-engine`` also times anomalib's own ``Engine.fit`` on the same MVTec category, as
its users run it: Lightning, its datamodule decoding and resizing the PNGs every epoch (2
workers), and validation on the category's test images after each epoch. Its weights are the
same twin's; its rate counts all the normal images it trains on.

``--table-json PATH`` also writes the table as a results-table JSON (``docs/render.py``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.nn import functional as F

from fastflow import FastFlow
from fastflow.apps.result_tables import (
    add_table_json_option,
    markdown_row,
    markdown_table,
    table_record,
    write_table,
)
from fastflow.core.hardware import cpu_model
from fastflow.estimator.data import image_loader, load_samples
from fastflow.estimator.training import FLOW_PRECISIONS, TrainConfig
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import LITE0_WEIGHTS, anomalib_twin

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mvtec_ad" / "bottle"
BATCH = 32


def weights_of(backbone: str) -> str:
    return str(LITE0_WEIGHTS) if backbone == "tf_efficientnet_lite0" else "random"


def normalised_images(data: Path, size: int) -> torch.Tensor:
    """Every normal training image as anomalib's models take it: resized, ImageNet-normalised floats."""
    samples = [s for s in load_samples(data, "train") if s.label == 0]
    resize = lambda pixels: F.interpolate(pixels.float(), (size, size), mode="bilinear", antialias=True)
    pixels = torch.cat([resize(batch["image"]) for batch in image_loader(samples, (size, size), BATCH)])
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (pixels / 255 - mean) / std


def anomalib_model(backbone: str, size: tuple[int, int]) -> torch.nn.Module:
    """anomalib's ``FastflowModel`` for ``backbone`` at ``size``, in training mode, holding the
    weights of a plain (no positional condition) fastflow model: both anomalib timings train it."""
    plain = FastFlowModel(get_config(backbone, input_size=size, positional_channels=0), weights_of(backbone))
    return anomalib_twin(plain).train()


def time_anomalib(backbone: str, images: torch.Tensor, epochs: int) -> list[float]:
    """Seconds of each epoch of anomalib's training loop."""
    from anomalib.models.image.fastflow.loss import FastflowLoss

    model = anomalib_model(backbone, tuple(images.shape[-2:]))
    loss_of = FastflowLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in torch.randperm(len(images), generator=generator).split(BATCH):
            hidden, jacobians = model(images[batch])
            loss = loss_of(hidden, jacobians)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_anomalib_engine(backbone: str, data: Path, size: int, epochs: int) -> float:
    """Seconds of anomalib's ``Engine.fit`` of its ``Fastflow`` module, holding the same twin as ``time_anomalib``."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Fastflow

    module = Fastflow(
        pre_trained=False,
        visualizer=False,
        pre_processor=Fastflow.configure_pre_processor(image_size=(size, size)),
    )
    module.model = anomalib_model(backbone, (size, size))
    datamodule = MVTecAD(
        root=data.parent, category=data.name, train_batch_size=BATCH, eval_batch_size=BATCH, num_workers=2
    )
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            default_root_dir=folder,
            enable_progress_bar=False,
        )
        start = time.perf_counter()
        engine.fit(model=module, datamodule=datamodule)
        return time.perf_counter() - start


def time_fastflow(backbone: str, data: Path, size: int, epochs: int, precision: str) -> tuple[float, int]:
    """Seconds of a whole ``fit`` with the flows trained in ``precision``, and the number of images it trained on."""
    training = TrainConfig(max_epochs=epochs, patience=epochs, batch_size=BATCH, flow_precision=precision)
    detector = FastFlow(
        backbone, weights=weights_of(backbone), training=training, architecture={"input_size": (size, size)}
    )
    start = time.perf_counter()
    detector.fit(data)
    seconds = time.perf_counter() - start
    assert len(detector.history_) == epochs, "fit stopped early: the rates would not compare equal epochs"
    return seconds, len(detector.decision_scores_)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbone", action="append", help="repeatable; default resnet18 and tf_efficientnet_lite0"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--flow-precision", nargs="+", default=["float32", "bfloat16"], choices=FLOW_PRECISIONS
    )
    parser.add_argument("--data", type=Path, default=BOTTLE, help="dataset folder (normal training images)")
    parser.add_argument(
        "--anomalib-engine",
        action="store_true",
        help="also time anomalib's Engine.fit (needs --data in the MVTec AD layout)",
    )
    add_table_json_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; command: python {shlex.join(sys.argv)}")
    images = normalised_images(args.data, args.size)
    setting = f"{len(images)} normal images from {args.data}, {args.size}x{args.size}, batch {BATCH}, {args.epochs} epochs"
    print(f"{setting}\n")
    columns = [
        "backbone",
        "trainer",
        "seconds (whole run)",
        "seconds per epoch",
        "training images/s",
        "vs anomalib loop",
        "vs anomalib Engine.fit",
    ]
    print(markdown_table(columns, []))
    rows: list[list[str]] = []

    def row(
        backbone: str, trainer: str, seconds: float, rate: float, reference: float, engine: float | None
    ) -> None:
        versus_engine = f"{rate / engine:.2f}x" if engine else ""
        rows.append(
            [
                backbone,
                trainer,
                f"{seconds:.1f}",
                f"{seconds / args.epochs:.1f}",
                f"{rate:.1f}",
                f"{rate / reference:.2f}x",
                versus_engine,
            ]
        )
        print(markdown_row(rows[-1]), flush=True)

    for backbone in args.backbone or ["resnet18", "tf_efficientnet_lite0"]:
        per_epoch = time_anomalib(backbone, images, args.epochs)
        reference = len(images) * args.epochs / sum(per_epoch)
        engine_seconds = (
            time_anomalib_engine(backbone, args.data, args.size, args.epochs)
            if args.anomalib_engine
            else None
        )
        engine = len(images) * args.epochs / engine_seconds if engine_seconds else None
        row(backbone, "anomalib FastflowModel loop", sum(per_epoch), reference, reference, engine)
        if engine_seconds:
            row(backbone, "anomalib Engine.fit", engine_seconds, engine, reference, engine)
        for precision in args.flow_precision:
            seconds, holdout = time_fastflow(backbone, args.data, args.size, args.epochs, precision)
            rate = (len(images) - holdout) * args.epochs / seconds
            row(
                backbone,
                f"fastflow fit (improved recipe, flows {precision})",
                seconds,
                rate,
                reference,
                engine,
            )
    if args.table_json:
        title = f"Training speed: fastflow fit against anomalib's FastflowModel training ({setting})"
        notes = f"{torch.get_num_threads()} threads, torch {torch.__version__}."
        write_table(args.table_json, table_record(title, columns, rows, notes=notes))


if __name__ == "__main__":
    main()
