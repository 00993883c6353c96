"""Robustness benchmark: a trained model's test scores under changes no inspector could see.

    python benchmarks/robustness.py RUN DATA [--json out.json] [--perturbations noise1,noise2,...]
    python benchmarks/robustness.py RUN DATA --engine openvino --precision bf16 --perturbations noise1,...

RUN is a run folder or ``model.safetensors``, DATA an MVTec-layout dataset folder (its test
split). The perturbations, the rows and the drift are ``fastflow.apps.robustness``'s (its docstring
lists them); ``fastflow test RUN DATA --robustness`` prints the same table. This script adds the
CPU model and the command line, which a documentation table needs beside its figures, and
``--table-json PATH`` writes the table with them as a results-table JSON (``docs/render.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

# Before torch loads OpenMP: worker threads sleep at barriers instead of spinning, which matters
# on a machine shared with other jobs (see benchmarks/inference.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from fastflow import FastFlow
from fastflow.apps.result_tables import add_table_json_option, table_record, write_table
from fastflow.apps.robustness import (
    PERTURBATIONS,
    TABLE_ALIGN,
    TABLE_COLUMNS,
    markdown_table,
    measure,
    perturbation_names,
    table_rows,
)
from fastflow.core.errors import FastFlowError
from fastflow.core.hardware import cpu_model, physical_cores
from fastflow.estimator.data import load_samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="run folder or model.safetensors")
    parser.add_argument("data", type=Path, help="MVTec-layout dataset folder (its test split is scored)")
    parser.add_argument("--json", type=Path)
    add_table_json_option(parser)
    parser.add_argument(
        "--perturbations",
        default=",".join(PERTURBATIONS),
        help=f"comma-separated, of {', '.join(PERTURBATIONS)}; clean is always run first",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pixel noise")
    parser.add_argument(
        "--engine",
        choices=("torch", "onnx", "openvino"),
        help="score with this engine (pixel changes only); default: the float32 PyTorch graph",
    )
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16"), help="the engine's precision")
    args = parser.parse_args()
    try:
        names = perturbation_names(args.perturbations)
    except FastFlowError as error:
        parser.error(str(error))
    torch.set_num_threads(physical_cores())
    detector = FastFlow.load(args.run)
    samples = load_samples(args.data, "test")
    engine = detector.engine(args.engine, args.precision) if args.engine else None
    rows = measure(detector, samples, names, args.seed, engine)
    title = f"Robustness on {args.data} ({len(samples)} test images), model {args.run}"
    print(f"\n### {title}\n")
    print(markdown_table(rows))
    print(f"\nCPU: {cpu_model()}, {physical_cores()} physical cores, torch {torch.__version__}")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.table_json:
        engine_text = f"{args.engine} {args.precision}" if args.engine else "the float32 PyTorch graph"
        notes = f"Scored with {engine_text}; pixel-noise seed {args.seed}; torch {torch.__version__}."
        write_table(
            args.table_json,
            table_record(title, TABLE_COLUMNS, table_rows(rows), align=TABLE_ALIGN, notes=notes),
        )


if __name__ == "__main__":
    main()
