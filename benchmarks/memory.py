"""Training memory: peak RSS of ``FastFlow.fit`` against the number of training images.

    python benchmarks/memory.py --backbone resnet18 --images 1000 3000 --epochs 2
    python benchmarks/memory.py --backbone resnet18 --images 1000 --max-memory 64GB   # the in-RAM cache

Generates N normal 256x256 texture images (once per N, under --data, default a temp folder),
then trains each (backbone, N) in a fresh child process, so each peak resident set size
(``ru_maxrss``) is that run's alone, and prints a markdown table: images, where the feature
cache went (the log line ``fit`` prints), cache size, peak RSS, and the peak's growth against
the first N (``--table-json PATH`` also writes it as a results-table JSON, ``docs/render.py``).
The backbone runs with random weights: memory does not depend on their values.
Defaults are the library's (improved recipe, batch 32, feature cache in RAM up to 1 GiB, or a
quarter of the available memory where less, else on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fastflow.estimator.training import TrainConfig


def make_images(folder: Path, count: int, size: int = 256) -> Path:
    """``count`` smooth random textures of ``size`` px (PNG) in ``folder/good``, reused if present."""
    good = folder / "good"
    if good.exists() and len(list(good.iterdir())) == count:
        return folder
    good.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        f = rng.uniform(4, 12, size=(3, 2))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        image = np.stack(
            [np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + phase[c]) for c in range(3)], axis=-1
        )
        image = 127.5 + 100 * image + rng.normal(0, 3, image.shape)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(good / f"{index:05d}.png")
    return folder


def child(args: argparse.Namespace) -> None:
    """One training run; prints one JSON line with its figures."""
    import logging

    from fastflow import FastFlow
    from fastflow.estimator.feature_cache import CacheConfig, parse_memory

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("fastflow")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    cache = CacheConfig(
        max_memory=None if args.max_memory is None else parse_memory(args.max_memory), dtype=args.cache_dtype
    )
    detector = FastFlow(
        args.backbone[0],
        weights="random",
        architecture={"input_size": (256, 256)},
        cache=cache,
        training=TrainConfig(
            max_epochs=args.epochs, patience=args.epochs, micro_batch_size=args.micro_batch_size
        ),
    )
    start = time.perf_counter()
    detector.fit(args.data)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "peak_rss": peak,
                "seconds": seconds,
                "cache": next((x for x in lines if "feature cache" in x), ""),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", action="append", help="repeatable; default resnet18")
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--max-memory", default=None, help="feature cache RAM budget (default: the library's)"
    )
    parser.add_argument("--cache-dtype", default="float32")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="images a pass (default: the library's automatic choice)",
    )
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fastflow-memory-images")
    from fastflow.apps.result_tables import add_table_json_option  # the child measures its own RSS

    add_table_json_option(parser)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from fastflow.apps.result_tables import (
        markdown_row,
        markdown_table,
        table_record,
        write_table,
    )
    from fastflow.core.hardware import cpu_model

    print(f"CPU: {cpu_model()}; {os.cpu_count()} logical cores; command: python {shlex.join(sys.argv)}")
    columns = ["backbone", "images", "feature cache", "peak RSS", "vs first", "train seconds"]
    print("\n" + markdown_table(columns, []))
    rows: list[list[str]] = []
    for backbone in args.backbone or ["resnet18"]:
        first = None
        for count in args.images:
            data = make_images(args.data / str(count), count)
            command = [
                sys.executable,
                __file__,
                "--child",
                "--backbone",
                backbone,
                "--epochs",
                str(args.epochs),
                "--cache-dtype",
                args.cache_dtype,
                "--data",
                str(data),
            ]
            if args.micro_batch_size is not None:
                command += ["--micro-batch-size", str(args.micro_batch_size)]
            if args.max_memory is not None:
                command += ["--max-memory", args.max_memory]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                rows.append(
                    [backbone, f"{count}", f"failed: {done.stderr.strip().splitlines()[-1:]}", "", "", ""]
                )
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                peak = result["peak_rss"] / 2**30
                first = first or peak
                rows.append(
                    [
                        backbone,
                        f"{count}",
                        result["cache"].removeprefix("feature cache: "),
                        f"{peak:.2f} GB",
                        f"{peak / first - 1:+.1%}",
                        f"{result['seconds']:.0f}",
                    ]
                )
            print(markdown_row(rows[-1]), flush=True)
    if args.table_json:
        title = f"Training memory: peak RSS against the number of training images, {args.epochs} epoch(s)"
        notes = f"Generated 256x256 images, random backbone weights, cache dtype {args.cache_dtype}."
        write_table(args.table_json, table_record(title, columns, rows, notes=notes))


if __name__ == "__main__":
    main()
