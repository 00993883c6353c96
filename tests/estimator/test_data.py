"""Tests for fastflow.estimator.data: layouts, decoding, error messages, holdout split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch.utils.data import DataLoader

from fastflow.estimator.data import (
    DataError,
    ImageDataset,
    Sample,
    decode_image,
    detect_layout,
    folder_samples,
    image_loader,
    list_images,
    load_mask,
    load_samples,
    mvtec_samples,
    split_holdout,
    validate_samples,
)

BOTTLE = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
needs_bottle = pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle not found at {BOTTLE}")

from fastflow.model.preprocess import Preprocess

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def load_image(path: Path, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """What the model's input path does to one file: decode, then ``Preprocess`` (resize + normalise)."""
    return Preprocess(size, mean, std)(decode_image(path)[None])[0]


# ----------------------------------------------------------------------------- helpers


def rgb(
    size: tuple[int, int] = (40, 30), color: tuple[int, int, int] | None = None, seed: int = 0
) -> Image.Image:
    """RGB image of PIL size (W, H): constant colour or noise."""
    w, h = size
    if color is not None:
        return Image.new("RGB", size, color)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def mask_img(size: tuple[int, int], box: tuple[int, int, int, int] = (2, 2, 10, 10)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_mvtec(root: Path, *, with_masks: bool = True) -> Path:
    save(rgb(seed=1), root / "train" / "good" / "000.png")
    save(rgb(seed=2), root / "train" / "good" / "001.png")
    save(rgb(seed=3), root / "test" / "good" / "000.png")
    save(rgb(seed=4), root / "test" / "crack" / "000.png")
    if with_masks:
        save(mask_img((40, 30)), root / "ground_truth" / "crack" / "000_mask.png")
    return root


def assert_names(err: pytest.ExceptionInfo[DataError], *paths: Path) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for p in paths:
        assert str(p) in msg, f"{p} not named in: {msg}"


# ----------------------------------------------------------------------------- MVTec AD (real data)


@needs_bottle
def test_bottle_counts_and_mask_pairing() -> None:
    train = mvtec_samples(BOTTLE, "train")
    test = mvtec_samples(BOTTLE, "test")
    assert len(train) == 209 and all(s.label == 0 and s.mask is None for s in train)
    assert len(test) == 83
    good = [s for s in test if s.label == 0]
    bad = [s for s in test if s.label == 1]
    assert len(good) == 20 and all(s.mask is None and s.defect == "good" for s in good)
    assert len(bad) == 63 and {s.defect for s in bad} == {"broken_large", "broken_small", "contamination"}
    for s in bad:
        assert s.mask is not None and s.mask.is_file()
        assert s.mask.name == f"{s.path.stem}_mask.png"
        assert s.mask.parent.name == s.defect == s.path.parent.name
    assert [s.path for s in train] == sorted(s.path for s in train)
    assert detect_layout(BOTTLE) == "mvtec"
    assert load_samples(BOTTLE, "test") == test


@needs_bottle
def test_bottle_item_non_square() -> None:
    test = mvtec_samples(BOTTLE, "test")
    ds = ImageDataset([s for s in test if s.label == 1][:1] + [test[-1]], (96, 128))
    item = ds[0]
    assert item["image"].shape == (3, 900, 900) and item["image"].dtype == torch.uint8  # decoded, own size
    assert item["mask"].shape == (96, 128) and item["mask"].dtype == torch.bool
    assert item["mask"].any() and item["has_mask"] and item["label"] == 1


# ----------------------------------------------------------------------------- decoding


def test_mixed_formats_modes_and_sizes(tmp_path: Path) -> None:
    d = tmp_path / "normal"
    save(rgb((50, 40), seed=1), d / "a.png")
    save(rgb((64, 48), seed=2), d / "b.jpg")
    save(rgb((33, 70), seed=3), d / "c.bmp")
    save(rgb((90, 20), seed=4), d / "d.tif")
    save(rgb((20, 20), seed=5).convert("L"), d / "e.png")
    save(rgb((31, 17), seed=6).convert("RGBA"), d / "f.png")
    save(rgb((40, 40), seed=7).convert("P"), d / "g.png")
    save(Image.fromarray(np.full((12, 18), 40000, np.uint16)), d / "h.png")
    save(rgb((25, 25), seed=8), d / "I.PNG")
    save(rgb((25, 25), seed=9), d / "j.TIFF")
    save(rgb(seed=10), d / ".hidden.png")
    (d / "notes.txt").write_text("not an image")
    (d / "sub.png").mkdir()

    samples = folder_samples(d)
    names = [s.path.name for s in samples]
    assert names == [
        "I.PNG",
        "a.png",
        "b.jpg",
        "c.bmp",
        "d.tif",
        "e.png",
        "f.png",
        "g.png",
        "h.png",
        "j.TIFF",
    ]
    validate_samples(samples)
    for s in samples:
        x = load_image(s.path, (24, 40))
        assert x.shape == (3, 24, 40) and x.dtype == torch.float32 and torch.isfinite(x).all()
    gray = load_image(d / "e.png", (8, 8))
    assert torch.allclose(gray * STD + MEAN, (gray * STD + MEAN)[:1].expand(3, -1, -1), atol=1e-5)


def test_normalization_values(tmp_path: Path) -> None:
    color = (10, 128, 250)
    p = save(rgb((30, 20), color=color), tmp_path / "c.png")
    x = load_image(p, (16, 24))
    expected = (torch.tensor(color, dtype=torch.float32) / 255 - MEAN.flatten()) / STD.flatten()
    assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 16, 24), atol=1e-5)
    raw = load_image(p, (16, 24), mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(raw[:, 0, 0], torch.tensor(color, dtype=torch.float32) / 255)
    # 16-bit grayscale is scaled from 0..65535, not clipped to white.
    p16 = save(Image.fromarray(np.full((10, 10), 32896, np.uint16)), tmp_path / "g16.png")
    assert torch.allclose(load_image(p16, (4, 4), (0, 0, 0), (1, 1, 1)), torch.full((3, 4, 4), 128 / 255))
    # RGBA: alpha is dropped, colour kept.
    pa = save(Image.new("RGBA", (5, 5), (200, 100, 50, 0)), tmp_path / "a.png")
    pixel = load_image(pa, (5, 5), (0, 0, 0), (1, 1, 1))[:, 2, 2]
    assert torch.allclose(pixel, torch.tensor([200, 100, 50]) / 255)


def test_load_mask_modes(tmp_path: Path) -> None:
    p = save(mask_img((40, 30), (0, 0, 20, 15)), tmp_path / "m.png")
    m = load_mask(p, (6, 8))
    assert m.dtype == torch.bool and m.shape == (6, 8)
    assert m[:3, :4].all() and not m[3:, :].any() and not m[:, 4:].any()
    faint = save(Image.new("L", (8, 8), 100), tmp_path / "faint.png")
    assert not load_mask(faint, (8, 8)).any()  # 8-bit: > 127 is anomalous
    one = save(Image.new("1", (8, 8), 1), tmp_path / "one.png")
    assert load_mask(one, (4, 4)).all()
    red = save(Image.new("RGB", (8, 8), (255, 0, 0)), tmp_path / "red.png")
    assert load_mask(red, (4, 4)).all()


def test_dataset_collate_with_and_without_masks(tmp_path: Path) -> None:
    save(rgb((40, 30), seed=1), tmp_path / "normal" / "n.png")
    save(rgb((40, 30), seed=2), tmp_path / "anomalous" / "a.png")
    save(rgb((40, 30), seed=3), tmp_path / "anomalous" / "b.jpg")
    save(mask_img((40, 30)), tmp_path / "masks" / "a_mask.png")
    samples = folder_samples(tmp_path / "normal", tmp_path / "anomalous", tmp_path / "masks")
    assert [(s.path.name, s.label, s.mask.name if s.mask else None) for s in samples] == [
        ("n.png", 0, None),
        ("a.png", 1, "a_mask.png"),
        ("b.jpg", 1, None),
    ]
    batch = next(iter(DataLoader(ImageDataset(samples, (20, 28)), batch_size=3)))
    assert batch["image"].shape == (3, 3, 30, 40) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (3, 20, 28) and batch["mask"].dtype == torch.bool
    assert batch["label"].tolist() == [0, 1, 1]
    assert batch["has_mask"].tolist() == [True, True, False]
    assert batch["mask"][1].any() and not batch["mask"][0].any() and not batch["mask"][2].any()
    assert batch["path"][1].endswith("a.png")


def test_mask_matched_by_plain_stem(tmp_path: Path) -> None:
    save(rgb(seed=1), tmp_path / "n" / "0.png")
    save(rgb(seed=2), tmp_path / "a" / "x.jpg")
    save(mask_img((40, 30)), tmp_path / "m" / "x.png")
    samples = folder_samples(tmp_path / "n", tmp_path / "a", tmp_path / "m")
    assert samples[1].mask == tmp_path / "m" / "x.png" and samples[1].defect == "a"


def test_load_samples_folder_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for i in range(3):
        save(rgb(seed=i), flat / f"{i}.png")
    assert detect_layout(flat) == "folder"
    assert [s.path.name for s in load_samples(flat, "train")] == ["0.png", "1.png", "2.png"]
    with pytest.raises(DataError) as err:
        load_samples(flat, "test")
    assert_names(err, flat)

    t = tmp_path / "t"
    save(rgb(seed=1), t / "good" / "g.png")
    save(rgb(seed=2), t / "scratch" / "s.png")
    save(rgb(seed=3), t / "spot" / "s.png")
    save(mask_img((40, 30)), t / "masks" / "scratch" / "s_mask.png")
    samples = load_samples(t, "test")
    assert [(s.defect, s.label, s.mask is not None) for s in samples] == [
        ("good", 0, False),
        ("scratch", 1, True),
        ("spot", 1, False),
    ]
    assert [s.path.name for s in load_samples(t, "train")] == ["g.png"]


# ----------------------------------------------------------------------------- errors


def test_missing_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat", with_masks=False)
    assert len(mvtec_samples(root, "train")) == 2
    with pytest.raises(DataError) as err:
        mvtec_samples(root, "test")
    assert_names(err, root / "ground_truth" / "crack" / "000_mask.png", root / "test" / "crack" / "000.png")
    assert "missing mask" in str(err.value)


def test_mvtec_ok_and_mask_size_mismatch(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    test = mvtec_samples(root, "test")
    assert [(s.defect, s.label) for s in test] == [("crack", 1), ("good", 0)]
    save(mask_img((41, 30)), root / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(DataError) as err:
        mvtec_samples(root, "test")
    assert_names(err, root / "ground_truth" / "crack" / "000_mask.png")


def test_corrupt_image(tmp_path: Path) -> None:
    bad = tmp_path / "n" / "x.png"
    save(rgb(seed=1), tmp_path / "n" / "a.png")
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError) as err:
        load_image(bad, (8, 8))
    assert_names(err, bad)
    assert "corrupt image" in str(err.value) and "replace" in str(err.value)
    samples = folder_samples(tmp_path / "n")
    with pytest.raises(DataError) as err:
        validate_samples(samples)
    assert_names(err, bad)


def test_truncated_png(tmp_path: Path) -> None:
    good = save(rgb((200, 200), seed=1), tmp_path / "n" / "a.png")
    data = good.read_bytes()
    trunc = tmp_path / "n" / "b.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_image(trunc, (8, 8))
    assert_names(err, trunc)
    # The first bad file in sample order is reported, whatever the thread timing.
    (tmp_path / "n" / "c.png").write_bytes(b"garbage")
    for workers in (1, 4):
        with pytest.raises(DataError) as err:
            validate_samples(folder_samples(tmp_path / "n"), workers=workers)
        assert_names(err, trunc)


def test_corrupt_mask_in_validation(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "cat")
    mask = root / "ground_truth" / "crack" / "000_mask.png"
    samples = mvtec_samples(root, "test")
    mask.write_bytes(mask.read_bytes()[:40])
    with pytest.raises(DataError) as err:
        validate_samples(samples)
    assert_names(err, mask)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_image(tmp_path / "nope.png", (8, 8))
    assert_names(err, tmp_path / "nope.png")


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError) as err:
        folder_samples(empty)
    assert_names(err, empty)
    root = tmp_path / "cat"
    (root / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        mvtec_samples(root, "train")
    assert_names(err, root / "train" / "good")
    with pytest.raises(DataError) as err:
        load_samples(empty, "train")
    assert_names(err, empty)
    assert list_images(empty) == []


def test_wrong_layout(tmp_path: Path) -> None:
    save(rgb(), tmp_path / "images" / "a.png")
    with pytest.raises(DataError) as err:
        mvtec_samples(tmp_path, "train")
    assert_names(err, tmp_path / "train" / "good")
    assert "train/good" in str(err.value)
    missing = tmp_path / "does_not_exist"
    for fn in (
        lambda: mvtec_samples(missing, "train"),
        lambda: load_samples(missing, "train"),
        lambda: folder_samples(missing),
    ):
        with pytest.raises(DataError) as err:
            fn()
        assert_names(err, missing)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    save(rgb((40, 30), seed=1), tmp_path / "n" / "a.png")
    save(rgb((40, 30), seed=2), tmp_path / "a" / "b.png")
    m = save(mask_img((30, 40)), tmp_path / "m" / "b_mask.png")
    with pytest.raises(DataError) as err:
        folder_samples(tmp_path / "n", tmp_path / "a", tmp_path / "m")
    assert_names(err, m, tmp_path / "a" / "b.png")
    assert "30x40" in str(err.value) and "40x30" in str(err.value)


def test_mask_without_image(tmp_path: Path) -> None:
    save(rgb(seed=1), tmp_path / "n" / "a.png")
    save(rgb(seed=2), tmp_path / "a" / "b.png")
    save(mask_img((40, 30)), tmp_path / "m" / "b_mask.png")
    orphan = save(mask_img((40, 30)), tmp_path / "m" / "zzz_mask.png")
    with pytest.raises(DataError) as err:
        folder_samples(tmp_path / "n", tmp_path / "a", tmp_path / "m")
    assert_names(err, orphan)


def test_data_error_is_one_line() -> None:
    assert str(DataError("a\nb")) == "a b"
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- holdout


def test_split_holdout() -> None:
    samples = [Sample(Path(f"/d/{i:03d}.png"), 0) for i in range(50)]
    train, held = split_holdout(samples, 0.1, seed=0)
    assert (train, held) == split_holdout(samples, 0.1, seed=0)
    assert len(held) == 5 and len(train) == 45
    assert not set(train) & set(held) and set(train) | set(held) == set(samples)
    assert train == sorted(train, key=lambda s: s.path)
    assert split_holdout(samples, 0.1, seed=1)[1] != held
    t2, h2 = split_holdout(samples[:2], 0.1)
    assert len(t2) == 1 and len(h2) == 1
    assert len(split_holdout(samples[:5], 0.01)[1]) == 1
    with pytest.raises(DataError) as err:
        split_holdout(samples[:1])
    assert "add more" in str(err.value) and "/d" in str(err.value)
    with pytest.raises(DataError):
        split_holdout([Sample(Path("/d/x.png"), 1), *samples])


def test_loader_reports_the_first_bad_file_in_sample_order_after_the_batches_before_it(
    tmp_path: Path,
) -> None:
    """The loader's decode is the validation: batches before the bad file come out, then its error,
    whatever the decoding threads' timing."""
    for i in range(5):
        save(rgb((40, 30), seed=i), tmp_path / "n" / f"{i}.png")
    data = (tmp_path / "n" / "3.png").read_bytes()
    (tmp_path / "n" / "3.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "n" / "4.png").write_bytes(b"garbage")
    samples = folder_samples(tmp_path / "n")
    for workers in (1, 4):
        names: list[str] = []
        with pytest.raises(DataError) as err:
            for batch in image_loader(samples, (8, 8), 2, workers=workers):
                names += [Path(p).name for p in batch["path"]]
        assert names == ["0.png", "1.png"]
        assert_names(err, tmp_path / "n" / "3.png")
        assert "corrupt image" in str(err.value) and "replace" in str(err.value)


def test_loader_checks_mask_sizes_against_the_decoded_image(tmp_path: Path) -> None:
    """A sample built by hand (no listing to read the headers) meets the listing's error."""
    image = save(rgb((40, 30), seed=1), tmp_path / "a.png")
    mask = save(mask_img((30, 40)), tmp_path / "a_mask.png")
    with pytest.raises(DataError) as err:
        next(iter(image_loader([Sample(image, 1, mask, "crack")], (8, 8), 1)))
    assert_names(err, mask, image)
    assert "30x40" in str(err.value) and "40x30" in str(err.value)


def test_validation_records_sizes_and_loader_batches_by_size(tmp_path: Path) -> None:
    sizes = [(40, 30), (40, 30), (20, 50), (40, 30), (40, 30), (40, 30)]
    for i, size in enumerate(sizes):
        save(rgb(size, seed=i), tmp_path / "n" / f"{i}.png")
    samples = validate_samples(folder_samples(tmp_path / "n"))
    assert [s.size for s in samples] == sizes
    batches = [
        (b["image"].shape, [Path(p).name for p in b["path"]]) for b in image_loader(samples, (8, 8), 2)
    ]
    assert batches == [
        ((2, 3, 30, 40), ["0.png", "1.png"]),
        ((1, 3, 50, 20), ["2.png"]),
        ((2, 3, 30, 40), ["3.png", "4.png"]),
        ((1, 3, 30, 40), ["5.png"]),
    ]
