"""Data-parallel training: 2 gloo processes, under torchrun or ``train --processes 2``, train the model 1 process trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support import TINY_RESNET_ARGS, make_folder_dataset

from fastflow.apps.cli import main
from fastflow.core.errors import FastFlowError
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.distributed import _failure_line, check_process_count

# Same global batches, same noise: only the order of floating-point sums differs (DDP adds the
# ranks' gradients), which after 2 epochs moved no weight by more than 5e-6 when this was written.
WEIGHT_TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ARGS = [
    *TINY_RESNET_ARGS,
    "--epochs",
    "2",
    "--batch-size",
    "5",
    "--seed",
    "0",
    "--flow-precision",
    "float32",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("ddp") / "data", n_normal=20, n_anomalous=4)


@pytest.fixture(scope="module")
def one_process(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run a single process trains, which the data-parallel runs must equal."""
    # Batch 5 over 18 training images: shares of 3 + 2 and a last batch of 3 = 2 + 1, so the
    # weighting of uneven shares is exercised. float32 flows: the claim is about the
    # data-parallel split, not about bf16 rounding.
    output = tmp_path_factory.mktemp("ddp") / "one"
    assert main(["train", str(data), *ARGS, "--output", str(output)]) == 0
    return output


def _assert_same_model(data: Path, one: Path, two: Path) -> None:
    """Same weights, held-out NLL per epoch, threshold and scores, within the stated tolerances."""
    first_weights, second_weights = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    worst = max(
        (first_weights[k].double() - second_weights[k].double()).abs().max().item() for k in first_weights
    )
    assert worst <= WEIGHT_TOLERANCE
    first, second = (json.loads((run / "history.json").read_text()) for run in (one, two))
    assert [h["epoch"] for h in first] == [h["epoch"] for h in second] == [1, 2]
    for a, b in zip(first, second, strict=True):
        assert b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-5)

    images = sorted((data / "anomalous").iterdir())[:3] + sorted((data / "normal").iterdir())[:3]
    single, parallel = FastFlow.load(one), FastFlow.load(two)
    assert parallel.threshold_ == pytest.approx(single.threshold_, rel=1e-4)
    np.testing.assert_allclose(
        parallel.decision_function(images), single.decision_function(images), rtol=1e-4
    )


def test_two_gloo_processes_under_torchrun_equal_one_process(
    data: Path, one_process: Path, tmp_path: Path
) -> None:
    # The 2-process run keeps its cache on disk, shared.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "fastflow",
        "train",
        str(data),
        *ARGS,
        "--output",
        str(tmp_path / "two"),
        "--max-memory",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone writes and logs.
    assert done.stderr.count("on disk") == 1 and done.stdout.count("saved ") == 1
    assert not any((tmp_path / "cache").iterdir())  # the shared cache was removed
    _assert_same_model(data, one_process, tmp_path / "two")


def test_processes_option_launches_what_torchrun_does(
    data: Path, one_process: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # In-process, as a user's shell runs it: the launcher starts the 2 processes (RAM cache, summed).
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    assert main(["train", str(data), *ARGS, "--output", str(tmp_path / "two"), "--processes", "2"]) == 0
    assert {number: signal.getsignal(number) for number in handlers} == handlers  # the launcher's are gone
    out, err = capfd.readouterr()
    assert out.count("saved ") == 1 and err.count("in RAM") == 1 and "Grad strides" not in err
    _assert_same_model(data, one_process, tmp_path / "two")


def test_a_failing_process_is_one_error_line_and_writes_nothing(
    data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    corrupt = sorted((broken / "normal").iterdir())[2]
    corrupt.write_bytes(b"not an image")
    code = main(["train", str(broken), *ARGS, "--output", str(tmp_path / "run"), "--processes", "2"])
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and any(
        line.startswith("error: corrupt image") and str(corrupt) in line for line in lines[:-1]
    )
    assert "Traceback" not in err
    # Each process decodes its own share, then every process raises the error of the share that
    # held the corrupt image. Either may exit first; the launcher may then stop the other, which
    # the line does not count as failing (a negative, signal exit status).
    last = lines[-1]
    assert last.startswith("error: training process ") and " of 2 failed" in last and "(exit 2)" in last
    assert "(exit -" not in last and last.endswith("the error lines above say why")
    assert not (tmp_path / "run").exists()


def test_the_failure_line_names_the_processes_that_failed_not_those_stopped_after() -> None:
    failed, stopped = SimpleNamespace(local_rank=1, exitcode=2), SimpleNamespace(local_rank=0, exitcode=-15)
    assert _failure_line([stopped, failed], 2) == (
        "training process 1 (exit 2) of 2 failed; the launcher stopped the others; the error lines above say why"
    )
    both = [SimpleNamespace(local_rank=1, exitcode=2), SimpleNamespace(local_rank=0, exitcode=1)]
    assert (
        _failure_line(both, 2)
        == "training process 0 (exit 1), 1 (exit 2) of 2 failed; the error lines above say why"
    )
    killed = [SimpleNamespace(local_rank=0, exitcode=-9)]  # nothing failed by itself: say what happened
    assert _failure_line(killed, 2).startswith("training process 0 (exit -9) of 2 failed")


CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("processes", "datasets", "device", "resolved", "world_size", "launch"),
    [
        (1, 1, "auto", CPU, None, False),  # one process: nothing to launch
        (2, 1, "cpu", CPU, None, True),  # this process launches the others
        (2, 1, "auto", CPU, "2", False),  # torchrun started them: run as one of them
        (1, 1, "auto", CPU, "2", False),  # under torchrun, --processes left out
        (3, 5, "auto", CPU, None, None),  # several datasets
        (1, 2, "auto", CPU, "2", None),  # several datasets under torchrun
        (0, 1, "auto", CPU, None, None),
        (3, 1, "auto", CPU, "2", None),  # another count than torchrun's
        (2, 1, "cuda:1", GPU, None, None),  # every process on one GPU
        (3, 1, "cuda", GPU, None, None),  # more processes than the 2 GPUs
        (2, 1, "cuda", GPU, None, True),
    ],
)
def test_check_process_count(
    monkeypatch: pytest.MonkeyPatch,
    processes: int,
    datasets: int,
    device: str,
    resolved: torch.device,
    world_size: str | None,
    launch: bool | None,
) -> None:
    """What ``train --processes`` checks, from Python: whether to launch, or a one-line error."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    if launch is None:
        with pytest.raises(FastFlowError, match="--processes|--device|one dataset at a time") as error:
            check_process_count(processes, datasets, device, resolved)
        assert "\n" not in str(error.value)
    else:
        assert check_process_count(processes, datasets, device, resolved) is launch
