"""``fastflow train`` over several datasets: one run folder each, trained one after another or in
worker processes, every folder checked before any training starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_RESNET_ARGS, make_folder_dataset

from fastflow.apps.cli import main
from fastflow.estimator.detector import FastFlow

TINY = [
    *TINY_RESNET_ARGS,
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--flow-precision",
    "float32",
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [
        make_folder_dataset(root / name, n_normal=10, n_anomalous=2, seed=seed)
        for seed, name in enumerate(("screws", "nuts"))
    ]


def _train(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["train", *map(str, args), *TINY])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_two_datasets_in_two_workers_train_the_models_each_alone_gives(
    datasets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _train(capsys, *datasets, "-o", tmp_path / "both", "--jobs", 2)
    assert code == 0, err
    assert out.count("saved ") == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of two workers on two cores, so the arithmetic is the same
    try:
        for data in datasets:
            assert _train(capsys, data, "-o", tmp_path / "alone" / data.name)[0] == 0
    finally:
        torch.set_num_threads(threads)
    for data in datasets:
        run = tmp_path / "both" / data.name
        assert (run / "history.json").is_file() and (run / "last.safetensors").is_file()
        together, alone = (
            load_file(folder / "model.safetensors") for folder in (run, tmp_path / "alone" / data.name)
        )
        assert together.keys() == alone.keys()
        assert max((together[k].double() - alone[k].double()).abs().max().item() for k in together) <= 1e-6
        assert FastFlow.load(run).decision_function(data).shape == (12,)


def test_one_dataset_still_writes_its_run_into_output_itself(
    datasets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _train(capsys, datasets[0], "-o", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "model.safetensors").is_file() and out.count("saved ") == 1


def test_datasets_with_the_same_folder_name_are_an_error(
    datasets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    twin = make_folder_dataset(tmp_path / "elsewhere" / datasets[0].name, n_normal=4, n_anomalous=1)
    code, _, err = _train(capsys, datasets[0], twin, "-o", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "would both train into" in err
    assert not (tmp_path / "out").exists()


def test_every_run_folder_is_checked_before_any_run_trains(
    datasets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "out" / datasets[1].name
    taken.mkdir(parents=True)
    (taken / "model.safetensors").write_bytes(b"an earlier run")
    code, _, err = _train(capsys, *datasets, "-o", tmp_path / "out")
    assert code == 2 and "already holds a run" in err and str(taken) in err
    assert not (tmp_path / "out" / datasets[0].name).exists()
    assert (taken / "model.safetensors").read_bytes() == b"an earlier run"


def test_several_datasets_under_torchrun_are_an_error(
    datasets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _train(capsys, *datasets, "-o", tmp_path / "out")
    assert code == 2 and "one dataset at a time" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("processes", "world_size", "message"),
    [
        (0, None, "--processes must be at least 1, got 0"),
        (3, "2", "--processes 3 under torchrun, which started 2; leave --processes out"),
    ],
)
def test_a_bad_process_count_is_an_error_before_any_process_starts(
    datasets: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    processes: int,
    world_size: str | None,
    message: str,
) -> None:
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    code, _, err = _train(capsys, datasets[0], "-o", tmp_path / "out", "--processes", processes)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_several_datasets_with_processes_are_an_error(
    datasets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _train(capsys, *datasets, "-o", tmp_path / "out", "--processes", 2)
    assert code == 2 and "one dataset at a time" in err and "--jobs" in err
    assert not (tmp_path / "out").exists()
