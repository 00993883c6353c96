"""The benchmark's nearest-neighbour reference: exact search, the bank limit, and that it scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.apps.knn_reference import KnnReference, knn_reference_metrics
from fastflow.estimator.data import Sample


def _texture(path: Path, seed: int, defect: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:96]
    image = 128 + 60 * np.sin(x / 3.0 + rng.uniform(0, 6)) * np.cos(y / 5.0)
    image = np.repeat(image[..., None], 3, axis=2) + rng.normal(0, 3, (96, 96, 3))
    if defect:
        image[30:50, 40:60] = [255, 0, 0]
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def textures(tmp_path: Path) -> tuple[list[Sample], list[Sample]]:
    train = [Sample(_texture(tmp_path / f"train{i}.png", i), 0) for i in range(6)]
    test = [Sample(_texture(tmp_path / f"good{i}.png", 100 + i), 0) for i in range(3)]
    test += [Sample(_texture(tmp_path / f"bad{i}.png", 200 + i, defect=True), 1) for i in range(3)]
    return train, test


def test_nearest_is_the_exact_nearest_neighbour(one_thread: None) -> None:
    reference = KnnReference("resnet18", "random")
    generator = torch.Generator().manual_seed(0)
    reference.bank_ = torch.randn(3000, 24, generator=generator)
    reference.bank_norms_ = reference.bank_.pow(2).sum(dim=1)
    queries = torch.randn(2500, 24, generator=generator)
    expected = torch.cdist(queries.double(), reference.bank_.double()).amin(dim=1)
    assert torch.allclose(reference._nearest(queries).double(), expected, atol=1e-4)


def test_training_images_score_zero_and_defects_score_high(textures, one_thread: None) -> None:
    train, test = textures
    reference = KnnReference("resnet18", "random", input_size=(64, 64), recipe="reference").fit(train)
    assert reference.bank_positions_ == len(reference.bank_) == 6 * 8 * 8  # layer 2 at stride 8
    seen, seen_maps, _ = reference.score(train)
    assert np.abs(seen).max() < 1e-2 and max(np.abs(m).max() for m in seen_maps) < 1e-2
    scores, maps, masks = reference.score(test)
    assert scores[3:].min() > scores[:3].max()
    assert len(maps) == len(masks) == 3  # the defects have no mask: image level only
    assert maps[0].shape == (64, 64)


def test_bank_limit_keeps_a_seeded_subset(textures, one_thread: None) -> None:
    train, _ = textures
    banks = []
    for _ in range(2):
        torch.manual_seed(0)  # the same random backbone twice
        banks.append(KnnReference("resnet18", "random", input_size=(64, 64), bank_limit=100).fit(train))
    first, second = banks
    assert first.bank_positions_ == 384 and len(first.bank_) == 100
    assert torch.equal(first.bank_, second.bank_)


def test_metrics_on_a_dataset_folder(tmp_path: Path, one_thread: None) -> None:
    root = tmp_path / "data"
    for folder in ("train/good", "test/good", "test/paint", "ground_truth/paint"):
        (root / folder).mkdir(parents=True)
    for i in range(5):
        _texture(root / "train/good" / f"{i}.png", i)
    for i in range(3):
        _texture(root / "test/good" / f"{i}.png", 50 + i)
        _texture(root / "test/paint" / f"{i}.png", 60 + i, defect=True)
        mask = np.zeros((96, 96), np.uint8)
        mask[30:50, 40:60] = 255
        Image.fromarray(mask).save(root / "ground_truth/paint" / f"{i}_mask.png")
    metrics = knn_reference_metrics(root, "resnet18", "random", (64, 64), "improved")
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] > 0.9
    assert metrics["bank_positions"] == metrics["bank_kept"] == 5 * 64
