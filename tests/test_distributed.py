"""Data-parallel training: 2 gloo processes under torchrun train the model 1 process trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from support import make_folder_dataset

from fastflow.cli import main
from fastflow.detector import FastFlow

# Same global batches, same noise: only the order of floating-point sums differs (DDP adds the
# ranks' gradients), which after 2 epochs moved no weight by more than 5e-6 when this was written.
WEIGHT_TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("ddp") / "data", n_normal=20, n_anomalous=4)


def test_two_gloo_processes_equal_one_process(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Batch 5 over 18 training images: shares of 3 + 2 and a last batch of 3 = 2 + 1, so the
    # weighting of uneven shares is exercised; the 2-process run keeps its cache on disk, shared.
    # float32 flows: the claim is about the data-parallel split, not about bf16 rounding.
    args = ["train", str(data), "--backbone", "resnet18", "--weights", "random", "--input-size", "64",
            "--epochs", "2", "--batch-size", "5", "--seed", "0", "--flow-precision", "float32"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "fastflow", *args, "--output", str(tmp_path / "two"),
               "--max-memory", "0", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on disk" in done.stderr and done.stdout.count("saved ") == 1  # rank 0 alone writes

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    worst = max((one[k].double() - two[k].double()).abs().max().item() for k in one)
    assert worst <= WEIGHT_TOLERANCE
    first, second = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("one", "two"))
    assert [h["epoch"] for h in first] == [h["epoch"] for h in second] == [1, 2]
    for a, b in zip(first, second, strict=True):
        assert b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-5)
    assert not any((tmp_path / "cache").iterdir())  # the shared cache was removed

    images = sorted((data / "anomalous").iterdir())[:3] + sorted((data / "normal").iterdir())[:3]
    single, parallel = FastFlow.load(tmp_path / "one"), FastFlow.load(tmp_path / "two")
    assert parallel.threshold_ == pytest.approx(single.threshold_, rel=1e-4)
    np.testing.assert_allclose(parallel.decision_function(images), single.decision_function(images), rtol=1e-4)
