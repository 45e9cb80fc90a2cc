"""Batched augmentation draws rotation, translation and scale from the intended distributions.

A synthetic image (an elongated Gaussian blob centred in a 96 x 96 canvas) is transformed as a
batch. Each output's image moments give back the transform: the centroid gives the translation,
the orientation of the second central moments the rotation, and the fourth root of the ratio of
their determinants the scale. The recovered values are compared with the drawn ones image by
image, and their distribution with uniform rotation in [-10, 10] degrees, translation in
[-0.1, 0.1] of the image size per axis, and scale in [0.9, 1.1].
"""

from __future__ import annotations

import math

import pytest
import torch

from collective_model.data import affine_grid, affine_matrices, augment, random_affine_params

COUNT = 2000
SIZE = 96
SIGMA_MAJOR, SIGMA_MINOR = 10.0, 5.0  # pixels; the major axis lies along x (the width)
SEED = 7

# Per-image recovery tolerances, from the residuals of bilinear resampling and of the blob's
# tails cut at the border (measured maxima: 0.04 degrees, 0.0001 of the size, 0.003 of scale).
ANGLE_TOLERANCE_DEGREES = 0.2
SHIFT_TOLERANCE = 0.001
SCALE_TOLERANCE = 0.006

# Kolmogorov-Smirnov critical value at the 1 % level for COUNT samples: 1.628 / sqrt(COUNT).
KS_CRITICAL = 1.628 / math.sqrt(COUNT)


def blob_image() -> torch.Tensor:
    centre = (SIZE - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float64), torch.arange(SIZE, dtype=torch.float64), indexing="ij")
    return torch.exp(-0.5 * (((xs - centre) / SIGMA_MAJOR) ** 2 + ((ys - centre) / SIGMA_MINOR) ** 2))


