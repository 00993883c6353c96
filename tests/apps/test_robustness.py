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
from fastflow.estimator.augment import add_pixel_noise, image_generator, jpeg_round_trip
from fastflow.estimator.data import Sample, load_samples
from fastflow.model.config import get_config
from fastflow.model.fastflow import FastFlowModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixel_changes():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=generator)
    noisy = robustness.gaussian_noise(image, torch.Generator().manual_seed(1), sigma=1.0)
    assert noisy.dtype == torch.uint8 and 0.5 < (noisy.float() - image.float()).abs().mean() < 1.5
    moved = robustness.crop_top_left(image, 4)
    assert moved.shape == (3, 16, 26) and torch.equal(moved, image[:, 4:, 4:])
    bright = robustness.brighter(image, generator, levels=3)
    assert torch.equal(bright, (image.int() + 3).clamp(max=255).to(torch.uint8))
    assert (robustness.jpeg(image, generator, quality=95).int() - image.int()).abs().max() > 0


def test_noise_and_jpeg_are_the_ones_training_uses():
    """One implementation (``fastflow.estimator.augment``) for the training copies and the benchmark,
    and noise2 is noise1's noise doubled: the same per-image generator, whatever the sigma."""
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = torch.stack([image, image.flip(-1)])
    for name, sigma in (("noise1", 1.0), ("noise2", 2.0)):
        changed = robustness.perturbed_pixels(images, robustness.PERTURBATIONS[name].image, 7, seed=3)
        for offset in range(2):
            expected = add_pixel_noise(images[offset], sigma, image_generator(3, 7 + offset))
            assert torch.equal(changed[offset], expected)
    noise1 = robustness.PERTURBATIONS["noise1"].image
    assert not torch.equal(  # another seed, other noise
        robustness.perturbed_pixels(images, noise1, 7, seed=3),
        robustness.perturbed_pixels(images, noise1, 7, seed=4),
    )
    jpeg80 = robustness.perturbed_pixels(images, robustness.PERTURBATIONS["jpeg80"].image, 0, seed=0)
    assert all(torch.equal(jpeg80[i], jpeg_round_trip(images[i], 80)) for i in range(2))


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
