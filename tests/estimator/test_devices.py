"""Training devices: which device a name means on this machine, the errors where it has none, and
(on a machine with a CUDA GPU) that a model trained there scores as one trained on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support import TINY_RESNET_ARGS, make_folder_dataset

import fastflow.apps.benchmark
import fastflow.apps.workers
from fastflow.apps.cli import main
from fastflow.apps.workers import worker_devices
from fastflow.core.errors import FastFlowError
from fastflow.core.hardware import resolve_device
from fastflow.estimator.detector import FastFlow
from fastflow.estimator.feature_cache import FeatureCache
from fastflow.estimator.training import BatchNll, TrainConfig, _training_batch, channel_noise_scales
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch reports two CUDA GPUs (nothing here touches one: only the names are resolved)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_is_the_cpu_without_a_gpu_and_a_gpu_per_torchrun_process_with_them(
    no_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's fourth process on a 2-GPU machine
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_this_machine_lacks_is_a_one_line_error_naming_the_fix(no_gpu: None) -> None:
    with pytest.raises(
        FastFlowError, match=r"--device cuda: PyTorch sees no CUDA GPU.*use --device cpu or auto"
    ):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_names_the_gpus_there_are(two_gpus: None) -> None:
    with pytest.raises(
        FastFlowError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"
    ):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:a", "CPU", "", "mps"])
def test_device_names_are_checked_when_the_settings_are_made(name: str) -> None:
    with pytest.raises(FastFlowError, match=r"device \(--device\) must be auto, cpu, cuda or cuda:N"):
        TrainConfig(device=name)
    with pytest.raises(FastFlowError, match="bad --device"):
        resolve_device(name)


def test_a_saved_gpu_device_does_not_stop_the_model_loading_on_a_cpu(no_gpu: None) -> None:
    """Only the spelling is checked with the settings; the device itself only when training."""
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def _train_tiny(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[int, list[str], Path]:
    """``fastflow train`` of a tiny random model with ``flags``: exit code, stderr lines, run folder."""
    data = make_folder_dataset(tmp_path / "data", n_normal=6, n_anomalous=1)
    run = tmp_path / "run"
    code = main(["train", str(data), "-o", str(run), *TINY_RESNET_ARGS, *flags])
    return code, capsys.readouterr().err.strip().splitlines(), run


def test_train_asking_for_a_missing_gpu_stops_before_any_file(
    no_gpu: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, run = _train_tiny(tmp_path, capsys, "--device", "cuda")
    assert code == 2 and len(err) == 1 and "--device cuda" in err[0] and "--device cpu" in err[0]
    assert not run.exists()


@pytest.mark.parametrize(
    ("device", "processes", "message"),
    [
        ("cuda:1", 2, "--device cuda:1 puts every process on one GPU"),
        ("cuda", 3, "--processes 3 on 2 GPU(s): NCCL needs one GPU a process"),
    ],
)
def test_train_processes_that_would_share_a_gpu_stop_before_any_file(
    two_gpus: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    device: str,
    processes: int,
    message: str,
) -> None:
    code, err, run = _train_tiny(tmp_path, capsys, "--device", device, "--processes", str(processes))
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not run.exists()


def test_benchmark_asking_for_a_missing_gpu_stops_before_any_run(
    no_gpu: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "bench"
    code = main(
        [
            "benchmark",
            "textures",
            "-o",
            str(output),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--device",
            "cuda:0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device cuda:0" in err[0]
    assert not output.exists()  # not even the built-in dataset was generated


def test_benchmark_workers_take_the_gpus_in_turn(two_gpus: None) -> None:
    assert worker_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]  # the user's choice stands
    assert worker_devices("cpu", 2) == ["cpu", "cpu"]


def test_benchmark_workers_all_train_on_the_cpu_without_gpus(no_gpu: None) -> None:
    assert [resolve_device(d) for d in worker_devices("auto", 2)] == [torch.device("cpu")] * 2
    with pytest.raises(FastFlowError, match="--device cuda"):
        worker_devices("cuda", 2)


def test_a_worker_trains_on_the_device_it_was_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``_worker_setup`` takes the next device from the queue, and the detector the worker then
    builds for a task trains there (with the task's seed), whatever device the task named."""
    from queue import SimpleQueue

    devices: SimpleQueue[str] = SimpleQueue()
    devices.put("cuda:1")
    monkeypatch.setattr(
        fastflow.apps.workers.sys, "stderr", fastflow.apps.workers.sys.stderr
    )  # restored after
    monkeypatch.setattr(fastflow.apps.workers, "_worker_device", None)
    try:
        fastflow.apps.workers._worker_setup(torch.get_num_threads(), devices)
    finally:
        fastflow.apps.workers.sys.stderr.close()

    built: list[TrainConfig] = []

    class Built(Exception):
        pass

    def record(*args: object, training: TrainConfig, **kwargs: object) -> None:
        built.append(training)
        raise Built

    monkeypatch.setattr(fastflow.apps.benchmark, "FastFlow", record)
    task = fastflow.apps.benchmark._Task(
        tmp_path, "resnet18", "improved", 3, "random", TrainConfig(device="auto"), (), {}
    )
    with pytest.raises(Built):
        fastflow.apps.benchmark._train_and_test(task)
    assert [(t.device, t.seed) for t in built] == [("cuda:1", 3)]


def test_a_training_step_runs_wholly_on_the_models_device() -> None:
    """The meta device stands in for a GPU on a CPU-only machine: its tensors have no values, but
    an elementwise op mixing one with a CPU tensor fails as it would on a GPU. Pre-processing,
    backbone, a batch from the CPU-side caches with both kinds of training noise, the exact NLL
    with the positional condition and its backward all stay on the model's device."""
    meta = torch.device("meta")
    model = FastFlowModel(get_config("resnet18", input_size=(64, 64), positional_channels=16), "random")
    generator = torch.Generator().manual_seed(0)
    clean, noisy = (
        FeatureCache.of([torch.randn(6, *shape, generator=generator) for shape in model.feature_shapes])
        for _ in range(2)
    )
    model.to(meta)
    features = model.extract(torch.zeros(2, 3, 80, 70, dtype=torch.uint8, device=meta))
    assert [f.device for f in features] == [meta] * 3
    batch = _training_batch(torch.arange(4), clean, noisy, channel_noise_scales(clean, 0.1), generator, meta)
    assert [f.device for f in batch] == [meta] * 3 and [f.shape[0] for f in batch] == [4] * 3
    loss = BatchNll(model, exact=True)(batch)
    loss.backward()
    trained = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    assert loss.device == meta and all(p.grad is not None and p.grad.device == meta for p in trained)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_trained_on_the_gpu_scores_as_one_trained_on_the_cpu(tmp_path: Path) -> None:
    """Same seed, same batches and noise (drawn on the CPU), float32 flows: only the kernels'
    rounding differs, so the held-out scores agree closely and the model comes back on the CPU."""
    data = make_folder_dataset(tmp_path / "data", n_normal=24, n_anomalous=4)
    scores = {}
    for device in ("cpu", "cuda"):
        training = TrainConfig(max_epochs=3, batch_size=8, flow_precision="float32", device=device)
        detector = FastFlow(
            "resnet18", weights="random", training=training, architecture={"input_size": (64, 64)}
        ).fit(data)
        assert next(detector.model_.parameters()).device.type == "cpu"
        scores[device] = detector.decision_function(data)
    assert np.allclose(scores["cuda"], scores["cpu"], rtol=1e-3, atol=1e-3)
