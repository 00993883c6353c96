"""Seams and cost of tiling (``FastFlowConfig.tile``) at a realistic size, against the same
model run on the whole image at once.

    python benchmarks/tiling_seams.py                                  # Lite0, 512x768, tile 256
    python benchmarks/tiling_seams.py --size 480x1184 --overlaps 0,64,128

For each overlap: the tiles per image, the pixels the backbone sees as a multiple of the
image's, the seam (``support.tile_seam_ratio``: how far the tiled map strays, within 4 px of a
tile border, from the untiled map, as a share of a normal map's spread) on a uniform grey image
and on a fine noise texture, and the PyTorch time of one image, tiled and untiled. The model is
Lite0 with the shared ImageNet weights and flows perturbed to look trained
(``support.perturb_trainable``); overlap 0 on a size that the tiles divide has hard edges.
``--table-json PATH`` also writes the table as a results-table JSON (``docs/render.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from fastflow.apps.result_tables import (
    add_table_json_option,
    markdown_row,
    markdown_table,
    table_record,
    write_table,
)
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import perturb_trainable, tile_seam_ratio

LITE0_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
)


def seconds_per_image(model: FastFlowModel, image: torch.Tensor, rounds: int) -> float:
    """Best of ``rounds`` timed calls, after one untimed call."""
    best = float("inf")
    with torch.no_grad():
        model(image)
        for _ in range(rounds):
            start = time.perf_counter()
            model(image)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", default=str(LITE0_WEIGHTS))
    parser.add_argument("--size", default="512x768", help="HEIGHTxWIDTH, multiples of 32")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlaps", default="0,64,128")
    parser.add_argument("--rounds", type=int, default=3)
    add_table_json_option(parser)
    args = parser.parse_args()
    height, width = (int(side) for side in args.size.lower().split("x"))
    config = get_config("tf_efficientnet_lite0", input_size=(height, width), positional_channels=16)
    untiled = FastFlowModel(config, args.weights).eval()
    perturb_trainable(untiled, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    texture = (108 + 40 * torch.rand(1, 3, height, width, generator=generator)).round().to(torch.uint8)
    grey = torch.full((1, 3, height, width), 128, dtype=torch.uint8)
    whole_time = seconds_per_image(untiled, texture, args.rounds)
    title = f"Tiling: Lite0 at {height}x{width}, tiles of {args.tile} px (untiled: {whole_time:.2f} s/image)"
    print(f"\n### {title}\n")
    columns = ["overlap", "tiles", "backbone pixels", "seam, grey", "seam, texture", "s/image", "vs untiled"]
    align = ["right"] * len(columns)
    print(markdown_table(columns, [], align))
    rows = []
    for overlap in (int(text) for text in args.overlaps.split(",")):
        tiled = FastFlowModel(dataclasses.replace(config, tile=args.tile, tile_overlap=overlap), args.weights)
        tiled.load_state_dict(untiled.state_dict())
        tiled.eval()
        assert tiled.tiles is not None
        pixels = tiled.tiles.count * args.tile**2 / (height * width)
        seams = [tile_seam_ratio(untiled, tiled, image, texture) for image in (grey, texture)]
        tiled_time = seconds_per_image(tiled, texture, args.rounds)
        rows.append(
            [
                f"{overlap}",
                f"{tiled.tiles.count}",
                f"{pixels:.2f}x",
                f"{seams[0]:.3f}",
                f"{seams[1]:.3f}",
                f"{tiled_time:.2f}",
                f"{tiled_time / whole_time:.2f}x",
            ]
        )
        print(markdown_row(rows[-1]), flush=True)
    if args.table_json:
        notes = f"Best of {args.rounds} timed calls per image; torch {torch.__version__}."
        write_table(args.table_json, table_record(title, columns, rows, align=align, notes=notes))


if __name__ == "__main__":
    main()
