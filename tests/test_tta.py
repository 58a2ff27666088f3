"""Test-time views, smoothing and the uncertainty they give, on the real C2 section."""

import numpy as np
import pytest
import timm
import torch

from napari_m2ort.errors import M2ORTError
from napari_m2ort.inference import forward_views, predict
from napari_m2ort.io.slides import open_slide
from napari_m2ort.model.weights import ModelCard
from napari_m2ort.patches import sample_spots
from napari_m2ort.progress import run_to_end
from napari_m2ort.spots import layout_spots
from napari_m2ort.tta import DEFAULT_SMOOTH_UM, DEFAULT_TTA, TTA_MODES, check_smooth_um, check_tta, smooth, view


@pytest.fixture(scope="module")
def slide(her2st):
    return open_slide(her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg", mpp=0.69)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=6, depth=1).eval()
    card = ModelCard(variant="m2ort_small", genes=[f"G{i}" for i in range(6)], mpp=0.69)
    return model, card


def test_views_are_the_eight_symmetries_of_a_real_patch(slide):
    centers = layout_spots((4400, 2200, 4700, 2400), "visium").centers_um[:2]
    x = sample_spots(slide, centers, 0.69).level1
    views = [view(x, k) for k in range(8)]
    assert len({v.tobytes() for v in views}) == 8
    for v in views:  # same pixels, rearranged
        assert v.shape == x.shape and np.array_equal(np.sort(v, axis=None), np.sort(x, axis=None))
    assert np.array_equal(view(x, 1), x[:, :, ::-1]) and np.array_equal(view(x, 2), x[:, ::-1])


def test_tta_mean_spread_and_clip(slide, tiny):
    model, card = tiny
    centers = layout_spots((4400, 2200, 4800, 2500), "visium").centers_um
    x = sample_spots(slide, centers, 0.69).level1
    m1, s1 = forward_views(model, x, torch.device("cpu"), None, "none")
    m8, s8 = forward_views(model, x, torch.device("cpu"), None, "dihedral")
    assert s1 is None and s8.shape == m8.shape and (s8 >= 0).all() and s8.max() > 0
    assert (m1 >= 0).all() and (m8 >= 0).all()
    raw = [np.maximum(forward_views(model, view(x, k), torch.device("cpu"), None, "none")[0], 0) for k in range(8)]
    np.testing.assert_allclose(m8, np.mean(raw, axis=0), rtol=1e-5, atol=1e-5)
    # predict() returns the same values and reports the spread
    pred = run_to_end(
        predict(slide, centers, model, card, device="cpu", batch_size=8, precision="fp32", tta="dihedral", smooth_um=0)
    )
    assert pred.uncertainty is not None and pred.uncertainty.shape == pred.values.shape
    np.testing.assert_allclose(pred.values, m8, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pred.uncertainty, s8, rtol=1e-3, atol=1e-4)
    assert pred.info["tta"] == "dihedral"


def test_smoothing_by_hand_and_only_over_allowed_spots():
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [1000.0, 0.0]])
    values = np.array([[0.0], [1.0], [5.0]], dtype=np.float32)
    out = smooth(values, centers, 100.0)
    w = np.exp(-0.5)  # neighbour 1 sigma away; the third spot is 10 sigma away
    assert out[0, 0] == pytest.approx(w / (1 + w))
    assert out[1, 0] == pytest.approx(1 / (1 + w))
    assert out[2, 0] == pytest.approx(5.0)
    kept = smooth(values, centers, 100.0, use=np.array([True, False, True]))
    assert kept[0, 0] == 0.0 and kept[1, 0] == 1.0  # a flagged spot neither gives nor takes
    assert np.array_equal(smooth(values, centers, 0), values)


def test_smoothing_in_predict_matches_smoothing_after(slide, tiny):
    model, card = tiny
    centers = layout_spots((4400, 2200, 4800, 2500), "visium").centers_um
    raw = run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=8, smooth_um=0))
    sm = run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=8, smooth_um=100))
    use = raw.done & ~raw.outside & ~raw.blank
    np.testing.assert_allclose(sm.values, smooth(raw.values, centers, 100, use=use), rtol=1e-5, atol=1e-5)
    assert sm.info["smooth_um"] == 100 and raw.info["smooth_um"] == 0


def test_options_checked():
    assert DEFAULT_TTA in TTA_MODES and check_smooth_um(DEFAULT_SMOOTH_UM) == DEFAULT_SMOOTH_UM
    with pytest.raises(M2ORTError, match="test-time augmentation"):
        check_tta("rotate45")
    for bad in (-1, float("nan"), "x", 1e9):
        with pytest.raises(M2ORTError, match="Smoothing"):
            check_smooth_um(bad)
