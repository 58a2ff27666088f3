"""Inference engine: shapes, determinism, stop-and-resume, bad input."""

import numpy as np
import pytest
import timm
import torch

from napari_m2ort.errors import M2ORTError
from napari_m2ort.inference import predict
from napari_m2ort.io.slides import open_slide
from napari_m2ort.model.weights import ModelCard
from napari_m2ort.progress import run_to_end
from napari_m2ort.spots import layout_spots


@pytest.fixture(scope="module")
def slide(her2st):
    return open_slide(her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg", mpp=0.69)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=8, depth=1).eval()
    card = ModelCard(variant="m2ort_small", genes=[f"G{i}" for i in range(8)], mpp=0.69)
    return model, card


def _centers(n_side=200.0):
    # a tissue-rich area of C2 (spot 25x13 sits at 6930, 3510 px)
    return layout_spots((4400, 2200, 4400 + n_side * 3, 2200 + n_side * 2), "visium").centers_um


def test_predict_shapes_and_determinism(slide, tiny):
    model, card = tiny
    centers = _centers()
    a = run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=8))
    b = run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=8))
    assert a.values.shape == (len(centers), 8) and a.complete
    assert np.isfinite(a.values).all()
    assert np.array_equal(a.values, b.values)
    assert a.info["device"] == "cpu"


def test_stop_keeps_partial_results_and_resume_completes(slide, tiny):
    model, card = tiny
    centers = _centers()
    events = []
    gen = predict(slide, centers, model, card, device="cpu", batch_size=8, should_stop=lambda: len(events) >= 1)

    def on(ev):
        if ev.data.get("indices") is not None:
            events.append(ev)

    part = run_to_end(gen, on)
    assert part.info["stopped"] and 0 < part.n_done < len(centers)
    assert np.isnan(part.values[~part.done]).all() and np.isfinite(part.values[part.done]).all()
    # resume: predict only what is missing, then compare with a full run
    rest = run_to_end(predict(slide, centers[~part.done], model, card, device="cpu", batch_size=8))
    merged = part.values.copy()
    merged[~part.done] = rest.values
    full = run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=8))
    np.testing.assert_allclose(merged, full.values, rtol=1e-5, atol=1e-5)


def test_bad_input(slide, tiny):
    model, card = tiny
    with pytest.raises(M2ORTError, match="no spots"):
        run_to_end(predict(slide, np.zeros((0, 2)), model, card, device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(M2ORTError, match="not available"):
            run_to_end(predict(slide, _centers(), model, card, device="cuda"))


def test_blank_patches_warn(slide, tiny):
    model, card = tiny
    with pytest.warns(UserWarning, match="no tissue"):
        pred = run_to_end(
            predict(slide, np.array([[-1000.0, -1000.0], [6400 * 0.69, 300.0]]), model, card, device="cpu")
        )
    assert pred.blank[0] and pred.outside[0]


def test_bf16_autocast_close_to_fp32(slide, tiny):
    model, card = tiny
    centers = _centers()[:8]
    a = run_to_end(predict(slide, centers, model, card, device="cpu", precision="fp32"))
    b = run_to_end(predict(slide, centers, model, card, device="cpu", precision="bf16"))
    rel = np.abs(a.values - b.values).max() / np.abs(a.values).max()
    assert rel < 1e-2


def test_cpu_chunks_make_values_independent_of_batch_size(slide, tiny):
    """On CPU every spot is computed in a chunk of CPU_CHUNK patches (the last padded), so
    the batch size a caller picks (predict 64, evaluate, a GUI setting) cannot change a
    value, and the model only ever sees one input shape."""
    from napari_m2ort import inference

    model, card = tiny
    centers = _centers()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        runs = [run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=bs)) for bs in (3, 16, 37)]
    finally:
        hook.remove()
    assert len(centers) % inference.CPU_CHUNK != 0  # the last chunk is padded
    for other in runs[1:]:
        assert np.array_equal(runs[0].values, other.values)
    assert {s[0] for s in seen} == {inference.CPU_CHUNK}


def test_first_batch_is_smaller_and_changes_no_value(slide, tiny):
    """The widget asks for a small first batch (first colours sooner); the batches that
    follow keep the batch size, and the values are those of a plain run."""
    model, card = tiny
    centers = _centers()
    plain = run_to_end(predict(slide, centers, model, card, device="cpu", batch_size=8))
    sizes = []
    job = predict(slide, centers, model, card, device="cpu", batch_size=8, first_batch=3)
    try:
        while True:
            ev = next(job)
            if ev.data and "indices" in ev.data:
                sizes.append(len(ev.data["indices"]))
    except StopIteration as stop:
        quick = stop.value
    n = len(centers)
    assert sizes[0] == 3 and all(s == 8 for s in sizes[1:-1]) and sum(sizes) == n
    assert np.array_equal(plain.values, quick.values)


def test_warm_up_model_runs_one_blank_chunk(tiny):
    from napari_m2ort import inference

    model, _ = tiny
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        inference.warm_up_model(model, device="cpu")
    finally:
        hook.remove()
    assert [s[0] for s in seen] == [inference.CPU_CHUNK]
