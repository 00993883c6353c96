"""fastflow.robustness: its perturbations do what its docstring says, and a run is reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support import perturb_trainable

from fastflow import FastFlow, robustness
from fastflow.data import load_samples
from fastflow.model.fastflow import FastFlowModel
from fastflow.presets import get_config
from fastflow.synthetic import make_textures

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixel_changes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    noisy = robustness.gaussian_noise(image, np.random.default_rng(1), sigma=1.0)
    assert noisy.dtype == np.uint8 and 0.5 < np.abs(noisy.astype(int) - image).mean() < 1.5
    moved = robustness.shift_down_right(image, 4)
    assert np.array_equal(moved[4:, 4:], image[:-4, :-4]) and np.array_equal(moved[:4, 4:], image[:1, :-4].repeat(4, 0))
    bright = robustness.brighter(image, rng, levels=3)
    assert np.array_equal(bright, np.minimum(image.astype(int) + 3, 255))
    assert np.abs(robustness.jpeg(image, rng, quality=95).astype(int) - image).max() > 0


def test_measure_is_reproducible_and_clean_is_the_reference(tmp_path: Path):
    root = make_textures(tmp_path / "t", n_train=1, n_test_good=3, n_test_defect=1, size=(72, 80))
    model = FastFlowModel(get_config("resnet18", input_size=(64, 64), flow_steps=2), "random").eval()
    perturb_trainable(model, torch.Generator().manual_seed(1))
    detector = FastFlow.from_model(model, threshold=-0.5)
    samples = load_samples(root, "test")
    names = ["clean", "noise1", "shift4", "bf16_graph"]
    first = robustness.measure(detector, samples, names, seed=0)
    second = robustness.measure(detector, samples, names, seed=0)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in first]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in second]
    assert first[0]["delta_image_auroc"] == first[0]["normal_drift"] == 0.0
    assert [row["perturbation"] for row in first] == names
    assert any(row["normal_drift"] != 0.0 for row in first[1:])  # the changes reach the scores
