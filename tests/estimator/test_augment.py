"""fastflow.estimator.augment: the pixel noise and JPEG round trip of training's noisy copies and
of the robustness benchmark."""

from __future__ import annotations

import torch
import torchvision

from fastflow.estimator.augment import add_pixel_noise, image_generator, jpeg_round_trip, noisy_copy


def _smooth_image(generator: torch.Generator, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 8, 8, generator=generator), size, mode="bilinear"
    )
    return (smooth[0] * 200 + 20 + 10 * torch.rand(3, *size, generator=generator)).to(torch.uint8)


def test_pixel_noise_is_rounded_sensor_noise_of_the_asked_size():
    pixels = torch.full((2, 3, 64, 64), 100, dtype=torch.uint8)
    pixels[0, 0, 0, 0], pixels[0, 0, 0, 1] = 0, 255
    noisy = add_pixel_noise(pixels, 2.0, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.uint8
    difference = noisy.float() - pixels.float()
    assert 1.8 < difference[:, :, 1:].std() < 2.2 and difference.abs().max() <= 12


def test_jpeg_round_trip_leaves_quality_0_alone_and_compresses_more_at_lower_quality():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 8, 8, generator=generator), (64, 64), mode="bilinear"
    )
    image = (smooth[0] * 200 + 20 + 10 * torch.rand(3, 64, 64, generator=generator)).to(torch.uint8)
    assert jpeg_round_trip(image, 0) is image
    errors = []
    for quality in (95, 75, 30):
        decoded = jpeg_round_trip(image, quality)
        assert decoded.shape == image.shape and decoded.dtype == torch.uint8
        errors.append((decoded.float() - image.float()).abs().mean().item())
    assert 0 < errors[0] < errors[1] < errors[2] < 20


def test_noisy_copy_is_noise_then_jpeg_for_its_share_of_images_drawn_per_image():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 8, 8, generator=generator), (64, 64), mode="bilinear"
    )
    image = (smooth[0] * 200 + 20).to(torch.uint8)

    def copies(quality: int, share: float) -> list[torch.Tensor]:
        return [
            noisy_copy(image, 3.0, torch.Generator().manual_seed(seed), quality, share) for seed in range(40)
        ]

    plain = [add_pixel_noise(image, 3.0, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert all(
        torch.equal(a, b) for a, b in zip(copies(0, 1.0), plain, strict=True)
    )  # no JPEG: the noise alone
    compressed = [jpeg_round_trip(p, 75) for p in plain]
    assert all(torch.equal(a, b) for a, b in zip(copies(75, 1.0), compressed, strict=True))
    half = copies(75, 0.5)
    taken = [torch.equal(a, b) for a, b in zip(half, compressed, strict=True)]
    assert all(t or torch.equal(a, p) for t, a, p in zip(taken, half, plain, strict=True))
    assert 8 <= sum(taken) <= 32
    assert all(torch.equal(a, b) for a, b in zip(half, copies(75, 0.5), strict=True))  # the same draws again


def test_twice_the_sigma_from_the_same_generator_is_the_same_noise_doubled():
    """What the robustness benchmark's noise2 row promises: noise1's noise, doubled before rounding."""
    pixels = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    draw = torch.randn(pixels.shape, generator=image_generator(0, 5))
    for sigma in (1.0, 2.0):
        expected = (pixels.float() + sigma * draw).round().to(torch.uint8)
        assert torch.equal(add_pixel_noise(pixels, sigma, image_generator(0, 5)), expected)


def test_each_image_has_its_own_generator_seeded_by_run_and_index():
    draws = {
        (seed, index): torch.rand(4, generator=image_generator(seed, index))
        for seed in (0, 1)
        for index in (0, 1)
    }
    assert torch.equal(draws[0, 1], torch.rand(4, generator=image_generator(0, 1)))  # the same again
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    assert torch.equal(draws[0, 1], torch.rand(4, generator=torch.Generator().manual_seed(1)))


def test_the_jpeg_round_trip_gives_torchvisions_pixels():
    """Pillow's round trip, decoded, equals torchvision's (libjpeg-turbo both), which training used
    before this module: models trained with JPEG copies before and after train alike."""
    generator = torch.Generator().manual_seed(1)
    for size in ((64, 64), (37, 81), (255, 17)):
        image = _smooth_image(generator, size)
        for quality in (95, 75, 30):
            expected = torchvision.io.decode_jpeg(torchvision.io.encode_jpeg(image, quality=quality))
            assert torch.equal(jpeg_round_trip(image, quality), expected)
