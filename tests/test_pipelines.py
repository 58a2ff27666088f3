"""The use-case layer without Qt: spots for a slide, the model-spec resolver, a tiny prediction."""

from __future__ import annotations

import numpy as np
import pytest

import napari_m2ort
from napari_m2ort import pipelines as P
from napari_m2ort.errors import M2ORTError
from napari_m2ort.model.weights import BUNDLED_PATH
from napari_m2ort.progress import Progress, run_to_end
from napari_m2ort.spots import Region, TissueMask

SAMPLE = napari_m2ort.__file__.replace("__init__.py", "data/her2st_C2/5714_HE_BT_C2.jpg")
REGION = (3100.0, 3400.0, 3300.0, 3600.0)  # µm on the sample: tissue, a few Visium spots
needs_bundled = pytest.mark.skipif(not BUNDLED_PATH.is_file(), reason="bundled weights not installed")


class _Slide:
    """Just what laying out spots needs: the size in µm."""

    size_um = (1000.0, 2000.0)  # (height, width)


# --------------------------------------------------------------------- spots_for_slide


def test_spots_whole_slide_and_region_forms():
    whole = P.spots_for_slide(_Slide())
    assert whole.layout == "visium" and whole.pitch_um == 100 and whole.diameter_um == 55
    xy = whole.centers_um
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < 2000).all() and (xy[:, 1] < 1000).all()
    rect = P.spots_for_slide(_Slide(), [(0, 0, 500, 500)])
    assert 0 < len(rect) < len(whole)
    # one region given as a string, as four numbers, or as a Region: the same spots
    square = np.array([[0, 0], [500, 0], [500, 500], [0, 500]], float)
    for form in ("0,0,500,500", (0, 0, 500, 500), np.array([0, 0, 500, 500]), square, Region.rectangle(0, 0, 500, 500)):
        assert list(P.spots_for_slide(_Slide(), form).ids) == list(rect.ids)
    # overlapping regions: each spot once
    both = P.spots_for_slide(_Slide(), [(0, 0, 500, 500), (250, 0, 750, 500)])
    assert len(set(map(str, both.ids))) == len(both) > len(rect)


def test_spots_layouts_and_tissue():
    st = P.spots_for_slide(_Slide(), [(0, 0, 1000, 1000)], layout="st")
    assert st.pitch_um == 200 and st.diameter_um == 100
    custom = P.spots_for_slide(_Slide(), [(0, 0, 1000, 1000)], "custom", pitch_um=50, diameter_um=20)
    assert custom.pitch_um == 50 and custom.diameter_um == 20 and len(custom) > len(st)
    half = np.zeros((10, 20), bool)
    half[:, :5] = True  # tissue left of x = 500 µm
    on = P.spots_for_slide(_Slide(), tissue_only=True, mask=TissueMask(half, 100.0))
    assert len(on) and (on.centers_um[:, 0] < 500).all()
    with pytest.raises(M2ORTError, match="lies on tissue"):
        P.spots_for_slide(_Slide(), tissue_only=True, mask=TissueMask(np.zeros((10, 20), bool), 100.0))


def test_spots_bad_regions():
    with pytest.raises(M2ORTError, match="four numbers"):
        P.spots_for_slide(_Slide(), "1,2,3")
    with pytest.raises(M2ORTError, match="outside"):
        P.spots_for_slide(_Slide(), [(5000, 5000, 6000, 6000)])
    with pytest.raises(M2ORTError, match="no spot centres"):
        P.spots_for_slide(_Slide(), [(10, 10, 20, 20)])
    assert P.parse_region(None) is None and P.parse_region(" ") is None
    assert P.parse_region("1, 2,3,4") == (1.0, 2.0, 3.0, 4.0)


# --------------------------------------------------------------------- resolve_model


@needs_bundled
def test_resolve_bundled_path_and_pair(tmp_path):
    model, card = P.resolve_model("bundled")
    assert card.variant == "m2ort_small" and len(card.genes) == 250 and not model.training
    _, by_path = P.resolve_model(str(BUNDLED_PATH))
    assert by_path.genes == card.genes
    assert P.checkpoint_path(f"file:{BUNDLED_PATH}") == BUNDLED_PATH.resolve()
    assert P.read_model_card(BUNDLED_PATH).genes == card.genes  # without loading the tensors
    assert P.resolve_model((model, card))[0] is model  # in memory: as it is


def test_resolve_variant_needs_genes():
    model, card = P.resolve_model("m2ort_small", genes=["A", "B", "C"], mpp=0.5)
    assert card.variant == "m2ort_small" and card.genes == ["A", "B", "C"] and card.mpp == 0.5
    assert card.fov_um == pytest.approx(112.0)
    assert P.checkpoint_path("m2ort_small") is None and P.is_variant("m2ort_small")
    with pytest.raises(M2ORTError, match="architecture, not trained weights"):
        P.resolve_model("m2ort_small")


