"""Benchmark tables: the markdown layout and averages, the table JSON, and one tiny real run."""

from __future__ import annotations

import json

import pytest

from fastflow.apps import benchmark
from fastflow.apps.benchmark import (
    BUILTIN_DATASETS,
    KNN_REFERENCE,
    TABLE_METRICS,
    BenchmarkRun,
    markdown_tables,
    resolve_dataset,
    run_benchmark,
    write_table_json,
)
from fastflow.apps.result_tables import read_table, render_table
from fastflow.apps.synthetic import make_textures
from fastflow.core.errors import FastFlowError
from fastflow.core.hardware import cpu_model
from fastflow.estimator.training import TrainConfig


def _run(category, backbone, seed, value):
    keys = ("image_auroc", "pixel_auroc", "image_f1", "pixel_f1", "aupro")
    return BenchmarkRun(category, backbone, seed, {k: value for k in keys})


def test_tables_have_one_row_per_category_an_average_and_seed_spread():
    runs = [
        _run("bottle", "a", 0, 0.90),
        _run("bottle", "a", 1, 0.94),
        _run("cable", "a", 0, 0.80),
        _run("bottle", "b", 0, 1.00),
        _run("cable", "b", 0, 0.60),
    ]
    text = markdown_tables(runs)
    assert text.count("### ") == 5
    image_table = text.split("### Image AUROC")[1].split("###")[0]
    assert "| bottle | 0.920 (0.900-0.940) | 1.000 |" in image_table
    assert "| cable | 0.800 | 0.600 |" in image_table
    assert "| **Average** | 0.860 | 0.800 |" in image_table


def test_tiny_real_run_writes_one_json_per_run(tmp_path, lite0_weights):
    data = make_textures(tmp_path / "tex", n_train=10, n_test_good=3, n_test_defect=2, size=(64, 64))
    runs = run_benchmark(
        [data],
        ["tf_efficientnet_lite0"],
        tmp_path / "out",
        weights={"tf_efficientnet_lite0": lite0_weights},
        seeds=(0, 1),
        recipes=("reference", "improved"),
        training=TrainConfig(max_epochs=1, batch_size=8),
        input_size=(64, 64),
        robustness=["clean", "noise1"],
    )
    assert [(r.recipe, r.seed) for r in runs] == [
        ("reference", 0),
        ("reference", 1),
        ("improved", 0),
        ("improved", 1),
        (KNN_REFERENCE, 0),
    ]
    files = sorted((tmp_path / "out").glob("*.json"))
    knn_file = "tex__tf_efficientnet_lite0__knn_reference.json"
    assert [f.name for f in files] == sorted(
        [
            f"tex__tf_efficientnet_lite0__{recipe}__seed{seed}.json"
            for recipe in ("improved", "reference")
            for seed in (0, 1)
        ]
        + [knn_file]
    )
    record = json.loads(files[0].read_text())
    assert 0.0 <= record["metrics"]["image_auroc"] <= 1.0 and record["epochs"] == 1
    assert [row["perturbation"] for row in record["robustness"]] == ["clean", "noise1"]
    assert record["robustness"][0]["image_auroc"] == record["metrics"]["image_auroc"]
    tables = markdown_tables(runs)
    assert "tf_efficientnet_lite0 (reference)" in tables
    knn = json.loads((tmp_path / "out" / knn_file).read_text())["metrics"]
    assert knn["bank_positions"] == 10 * 8 * 8  # every position of the 10 training images
    assert f"tf_efficientnet_lite0 ({KNN_REFERENCE})" in tables.split("### Image AUROC")[1].split("###")[0]
    robustness = tables.split("### Robustness")[1].splitlines()
    assert (
        sum(line.startswith("| tex | tf_efficientnet_lite0") for line in robustness) == 4
    )  # 2 recipes x 2 changes


def test_recipes_get_their_own_columns():
    runs = [
        _run("bottle", "a", 0, 0.9),
        BenchmarkRun("bottle", "a", 0, {k: 0.99 for k in TABLE_METRICS}, "reference"),
    ]
    image_table = markdown_tables(runs).split("### Image AUROC")[1].split("###")[0]
    assert "| category | a | a (reference) |" in image_table
    assert "| bottle | 0.900 | 0.990 |" in image_table


