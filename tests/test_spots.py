"""Spot layouts: spacing, counts inside known regions, stable ids, bad regions."""

import math

import numpy as np
import pytest

from napari_m2ort.errors import M2ORTError
from napari_m2ort.spots import Region, layout_spots, restrict_to_tissue, tissue_mask_from_rgb


def _nearest(centers):
    d = np.sqrt(((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return d.min(1)


def test_visium_hex_spacing_and_count():
    spots = layout_spots((0, 0, 1000, 1000), "visium")
    assert spots.diameter_um == 55 and spots.pitch_um == 100
    nn = _nearest(spots.centers_um)
    assert np.allclose(nn, 100.0)
    # rows every 86.6 µm: 12 rows (0..952.6); even rows 11 spots (0..1000), odd rows 10
    rows = np.unique(np.round(spots.centers_um[:, 1], 3))
    assert np.allclose(np.diff(rows), 100 * math.sqrt(3) / 2)
    assert len(rows) == 12
    assert len(spots) == 6 * 11 + 6 * 10


def test_st_square_grid():
    spots = layout_spots((100, 100, 900, 500), "st")
    assert spots.diameter_um == 100 and spots.pitch_um == 200
    xs = np.unique(spots.centers_um[:, 0])
    ys = np.unique(spots.centers_um[:, 1])
    assert list(xs) == [200, 400, 600, 800] and list(ys) == [200, 400]
    assert len(spots) == 8
    assert np.allclose(_nearest(spots.centers_um), 200)


def test_custom_layout_and_polygon():
    tri = Region(np.array([[0, 0], [1000, 0], [0, 1000]], float))
    spots = layout_spots(tri, "custom", pitch_um=50, diameter_um=30)
    assert spots.diameter_um == 30
    assert np.all(spots.centers_um.sum(1) <= 1000 + 1e-6)
    full = layout_spots((0, 0, 1000, 1000), "custom", pitch_um=50, diameter_um=30)
    assert 0.45 < len(spots) / len(full) < 0.56


def test_global_grid_ids_are_stable_across_regions():
    a = layout_spots((0, 0, 600, 600), "visium")
    b = layout_spots((300, 300, 900, 900), "visium")
    common = set(a.ids) & set(b.ids)
    assert common
    pa = {i: tuple(c) for i, c in zip(a.ids, a.centers_um)}
    pb = {i: tuple(c) for i, c in zip(b.ids, b.centers_um)}
    assert all(np.allclose(pa[i], pb[i]) for i in common)


def test_bad_regions():
    with pytest.raises(M2ORTError, match="empty"):
        layout_spots((10, 10, 10, 500), "visium")
    with pytest.raises(M2ORTError, match="outside"):
        layout_spots((5000, 5000, 6000, 6000), "visium", slide_size_um=(1000, 1000))
    with pytest.raises(M2ORTError, match="layout"):
        layout_spots((0, 0, 100, 100), "hexagons")
    with pytest.raises(M2ORTError, match="pitch"):
        layout_spots((0, 0, 100, 100), "custom")


def test_region_clipped_to_slide():
    spots = layout_spots((-500, -500, 500, 500), "st", slide_size_um=(1000, 1000))
    assert (spots.centers_um >= 0).all()


def test_tissue_mask_on_synthetic_and_no_tissue_error():
    rgb = np.full((100, 100, 3), 240, np.uint8)
    rgb[20:60, 30:80] = (200, 120, 180)  # pink tissue
    mask = tissue_mask_from_rgb(rgb, um_per_px=10.0)
    assert mask.mask[40, 50] and not mask.mask[90, 10]
    spots = layout_spots((0, 0, 1000, 1000), "st")
    on = restrict_to_tissue(spots, mask)
    assert 0 < len(on) < len(spots)
    assert np.all((on.centers_um[:, 0] >= 300) & (on.centers_um[:, 0] < 800))
    blank = tissue_mask_from_rgb(np.full((50, 50, 3), 245, np.uint8), 10.0)
    with pytest.raises(M2ORTError, match="tissue"):
        restrict_to_tissue(spots, blank)


def test_edges_are_included_whatever_the_winding():
    a = layout_spots((0, 0, 1000, 1000), "st")
    napari_rect = np.array([[1000, 0], [1000, 1000], [0, 1000], [0, 0]], float)  # (y, x), other winding
    b = layout_spots(Region.from_napari_shape(napari_rect), "st")
    assert len(a) == len(b) == 36