def test_resolve_bad_specs(tmp_path):
    with pytest.raises(M2ORTError, match="give 'bundled', the path of a .safetensors checkpoint"):
        P.resolve_model("no-such-model")
    with pytest.raises(M2ORTError, match="no such model file"):
        P.resolve_model(tmp_path / "missing.safetensors")
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("hello")
    with pytest.raises(M2ORTError, match="safetensors"):
        P.resolve_model(not_weights)
    with pytest.raises(M2ORTError):
        P.resolve_model(42)


def test_model_for_training_new_panel_and_copy():
    class Section:
        name = "S1"

    model, card = P.model_for_training("m2ort_small", [Section()], genes="A,B")
    assert card.genes == ["A", "B"] and card.training_data == "S1" and card.mpp == P.DEFAULT_TRAIN_MPP
    tuned, tuned_card = P.model_for_training((model, card), [Section()], genes="model", train_mpp=0.5)
    assert tuned is not model and tuned_card is not card and card.mpp == P.DEFAULT_TRAIN_MPP
    assert tuned_card.mpp == 0.5 and tuned_card.training_data.endswith("on S1")


def test_drop_path_is_built_into_a_new_model_only():
    """The shipped recipe trains M2ORT-S with stochastic depth; a checkpoint cannot take it."""
    from timm.layers import DropPath

    class Section:
        name = "S1"

    plain, card = P.model_for_training("m2ort_small", [Section()], genes="A,B")
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    model, _ = P.model_for_training("m2ort_small", [Section()], genes="A,B", drop_path=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    with pytest.raises(M2ORTError, match="new model"):
        P.model_for_training((plain, card), [Section()], genes="model", drop_path=0.2)


# --------------------------------------------------------------------- predict_slide


@needs_bundled
def test_predict_slide_small_region_of_the_sample():
    from napari_m2ort.io.slides import open_slide

    slide = open_slide(SAMPLE, mpp=0.69)
    try:
        request = P.PredictRequest(slide, regions=[REGION], device="cpu", precision="fp32", batch_size=8, compile="off")
        events: list[Progress] = []
        result = run_to_end(P.predict_slide(request), events.append)
        n = len(result.spots)
        assert 2 <= n <= 12 and result.n_skipped == 0
        assert any(e.stage == "plan" and e.data["plan"].spots is result.spots for e in events)
        pred = result.prediction
        assert pred.complete and pred.values.shape == (n, 250) and np.isfinite(pred.values).all()
        adata = result.to_anndata()
        assert adata.n_obs == n and "ERBB2" in adata.var_names
        assert np.allclose(adata.obsm["spatial_um"], result.spots.centers_um)
        # the same spots again: nothing left to predict
        again = run_to_end(
            P.predict_slide(
                P.PredictRequest(slide, regions=[REGION], device="cpu", skip_ids=[str(i) for i in result.spots.ids])
            )
        )
        assert again.prediction is None and again.n_skipped == n and len(again.spots) == 0
        # inference options reach inference.predict
        tta = P.PredictRequest(slide, regions=[REGION], device="cpu", precision="fp32", tta="flips", smooth_um=150.0)
        with_tta = run_to_end(P.predict_slide(tta)).prediction
        assert with_tta.info["tta"] == "flips" and with_tta.info["smooth_um"] == 150.0
        assert with_tta.uncertainty is not None and with_tta.uncertainty.shape == (n, 250)
    finally:
        slide.close()


def test_memory_spec_for_widgets():
    """A fine-tuned model handed around as a "memory:<key>" string (the widgets store
    specs as strings) resolves like the pair itself, for prediction and training."""
    import gc

    class Section:
        name = "S1"

    model, card = P.model_for_training("m2ort_small", [Section()], genes="A,B")
    spec = P.remember_model(model, card)
    assert spec.startswith("memory:") and P.resolve_model(spec)[0] is model
    assert P.read_model_card(spec) is card and P.checkpoint_path(spec) is None
    tuned, tuned_card = P.model_for_training(spec, [Section()], genes="model")
    assert tuned is not model and tuned_card.training_data.endswith("on S1")
    del model, tuned
    gc.collect()
    with pytest.raises(M2ORTError, match="no longer available"):
        P.resolve_model(spec)


def test_checks_and_size_estimate():
    from napari_m2ort.pipelines import checks

    # a 1 µm pitch over 10 x 10 mm: estimated, never laid out
    n = P.estimate_spots((10_000.0, 10_000.0), [(0, 0, 10_000, 10_000)], "custom", 1.0, 1.0)
    assert 1e8 <= n <= 1.01e8
    with pytest.raises(M2ORTError, match="above the limit"):
        checks.check_size(n)
    assert "large job" in checks.check_size(200_000)
    assert checks.check_size(500) is None
    with pytest.raises(M2ORTError, match="above the limit of 10 spots"):
        P.spots_for_slide(_Slide(), max_spots=10)
    assert P.trained_on(type("C", (), {"training_data": "C2, C3, C4, C5, B4"})(), ["C2", "A1", "B4"]) == ["C2", "B4"]
