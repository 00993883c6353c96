"""fastflow.apps.robustness: its perturbations do what its docstring says, and a run is reproducible."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import perturb_trainable

from fastflow import FastFlow, FastFlowError
from fastflow.apps import robustness
from fastflow.apps.synthetic import make_textures
from fastflow.estimator.data import Sample, load_samples
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixel_changes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    noisy = robustness.gaussian_noise(image, np.random.default_rng(1), sigma=1.0)
    assert noisy.dtype == np.uint8 and 0.5 < np.abs(noisy.astype(int) - image).mean() < 1.5
    moved = robustness.crop_top_left(image, 4)
    assert moved.shape == (16, 26, 3) and np.array_equal(moved, image[4:, 4:])
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
    # An engine scores the same perturbed pixels: the OpenVINO f32 export gives the graph's rows.
    pixel_names = names[:3]
    exported = robustness.measure(detector, samples, pixel_names, seed=0, engine=detector.engine("openvino"))
    for ours, theirs in zip(first, exported, strict=False):
        assert theirs["perturbation"] == ours["perturbation"]
        assert theirs["image_auroc"] == pytest.approx(ours["image_auroc"], abs=1e-9)
        assert theirs["median_normal_score"] == pytest.approx(ours["median_normal_score"], abs=1e-4)
    with pytest.raises(FastFlowError, match="bf16 perturbations"):
        robustness.measure(
            detector, samples, ["clean", "bf16_graph"], seed=0, engine=detector.engine("openvino")
        )


def test_a_moved_mask_is_cropped_at_full_resolution_like_its_image(tmp_path: Path):
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:20, 30:50] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    sample = Sample(tmp_path / "x.png", 1, tmp_path / "m.png", "cut")
    moved = robustness.moved_mask(sample, (40, 60), (36, 56), partial(robustness.crop_top_left, by=4))
    expected = np.zeros((36, 56), dtype=bool)
    expected[6:16, 26:46] = True
    assert np.array_equal(moved, expected)