def image_moments(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return centroid (cx, cy) and second central moments of images [N, H, W], in pixels (y down)."""
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float64), torch.arange(SIZE, dtype=torch.float64), indexing="ij")
    mass = images.sum(dim=(-2, -1))
    cx = (images * xs).sum(dim=(-2, -1)) / mass
    cy = (images * ys).sum(dim=(-2, -1)) / mass
    dx = xs - cx[:, None, None]
    dy = ys - cy[:, None, None]
    return {
        "cx": cx,
        "cy": cy,
        "xx": (images * dx * dx).sum(dim=(-2, -1)) / mass,
        "yy": (images * dy * dy).sum(dim=(-2, -1)) / mass,
        "xy": (images * dx * dy).sum(dim=(-2, -1)) / mass,
    }


@pytest.fixture(scope="module")
def recovered() -> dict[str, torch.Tensor]:
    """Transform COUNT copies of the blob; return recovered and drawn angle, shift and scale."""
    image = blob_image()
    batch = image.float().expand(COUNT, 1, SIZE, SIZE).contiguous()
    out = augment(batch, torch.Generator().manual_seed(SEED)).double()[:, 0]
    # The same seed draws the same parameters that augment drew.
    angle, shift, factor = random_affine_params(COUNT, torch.Generator().manual_seed(SEED))

    before = image_moments(image[None])
    after = image_moments(out)
    centre = (SIZE - 1) / 2
    determinant_before = before["xx"] * before["yy"] - before["xy"] ** 2
    determinant_after = after["xx"] * after["yy"] - after["xy"] ** 2
    return {
        # Orientation of the major axis, in degrees from +x towards +y (y points down).
        "angle": torch.rad2deg(0.5 * torch.atan2(2 * after["xy"], after["xx"] - after["yy"])),
        "shift_x": (after["cx"] - centre) / SIZE,
        "shift_y": (after["cy"] - centre) / SIZE,
        # Moments scale with factor**2 per axis, so the determinant scales with factor**4.
        "scale": (determinant_after / determinant_before) ** 0.25,
        "drawn_angle": angle.double(),
        "drawn_shift_x": shift[:, 0].double(),
        "drawn_shift_y": shift[:, 1].double(),
        "drawn_scale": factor.double(),
    }


def ks_statistic_uniform(values: torch.Tensor, low: float, high: float) -> float:
    """Return the Kolmogorov-Smirnov distance between the sample and uniform [low, high]."""
    ordered = torch.sort(values).values
    cdf = ((ordered - low) / (high - low)).clamp(0, 1)
    n = ordered.numel()
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def test_rotation_matches_drawn_angle(recovered):
    error = (recovered["angle"] - recovered["drawn_angle"]).abs().max().item()
    assert error < ANGLE_TOLERANCE_DEGREES


def test_translation_matches_drawn_shift(recovered):
    assert (recovered["shift_x"] - recovered["drawn_shift_x"]).abs().max().item() < SHIFT_TOLERANCE
    assert (recovered["shift_y"] - recovered["drawn_shift_y"]).abs().max().item() < SHIFT_TOLERANCE


def test_scale_matches_drawn_factor(recovered):
    assert (recovered["scale"] - recovered["drawn_scale"]).abs().max().item() < SCALE_TOLERANCE


@pytest.mark.parametrize(
    "name, low, high, tolerance",
    [
        ("angle", -10.0, 10.0, ANGLE_TOLERANCE_DEGREES),
        ("shift_x", -0.1, 0.1, SHIFT_TOLERANCE),
        ("shift_y", -0.1, 0.1, SHIFT_TOLERANCE),
        ("scale", 0.9, 1.1, SCALE_TOLERANCE),
    ],
)
def test_recovered_distribution_is_uniform(recovered, name, low, high, tolerance):
    values = recovered[name]
    width = high - low
    # Range: every value inside the interval, and both ends reached to within 1 % of its width.
    assert values.min().item() > low - tolerance
    assert values.max().item() < high + tolerance
    assert values.min().item() < low + 0.01 * width + tolerance
    assert values.max().item() > high - 0.01 * width - tolerance
    # Mean and standard deviation of uniform [low, high]: (low + high) / 2 and width / sqrt(12).
    # The sample mean's standard error is width / sqrt(12 * COUNT) = 0.0065 * width; allow 4 of them.
    assert abs(values.mean().item() - (low + high) / 2) < 4 * width / math.sqrt(12 * COUNT) + tolerance
    assert abs(values.std().item() - width / math.sqrt(12)) < 0.03 * width / math.sqrt(12) + tolerance
    # Shape: Kolmogorov-Smirnov distance below the 1 % critical value (recovery error widens it
    # by at most tolerance / width).
    assert ks_statistic_uniform(values, low, high) < KS_CRITICAL + tolerance / width


def test_parameters_are_uncorrelated(recovered):
    names = ["angle", "shift_x", "shift_y", "scale"]
    stacked = torch.stack([recovered[name] for name in names])
    correlation = torch.corrcoef(stacked)
    off_diagonal = correlation - torch.eye(len(names), dtype=correlation.dtype)
    # For independent samples the correlation's standard error is 1 / sqrt(COUNT) = 0.022.
    assert off_diagonal.abs().max().item() < 4 / math.sqrt(COUNT)


def test_identity_parameters_leave_image_unchanged():
    # Zero rotation and shift at scale 1 sample every output pixel at its own centre.
    theta = affine_matrices(torch.zeros(1), torch.zeros(1, 2), torch.ones(1))
    image = blob_image().float()[None, None]
    grid = affine_grid(theta, SIZE, SIZE)
    out = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.allclose(out, image, atol=1e-5)


@pytest.mark.parametrize("height, width", [(28, 28), (32, 24), (1, 5)])
def test_affine_grid_matches_torch(height, width):
    theta = affine_matrices(*random_affine_params(16, torch.Generator().manual_seed(3)))
    expected = torch.nn.functional.affine_grid(theta, [16, 3, height, width], align_corners=False)
    grid = affine_grid(theta, height, width)
    assert grid.shape == expected.shape
    assert torch.allclose(grid, expected, atol=1e-6)
