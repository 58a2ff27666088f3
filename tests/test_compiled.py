"""Opt-in torch.compile prediction: same answers as eager, fresh weights, safe fallback."""

import os
import shutil

import numpy as np
import pytest
import timm
import torch

from napari_m2ort import compiled
from napari_m2ort.inference import predict
from napari_m2ort.io.slides import open_slide
from napari_m2ort.model.weights import ModelCard
from napari_m2ort.progress import run_to_end
from napari_m2ort.spots import layout_spots

HAS_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None


@pytest.fixture(scope="module")
def slide(her2st):
    return open_slide(her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg", mpp=0.69)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=8, depth=1).eval()
    card = ModelCard(variant="m2ort_small", genes=[f"G{i}" for i in range(8)], mpp=0.69)
    return model, card


def _centers():
    # a tissue-rich area of C2: 33 Visium spots, so batches of 8 end with a short one
    return layout_spots((4400, 2200, 5000, 2600), "visium").centers_um


def _run(slide, model, card, on=None, **kw):
    return run_to_end(predict(slide, _centers(), model, card, device="cpu", batch_size=8, **kw), on)


def test_compiled_bf16_matches_fp32_and_is_deterministic(slide, tiny):
    model, card = tiny
    ref = _run(slide, model, card, precision="fp32")
    said = {"a": [], "b": []}
    a = _run(slide, model, card, precision="bf16", compile=True, on=lambda e: said["a"].append(e.message))
    b = _run(
        slide,
        model,
        card,
        precision="bf16",
        compile=True,  # reuses the compiled code
        on=lambda e: said["b"].append(e.message),
    )
    # the user is told about the wait on the first run only
    assert any("compiling the model" in m for m in said["a"])
    assert not any("compiling the model" in m for m in said["b"])
    assert len(_centers()) % 8 != 0
    assert a.complete and a.info["compiled"] is HAS_CXX
    rel = np.linalg.norm(a.values - ref.values) / np.linalg.norm(ref.values)
    assert rel < 1e-2, rel
    assert np.array_equal(a.values, b.values)
    # "auto": compiled as part of a large job (a dask tile of a big slide), eager on its own
    big = _run(slide, model, card, precision="bf16", compile="auto", job_spots=compiled.AUTO_MIN_SPOTS)
    alone = _run(slide, model, card, precision="bf16", compile="auto")
    assert big.info["compiled"] is HAS_CXX and alone.info["compiled"] is False
    assert np.array_equal(big.values, a.values)
    # the same spots in a short, padded batch of their own get the same values
    one = run_to_end(
        predict(slide, _centers()[:3], model, card, device="cpu", batch_size=8, precision="bf16", compile=True)
    )
    np.testing.assert_allclose(one.values, a.values[:3], atol=2e-2)


def test_compiled_forward_follows_new_weights(slide, tiny):
    model, card = tiny
    with torch.no_grad():
        model.head.bias.add_(5.0)  # outputs well above 0, where clipping (OUTPUT_RULE) hides nothing
    before = _run(slide, model, card, precision="bf16", compile=True)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # as fine-tuning or loading a checkpoint would
    after = _run(slide, model, card, precision="bf16", compile=True)
    eager = _run(slide, model, card, precision="bf16")
    assert np.abs(after.values - before.values - 1.0).max() < 0.05
    assert np.abs(after.values - eager.values).max() < 0.05


def test_compile_failure_falls_back_to_eager(slide, tiny, monkeypatch):
    model, card = tiny

    def broken(module, **kw):
        def fn(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fn

    monkeypatch.setattr(compiled.torch, "compile", broken)
    compiled.clear_cache(model)
    eager = _run(slide, model, card, precision="bf16")
    with pytest.warns(UserWarning, match="torch.compile failed.*C\\+\\+ compiler"):
        pred = _run(slide, model, card, precision="bf16", compile=True)
    assert pred.complete and pred.info["compiled"] is False
    assert np.array_equal(pred.values, eager.values)


def test_compile_skipped_for_cpu_float32(slide, tiny):
    model, card = tiny
    with pytest.warns(UserWarning, match="skipped for float32 on CPU"):
        pred = _run(slide, model, card, precision="fp32", compile=True)
    assert pred.info["compiled"] is False and pred.complete


def test_decide_when_to_compile():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    big, small = compiled.AUTO_MIN_SPOTS, compiled.AUTO_MIN_SPOTS - 1
    assert compiled.decide("auto", cpu, bf16, big) == (True, None)
    assert compiled.decide("auto", cpu, bf16, small) == (False, None)
    assert compiled.decide("auto", cpu, None, 10**6) == (False, None)  # fp32 CPU: never
    assert compiled.decide("auto", torch.device("cuda"), bf16, 10**6) == (False, None)  # not measured
    assert compiled.decide(True, cpu, bf16, 1) == (True, None)
    assert compiled.decide("off", cpu, bf16, 10**6) == (False, None)
    on_fp32 = compiled.decide("on", cpu, None, 1)
    assert on_fp32[0] is False and "float32 on CPU" in on_fp32[1]
    with pytest.raises(ValueError, match="on, off or auto"):
        compiled.decide("fast", cpu, bf16, 1)
