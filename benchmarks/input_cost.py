"""Cost per image at each input size (and tiling), against the 256x256 square, in one run.

    python benchmarks/input_cost.py                     # the sizes the real-data study compares
    python benchmarks/input_cost.py --sizes 256x256,512x512,512x768@256/64 --rounds 5

A size is ``HEIGHTxWIDTH``, or ``HEIGHTxWIDTH@TILE/OVERLAP`` for a tiled model. Every model is
Lite0 with the shared ImageNet weights, the default recipe's architecture (16-channel positional
condition) and flows perturbed to look trained (``support.perturb_trainable``), so the time is
the deployed graph's (``InferenceGraph`` of the folded model): pre-processing, backbone, flows,
map and score of one image (batch 1, PyTorch float32).
The sizes are measured interleaved, ``--rounds`` times, and each row shows its best round (another
process on the machine only ever slows a round down) and its ratio to the first size.
``--table-json PATH`` also writes the table as a results-table JSON (``docs/render.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastflow.apps.result_tables import add_table_json_option, markdown_table, table_record, write_table
from fastflow.core.hardware import cpu_model, physical_cores
from fastflow.model.config import get_config, get_recipe
from fastflow.model.fastflow import FastFlowModel
from fastflow.model.inference import InferenceGraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import perturb_trainable

LITE0_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
)
# 256x256: the square preset; 160x416: the same pixels at small_defects' aspect (what the default
# picks for it); 256x640 and 480x1184: that aspect at 2.5x and 8.7x the pixels; the last, tiled.
DEFAULT_SIZES = "256x256,160x416,256x640,480x1184,480x1184@256/64"


def parse_size(text: str) -> tuple[int, int, int, int]:
    """``HxW`` or ``HxW@TILE/OVERLAP`` -> (height, width, tile, overlap)."""
    shape, _, tiling = text.partition("@")
    height, width = (int(side) for side in shape.lower().split("x"))
    tile, _, overlap = tiling.partition("/")
    return height, width, int(tile or 0), int(overlap or 0)


def build(size: tuple[int, int, int, int], weights: str) -> InferenceGraph:
    """The deployed graph (folded flows, the default recipe's map and score) at ``size``."""
    height, width, tile, overlap = size
    config = get_config(
        "tf_efficientnet_lite0",
        input_size=(height, width),
        positional_channels=16,
        tile=tile,
        tile_overlap=overlap,
    )
    model = FastFlowModel(config, weights).eval()
    perturb_trainable(model, torch.Generator().manual_seed(0))
    return InferenceGraph(model.fold(), get_recipe("improved"), 0.0).eval()


def seconds(model: InferenceGraph, image: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(image)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=str(LITE0_WEIGHTS))
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--rounds", type=int, default=5)
    add_table_json_option(parser)
    args = parser.parse_args()
    names = args.sizes.split(",")
    sizes = [parse_size(name) for name in names]
    models = [build(size, args.weights) for size in sizes]
    images = [torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8) for h, w, _, _ in sizes]
    for model, image in zip(models, images):
        seconds(model, image)  # warm-up: first-call allocations and kernel choice
    best = [float("inf")] * len(models)
    for _ in range(args.rounds):
        for index, (model, image) in enumerate(zip(models, images)):
            best[index] = min(best[index], seconds(model, image))
    print(
        f"{cpu_model()}, {physical_cores()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    columns = ["input", "pixels (vs first)", "ms per image", "time (vs first)"]
    rows = []
    for name, (h, w, _, _), value in zip(names, sizes, best):
        pixels = h * w / (sizes[0][0] * sizes[0][1])
        rows.append([name, f"{h * w:,} ({pixels:.2f}x)", f"{value * 1000:.0f}", f"{value / best[0]:.2f}x"])
    print(markdown_table(columns, rows))
    if args.table_json:
        title = (
            "Deployed-graph time per image at each input size, against the first (batch 1, PyTorch float32)"
        )
        notes = f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.rounds} rounds."
        write_table(args.table_json, table_record(title, columns, rows, notes=notes))


if __name__ == "__main__":
    main()