def test_builtin_dataset_is_generated_once_under_the_output(tmp_path, monkeypatch):
    calls = []

    def tiny(root):
        calls.append(root)
        return make_textures(root, n_train=2, n_test_good=1, n_test_defect=1, size=(32, 32))

    monkeypatch.setitem(BUILTIN_DATASETS, "textures", tiny)
    first = resolve_dataset("textures", tmp_path)
    assert first == tmp_path / "data" / "textures" and (first / "train" / "good").is_dir()
    assert resolve_dataset("textures", tmp_path) == first and len(calls) == 1
    assert resolve_dataset(tmp_path / "elsewhere", tmp_path) == tmp_path / "elsewhere"


def test_two_jobs_give_the_runs_one_job_gives(tmp_path, lite0_weights):
    import pytest
    import torch

    data = make_textures(tmp_path / "tex", n_train=8, n_test_good=3, n_test_defect=2, size=(64, 64))
    kwargs = {
        "weights": {"tf_efficientnet_lite0": lite0_weights},
        "seeds": (0, 1),
        "training": TrainConfig(max_epochs=1, batch_size=4),
        "input_size": (64, 64),
        "knn_reference": False,  # computed in the main process, not by the workers
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of two workers on two cores, so the arithmetic is the same
    try:
        serial = run_benchmark([data], ["tf_efficientnet_lite0"], tmp_path / "one", jobs=1, **kwargs)
    finally:
        torch.set_num_threads(threads)
    parallel = run_benchmark([data], ["tf_efficientnet_lite0"], tmp_path / "two", jobs=2, **kwargs)
    assert [r.seed for r in parallel] == [0, 1]
    for one, two in zip(serial, parallel, strict=True):
        assert two.metrics == pytest.approx(one.metrics, abs=1e-6)
    assert sorted(f.name for f in (tmp_path / "two").glob("*.json")) == sorted(
        f.name for f in (tmp_path / "one").glob("*.json")
    )
    with pytest.raises(FastFlowError, match="--jobs"):
        run_benchmark([data], ["tf_efficientnet_lite0"], tmp_path / "bad", jobs=0, **kwargs)


def test_cli_benchmark_shows_the_knn_reference_unless_told_not_to(tmp_path, capsys):
    from fastflow.apps.cli import main

    data = make_textures(tmp_path / "tex", n_train=6, n_test_good=2, n_test_defect=2, size=(64, 64))
    common = ["--backbone", "resnet18", "--weights", "random", "--epochs", "1", "--input-size", "64"]
    assert main(["benchmark", str(data), "--output", str(tmp_path / "with"), *common]) == 0
    assert f"resnet18 ({KNN_REFERENCE})" in (tmp_path / "with" / "results.md").read_text()
    assert (tmp_path / "with" / "tex__resnet18__knn_reference.json").exists()
    assert (
        main(["benchmark", str(data), "--output", str(tmp_path / "without"), *common, "--no-knn-reference"])
        == 0
    )
    assert KNN_REFERENCE not in (tmp_path / "without" / "results.md").read_text()
    capsys.readouterr()


def test_every_run_counts_false_calls_and_escapes_at_each_target_rate(tmp_path, capsys):
    """40 training images hold out 4: enough for 0.5 (guaranteed 2/5), too few for 0.05 (the
    threshold is then their largest score, guaranteeing 1/5). A lower threshold flags more."""
    from fastflow.apps.cli import main

    data = make_textures(tmp_path / "tex", n_train=40, n_test_good=4, n_test_defect=2, size=(64, 64))
    runs = run_benchmark(
        [data],
        ["resnet18"],
        tmp_path / "out",
        weights={"resnet18": "random"},
        training=TrainConfig(max_epochs=1, batch_size=8),
        input_size=(64, 64),
        knn_reference=False,
        false_alarm_rates=(0.05, 0.5),
    )
    strict, loose = runs[0].false_calls
    assert (strict["target"], strict["calibration_images"], strict["too_few"]) == (0.05, 4, True)
    assert (loose["target"], loose["calibration_images"], loose["too_few"]) == (0.5, 4, False)
    assert strict["guaranteed"] == pytest.approx(1 / 5) and loose["guaranteed"] == pytest.approx(2 / 5)
    assert loose["threshold"] < strict["threshold"]
    assert strict["false_calls"]["total"] == 4 and strict["escapes"]["total"] == 6
    assert loose["false_calls"]["count"] >= strict["false_calls"]["count"]
    assert loose["escapes"]["count"] <= strict["escapes"]["count"]
    for row in (strict, loose):
        rate = row["false_calls"]
        assert rate["low"] <= rate["count"] / rate["total"] <= rate["high"]
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["false_calls"] == runs[0].false_calls
    table = markdown_tables(runs).split("### False calls and escapes at a target false-alarm rate")[1]
    calls = strict["false_calls"]
    # Beta(1, 4) and Beta(2, 3): where one calibration set's own rate lies with 95 % probability.
    assert strict["realised_low"] == pytest.approx(0.00631, abs=1e-5)
    assert strict["realised_high"] == pytest.approx(0.60236, abs=1e-5)
    assert (
        f"| tex | resnet18 | 0 | 0.05 | 4 | 20 % (too few) | 0.631-60.2 % | {calls['count']} of 4 (" in table
    )
    assert "| tex | resnet18 | 0 | 0.5 | 4 | 40 % | 6.76-80.6 % | " in table

    for bad in ("0,0.5", "often"):
        capsys.readouterr()
        code = main(["benchmark", str(data), "--output", str(tmp_path / "bad"), "--false-alarm-rates", bad])
        assert code == 2 and "--false-alarm-rates" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_knn_reference_sees_the_input_size_the_detector_was_fitted_at(tmp_path, monkeypatch):
    """On wide images the detector's input follows their aspect (160x416 for 46x113 images);
    the nearest-neighbour column must see the images at that size too, not the preset's square."""
    from fastflow.apps import benchmark

    data = make_textures(tmp_path / "wide", n_train=4, n_test_good=1, n_test_defect=1, size=(46, 113))
    fitted, knn = [], []
    evaluate = benchmark.evaluate_detector

    def evaluated(detector, root):
        fitted.append(detector.config_.input_size)
        return evaluate(detector, root)

    def knn_metrics(root, backbone, weights, input_size, recipe):
        knn.append(input_size)
        return {key: 0.5 for key in TABLE_METRICS}

    monkeypatch.setattr(benchmark, "evaluate_detector", evaluated)
    monkeypatch.setattr(benchmark, "knn_reference_metrics", knn_metrics)
    run_benchmark(
        [data],
        ["resnet18"],
        tmp_path / "out",
        weights={"resnet18": "random"},
        training=TrainConfig(max_epochs=1, batch_size=4),
        flow_steps=2,
    )
    assert fitted == knn == [(160, 416)]


def _robust_run(seed, value, recipe="improved"):
    rows = [
        {"perturbation": "clean", "image_auroc": value, "delta_image_auroc": 0.0, "pixel_auroc": value,
         "delta_pixel_auroc": 0.0, "normal_drift": 0.0},
        {"perturbation": "noise1", "image_auroc": value - 0.02, "delta_image_auroc": -0.02,
         "pixel_auroc": value - 0.01, "delta_pixel_auroc": -0.01, "normal_drift": 0.1 + seed / 10},
    ]  # fmt: skip
    keys = ("image_auroc", "pixel_auroc", "image_f1", "pixel_f1", "aupro")
    return BenchmarkRun("bottle", "lite0", seed, {k: value for k in keys}, recipe, robustness=rows)


def _synthetic_runs():
    knn = BenchmarkRun("bottle", "lite0", 0, {"image_auroc": 0.8, "pixel_auroc": 0.7}, KNN_REFERENCE)
    return [_robust_run(0, 0.90), _robust_run(1, 0.94), _robust_run(0, 0.5, "reference"), knn]


def test_table_json_holds_the_summary_and_the_robustness_table(tmp_path):
    target = tmp_path / "docs" / "results" / "bench.json"
    paths = write_table_json(target, _synthetic_runs(), "fastflow benchmark bottle --seeds 0,1")
    assert paths == [target, target.with_name("bench-robustness.json")]
    summary = read_table(target)  # the shape docs/render.py reads
    assert summary["command"] == "fastflow benchmark bottle --seeds 0,1"
    assert summary["machine"].startswith(cpu_model()) and summary["date"] and summary["version"]
    assert "seeds 0, 1" in summary["title"]
    assert summary["columns"] == [
        "dataset", "model", "image AUROC", "pixel AUROC", "AUPRO", "image F1", "pixel F1"
    ]  # fmt: skip
    assert summary["rows"] == [
        ["bottle", "lite0", *["0.920 (0.900-0.940)"] * 5],
        ["bottle", "lite0 (reference)", *["0.500"] * 5],
        ["bottle", f"lite0 ({KNN_REFERENCE})", "0.800", "0.700", "-", "-", "-"],
    ]
    assert (
        render_table(summary).split("\n")[2]
        == "| bottle | lite0 | " + " | ".join(["0.920 (0.900-0.940)"] * 5) + " |"
    )
    robust = read_table(paths[1])
    assert robust["columns"] == ["category", "model", "change", "image AUROC", "pixel AUROC", "normal drift"]
    assert robust["rows"][1] == ["bottle", "lite0", "noise1", "0.900 (-0.020)", "0.910 (-0.010)", "+0.150"]
    # The printed robustness table is the same rows.
    assert "| bottle | lite0 | noise1 | 0.900 (-0.020) | 0.910 (-0.010) | +0.150 |" in markdown_tables(
        _synthetic_runs()
    )
    # Without robustness rows only the summary is written.
    plain = [_run("bottle", "a", 0, 0.9)]
    assert write_table_json(tmp_path / "plain.json", plain, "fastflow benchmark") == [tmp_path / "plain.json"]
    assert "seed 0" in read_table(tmp_path / "plain.json")["title"]


def test_cli_benchmark_table_json(tmp_path, capsys, monkeypatch):
    from fastflow.apps.cli import main

    calls = []
    monkeypatch.setattr(
        benchmark, "run_benchmark", lambda *args, **kwargs: calls.append(1) or _synthetic_runs()
    )
    target = tmp_path / "table.json"
    args = [
        "benchmark",
        "bottle",
        "--output",
        str(tmp_path / "out"),
        "--seeds",
        "0,1",
        "--table-json",
        str(target),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert f"table JSON: {target}" in capsys.readouterr().out
    record = read_table(target)
    assert (
        record["command"]
        == f"fastflow benchmark bottle --output {tmp_path / 'out'} --seeds 0,1 --table-json {target}"
    )
    assert record["rows"][0][:3] == ["bottle", "lite0", "0.920 (0.900-0.940)"]
    assert (tmp_path / "table-robustness.json").exists()
    # A folder is refused before any run starts.
    code = main([*args[:-1], str(tmp_path)])
    assert code == 2 and "--table-json" in capsys.readouterr().err and calls == [1]


def test_resume_reads_the_runs_already_in_the_output_and_trains_only_the_rest(tmp_path, monkeypatch):
    data = make_textures(tmp_path / "tex", n_train=6, n_test_good=2, n_test_defect=2, size=(64, 64))
    common = {
        "weights": {"resnet18": "random"},
        "training": TrainConfig(max_epochs=1, batch_size=4),
        "input_size": (64, 64),
    }
    first = run_benchmark([data], ["resnet18"], tmp_path / "out", seeds=(0,), **common)
    trained = []
    real = benchmark._train_and_test
    monkeypatch.setattr(benchmark, "_train_and_test", lambda task: trained.append(task.seed) or real(task))
    monkeypatch.setattr(benchmark, "knn_reference_metrics", lambda *a: pytest.fail("kNN recomputed"))
    both = run_benchmark([data], ["resnet18"], tmp_path / "out", seeds=(0, 1), resume=True, **common)
    assert trained == [1]  # seed 0 read from its JSON, seed 1 trained
    assert both[0] == first[0] and both[-1] == first[-1]  # the fastflow run and the kNN reference
    assert [r.seed for r in both if r.recipe != KNN_REFERENCE] == [0, 1]
    # A run made with other settings is not mixed into the table.
    other = {**common, "training": TrainConfig(max_epochs=2, batch_size=4)}
    with pytest.raises(FastFlowError, match="other settings"):
        run_benchmark([data], ["resnet18"], tmp_path / "out", seeds=(0,), resume=True, **other)
