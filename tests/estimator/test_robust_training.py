"""The improved recipe's training keeps scores under sensor noise no inspector could see.

Guards ``Recipe.pixel_noise``: on camera-clean generated parts (no pixel noise, a flat
backdrop) a flow trained without it loses 0.58 image AUROC under sigma-1 pixel noise (1.00 ->
0.42, measured with this very setup); docs/results.md (Robustness) has the full study.
"""

from __future__ import annotations

from pathlib import Path

from fastflow import FastFlow, TrainConfig
from fastflow.apps.robustness import measure
from fastflow.apps.synthetic import make_textures
from fastflow.estimator.data import load_samples
from fastflow.model.config import RECIPES, Recipe


def noise_auroc_drop(root: Path, weights: Path, recipe: Recipe) -> tuple[float, float]:
    """(clean image AUROC, its drop under sigma-1 pixel noise) of a small Lite0 model fitted on ``root``."""
    training = TrainConfig(max_epochs=15, batch_size=8)
    detector = FastFlow(
        "tf_efficientnet_lite0",
        recipe=recipe,
        weights=weights,
        training=training,
        architecture={"input_size": (96, 96)},
    )
    detector.fit(root)
    clean, noisy = measure(detector, load_samples(root, "test"), ["clean", "noise1"], seed=0)
    return clean["image_auroc"], clean["image_auroc"] - noisy["image_auroc"]


def test_sigma_1_pixel_noise_costs_at_most_0_02_image_auroc(tmp_path: Path, lite0_weights: Path) -> None:
    root = make_textures(
        tmp_path / "parts",
        n_train=40,
        n_test_good=12,
        n_test_defect=4,
        size=(96, 96),
        defect_opacity=0.5,
        noise=0.0,
        backdrop=True,
    )
    clean, drop = noise_auroc_drop(root, lite0_weights, RECIPES["improved"])
    assert clean >= 0.8
    assert drop <= 0.02
