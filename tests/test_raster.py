"""Heat-map rasterisation and colour ranges (no Qt)."""

import numpy as np
import pytest

from napari_m2ort.raster import MIN_SPAN, heatmap_grid, ordered_limits, range_step, shared_range, value_range


def test_value_range_ignores_nan_and_widens_flat_values():
    lo, hi = value_range([1.0, np.nan, 3.0, np.inf], min_span=0.0)
    assert lo == pytest.approx(1.02) and hi == pytest.approx(2.98)  # 1st-99th percentile
    lo, hi = value_range([2.0, 2.0])
    assert (lo, hi) == pytest.approx((2.0 - MIN_SPAN / 2, 2.0 + MIN_SPAN / 2))
    assert value_range([]) == (0.0, 1.0)
    assert value_range([np.nan]) == (0.0, 1.0)


def test_value_range_is_robust_and_tissue_only():
    rng = np.random.default_rng(0)
    tissue = rng.normal(5.0, 1.0, 500)
    glass = np.full(20, 10.2)  # spots on bare glass: far above every tissue spot
    values = np.concatenate([tissue, glass])
    keep = np.r_[np.ones(500, bool), np.zeros(20, bool)]
    lo, hi = value_range(values, keep)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(tissue, [1, 99])))
    assert hi < 10.0
    # a range of 0.002 is not stretched over the colormap
    lo, hi = value_range(5.0 + rng.uniform(0, 0.002, 100))
    assert hi - lo == pytest.approx(MIN_SPAN)
    assert shared_range((0.0, 2.0), (1.0, 3.0)) == (0.0, 3.0)


def test_range_step_and_ordered_limits():
    assert range_step(0.0, 2.0) == pytest.approx(0.1)
    assert range_step(0.0, 0.0) == pytest.approx(1e-3)
    assert ordered_limits(1.0, 3.0) == (1.0, 3.0)
    lo, hi = ordered_limits(2.0, 1.0)
    assert lo == 2.0 and hi > lo


def _hex_spots(n=5, pitch=100.0):
    xs, ys = np.meshgrid(np.arange(n) * pitch, np.arange(n) * pitch)
    return np.stack([xs.ravel() + 1000.0, ys.ravel() + 2000.0], axis=1)


def test_heatmap_covers_spots_and_is_transparent_far_away():
    c = _hex_spots()
    v = np.full(len(c), 2.5)
    img, origin_yx, res = heatmap_grid(c, v, pitch_um=100.0)
    assert res == pytest.approx(10.0)
    # origin is one pitch beyond the outermost spots, (y, x)
    np.testing.assert_allclose(origin_yx, [2000.0 - 100.0, 1000.0 - 100.0])
    # a constant field reads back as that constant wherever it is defined
    finite = np.isfinite(img)
    assert finite.any() and np.allclose(img[finite], 2.5, atol=1e-5)
    # each spot's own pixel holds a value
    rows = np.round((c[:, 1] - origin_yx[0]) / res).astype(int)
    cols = np.round((c[:, 0] - origin_yx[1]) / res).astype(int)
    assert np.isfinite(img[rows, cols]).all()
    # the corners (one pitch ≈ 141 µm diagonally from the nearest spot) are transparent
    assert np.isnan(img[0, 0]) and np.isnan(img[-1, -1])


def test_heatmap_interpolates_between_values():
    c = np.array([[0.0, 0.0], [100.0, 0.0]])
    img, origin_yx, res = heatmap_grid(c, np.array([0.0, 1.0]), pitch_um=100.0)
    row = int(round((0.0 - origin_yx[0]) / res))
    left, mid, right = (int(round((x - origin_yx[1]) / res)) for x in (0.0, 50.0, 100.0))
    assert img[row, left] < img[row, mid] < img[row, right]
    assert img[row, mid] == pytest.approx(0.5, abs=1e-3)


def test_heatmap_skips_nan_values_and_handles_none():
    c = np.array([[0.0, 0.0], [100.0, 0.0]])
    img, _, _ = heatmap_grid(c, np.array([np.nan, 1.0]), pitch_um=100.0)
    assert np.allclose(img[np.isfinite(img)], 1.0)
    img, origin, res = heatmap_grid(c, np.array([np.nan, np.nan]), pitch_um=100.0)
    assert img.shape == (1, 1) and np.isnan(img).all() and res == 1.0


def test_heatmap_coarsens_huge_grids(monkeypatch):
    import napari_m2ort.raster as raster

    monkeypatch.setattr(raster, "MAX_HEATMAP_PIXELS", 10_000)
    c = np.array([[0.0, 0.0], [5000.0, 5000.0]])
    img, _, res = raster.heatmap_grid(c, np.array([1.0, 2.0]), pitch_um=100.0)
    assert img.size <= 10_000 * 1.05 and res > 10.0
