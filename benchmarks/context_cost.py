"""Inference cost of the context options (``FastFlowConfig.context_pool``, ``fuse_scales``,
``positional_channels``), side by side in one run against the model without them.

    python benchmarks/context_cost.py                       # Lite0 at 256, batch 16 and batch 1
    python benchmarks/context_cost.py --backbone resnet18 --rounds 5

Each variant is a Lite0 (shared ImageNet weights) or random-backbone model with its norms and
flows perturbed to look trained (``inference.perturbed_model``), folded into its inference
graph, and timed on the PyTorch fp32 engine (``fastflow predict``'s default for a few images)
and ONNX Runtime fp32 (its fastest exact engine), interleaved over ``--rounds`` rounds; the best
round counts. Prints img/s at ``--batch``, batch-1 latency, and each as a ratio to the plain model;
``--table-json PATH`` also writes that table as a results-table JSON (``docs/render.py``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see inference.py)

import torch
from inference import best_of_rounds, measure, perturbed_model, smooth_pixels, torch_runner

from fastflow import FastFlow
from fastflow.apps.result_tables import add_table_json_option, markdown_table, table_record, write_table
from fastflow.core.hardware import cpu_model, physical_cores
from fastflow.estimator.engines import OnnxRuntimeEngine
from fastflow.estimator.export import to_onnx

VARIANTS: dict[str, dict] = {
    "plain (paper)": {},
    "pool3": {"context_pool": 3},
    "pool5": {"context_pool": 5},
    "pos16": {"positional_channels": 16},
    "pool3+pos16": {"context_pool": 3, "positional_channels": 16},
    "fuse (layers 1-3 on 64x64)": {"fuse_scales": True},
    "fuse (layers 2-3 on 32x32)": {"fuse_scales": True, "layers": (2, 3)},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    add_table_json_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(physical_cores())
    pixels = smooth_pixels(args.batch, args.size).numpy()
    names = args.variants.split(",")
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(names):
            model = perturbed_model(args.backbone, args.size, **VARIANTS[name])
            graph = FastFlow.from_model(model, threshold=-0.5, map_floor=-0.6).inference_graph()
            torch_run = torch_runner(graph)
            onnx_run = OnnxRuntimeEngine(to_onnx(graph, Path(tmp) / str(index)), physical_cores())
            configs[name, "torch fp32"] = (torch_run, torch_run, "pixels")
            configs[name, "onnxruntime fp32"] = (onnx_run, onnx_run, "pixels")
        for (
            run,
            _,
            _,
        ) in configs.values():  # a discarded round: first calls pay for allocations and kernel choice
            measure(run, pixels, 0.2)
        best = best_of_rounds(configs, {"pixels": pixels}, args.rounds, args.seconds)
    title = f"Inference cost of the context options: {args.backbone} at {args.size}x{args.size}"
    columns = ["variant", "engine", f"img/s (batch {args.batch})", "vs plain", "batch-1 ms", "vs plain"]
    align = ["", "", "right", "right", "right", "right"]
    rows = []
    for (name, engine), (speed, latency) in best.items():
        plain_speed, plain_latency = best[names[0], engine]
        rows.append(
            [
                name,
                engine,
                f"{speed:.1f}",
                f"{plain_speed / speed:.2f}x time",
                f"{latency:.1f}",
                f"{latency / plain_latency:.2f}x",
            ]
        )
    print(f"\n### {title}\n")
    print(markdown_table(columns, rows, align))
    notes = f"torch {torch.__version__}; ratios are time per image against '{names[0]}', measured in this run"
    print(f"\nCPU: {cpu_model()}, {physical_cores()} physical cores, {notes}")
    if args.table_json:
        write_table(args.table_json, table_record(title, columns, rows, align=align, notes=notes))


if __name__ == "__main__":
    main()
