"""Tests for fastflow.apps.small_defects: layout, sizes, mask areas, where defects change pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastflow.apps import benchmark
from fastflow.apps.small_defects import MASK_FRACTION, SMALL_DEFECTS, _render, _style, make_small_defects
from fastflow.estimator.data import DataError, load_samples, validate_samples

SMALL = (96, 240)  # (H, W): the default's aspect ratio at a fifth of the side, for speed


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by ``radius`` px (a disk), without wrapping at the borders."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small") / "sd"
    return make_small_defects(root, n_train=4, n_test_good=2, n_test_defect=4, size=SMALL)


def test_layout_loads_with_masks_that_match(small_set: Path) -> None:
    train, test = load_samples(small_set, "train"), load_samples(small_set, "test")
    validate_samples(train + test)
    assert len(train) == 4 and all(s.label == 0 and s.mask is None for s in train)
    assert len([s for s in test if s.label == 0]) == 2
    assert all(sum(s.defect == d for s in test) == 4 for d in SMALL_DEFECTS)
    for s in test:
        if s.label == 1:
            assert s.mask == small_set / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
            mask = pixels(s.mask)
            assert set(np.unique(mask)) == {0, 255}
            assert mask.shape == pixels(s.path).shape[:2] == SMALL


def test_every_mask_covers_a_small_fraction_of_the_image(small_set: Path) -> None:
    masks = sorted((small_set / "ground_truth").rglob("*_mask.png"))
    fractions = [(pixels(p) > 0).mean() for p in masks]
    # Straight from the generator too: more images, three sizes, two datasets.
    for size in ((64, 128), SMALL, (160, 400)):
        for seed in (0, 1):
            style = _style(seed)
            for code, kind in enumerate(SMALL_DEFECTS, start=2):
                fractions += [_render(seed, (code, i), style, size, kind)[1].mean() for i in range(5)]
    assert len(fractions) == 12 + 90
    assert all(MASK_FRACTION[0] <= f <= MASK_FRACTION[1] for f in fractions), fractions
    assert MASK_FRACTION == (0.0005, 0.005)


@pytest.mark.parametrize("kind", SMALL_DEFECTS)
def test_a_defect_changes_its_mask_visibly_and_nothing_far_from_it(kind: str) -> None:
    """A defective image is its normal twin (same key, sensor noise included) plus the defect."""
    style, code = _style(3), 2 + SMALL_DEFECTS.index(kind)
    for i in range(6):
        defective, mask = _render(3, (code, i), style, (160, 400), kind)
        normal, no_mask = _render(3, (code, i), style, (160, 400), None)
        assert mask is not None and no_mask is None
        far = ~dilate(mask, 5)  # beyond the anti-aliased edge and a scratch's faded ends
        assert np.array_equal(defective[far], normal[far])
        change = np.abs(np.round(defective * 255) - np.round(normal * 255)).max(axis=-1)[mask]
        assert change.min() >= 2 and change.mean() >= 6, (kind, i, change.min(), change.mean())


def test_default_size_is_wide_and_defects_small_at_it(tmp_path: Path) -> None:
    root = make_small_defects(tmp_path / "sd", n_train=1, n_test_good=0, n_test_defect=1)
    images = sorted(root.glob("t*/*/*.png"))
    assert len(images) == 1 + len(SMALL_DEFECTS)
    for path in images:
        with Image.open(path) as im:
            assert im.size == (1200, 480) and im.mode == "RGB"
    for kind in SMALL_DEFECTS:
        fraction = (pixels(root / "ground_truth" / kind / "000_mask.png") > 0).mean()
        assert MASK_FRACTION[0] <= fraction <= MASK_FRACTION[1]


def test_normal_images_are_one_aligned_part_that_varies(small_set: Path) -> None:
    a, b = (pixels(small_set / "train" / "good" / f"00{i}.png").astype(np.float32) for i in (0, 1))
    assert np.abs(a - b).mean() > 2  # own streaks, noise, jitter, light
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8  # the same part in the same place
    rows = a.mean(axis=(1, 2))
    assert rows[:5].mean() < 40 and rows[len(rows) // 2] > 80  # dark table above, metal across the middle


def test_deterministic_per_image_streams(tmp_path: Path) -> None:
    kwargs = {"n_train": 2, "n_test_good": 1, "n_test_defect": 1, "size": SMALL}
    a = files(make_small_defects(tmp_path / "a", seed=7, **kwargs))
    assert a == files(make_small_defects(tmp_path / "b", seed=7, **kwargs))
    c = files(make_small_defects(tmp_path / "c", seed=8, **kwargs))
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    d = files(make_small_defects(tmp_path / "d", seed=7, **{**kwargs, "n_train": 3}))
    assert all(d[k] == v for k, v in a.items())  # more training images leave the others alone


def test_grayscale_jpeg(tmp_path: Path) -> None:
    root = make_small_defects(
        tmp_path / "g", n_train=1, n_test_good=0, n_test_defect=1, size=SMALL, grayscale=True, fmt="jpg"
    )
    with Image.open(root / "test" / "stain" / "000.jpg") as im:
        assert im.mode == "L" and im.format == "JPEG" and im.size == (240, 96)
    assert (root / "ground_truth" / "stain" / "000_mask.png").is_file()


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "old.txt").write_text("keep")
    with pytest.raises(DataError, match="not an empty folder"):
        make_small_defects(tmp_path / "x", n_train=1)
    with pytest.raises(DataError, match="W >= 2H"):
        make_small_defects(tmp_path / "y", size=(200, 300))
    with pytest.raises(DataError, match="H >= 64"):
        make_small_defects(tmp_path / "y", size=(32, 128))
    with pytest.raises(DataError, match="gif"):
        make_small_defects(tmp_path / "y", fmt="gif")


def test_benchmark_generates_it_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fewer(root: Path, **kwargs: object) -> Path:
        """The built-in's own call, with counts and size cut down so the test is fast."""
        calls.append(kwargs)
        return make_small_defects(
            root, **{**kwargs, "n_train": 2, "n_test_good": 1, "n_test_defect": 1, "size": SMALL}
        )

    monkeypatch.setattr(benchmark, "make_small_defects", fewer)
    root = benchmark.resolve_dataset("small_defects", tmp_path)
    assert root == tmp_path / "data" / "small_defects"
    assert len(load_samples(root, "train")) == 2 and len(load_samples(root, "test")) == 1 + len(SMALL_DEFECTS)
    assert calls == [{"n_train": 120, "n_test_good": 30, "n_test_defect": 15, "seed": 0, "grayscale": True}]
    assert benchmark.resolve_dataset("small_defects", tmp_path) == root and len(calls) == 1
