"""``napari-m2ort demo`` end to end, in a subprocess without DISPLAY (it starts its own Xvfb)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sample_genes import SAMPLE_GENES

pytestmark = pytest.mark.gui


def _demo_command(out: Path, tmp: Path) -> list[str]:
    import napari_m2ort  # noqa: F401
    from napari_m2ort.model.weights import BUNDLED_PATH

    if Path(BUNDLED_PATH).is_file():
        return [sys.executable, "-m", "napari_m2ort", "demo", "--out", str(out), "--spots", "12"]
    # no bundled weights yet: the same demo with a small untrained checkpoint
    import timm

    from napari_m2ort.model.weights import ModelCard, save_checkpoint

    ckpt = tmp / "tiny.safetensors"
    save_checkpoint(
        timm.create_model("m2ort_small", num_classes=len(SAMPLE_GENES)),
        ModelCard(variant="m2ort_small", genes=list(SAMPLE_GENES), mpp=0.69),
        ckpt,
    )
    code = (
        "import sys; import napari_m2ort; from napari_m2ort.demo import run_demo; "
        f"sys.exit(run_demo(out={str(out)!r}, gene=None, spots=12, device='auto', model={str(ckpt)!r}))"
    )
    return [sys.executable, "-c", code]


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")
def test_demo_writes_h5ad_and_overlay(tmp_path):
    import anndata as ad
    from PIL import Image

    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM")}
    proc = subprocess.run(_demo_command(out, tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    h5ad, png = out / "predictions.h5ad", out / "overlay.png"
    assert str(h5ad) in proc.stdout and str(png) in proc.stdout
    assert "time from Predict to overlay" in proc.stdout
    adata = ad.read_h5ad(h5ad)
    assert 5 <= adata.n_obs <= 25
    assert np.isfinite(adata.X).all()
    assert "spatial" in adata.obsm and "m2ort" in adata.uns
    # the structure napari-m2ort predict writes (pipelines.write_prediction)
    assert "flag" in adata.obs and {"tta", "smooth_um", "output_rule", "library_id"} <= set(adata.uns["m2ort"])
    assert adata.uns["m2ort"]["library_id"] in adata.uns["spatial"]
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img.std() > 20  # tissue and spots, not a black frame
    assert (img.mean(axis=2) > 100).mean() > 0.3  # mostly H&E, not the black background


def _her2st_layout_of_sample(root: Path) -> Path:
    """The bundled sample C2 in the almaan/her2st folder layout (links, no copies)."""
    from napari_m2ort.sample_data import SAMPLE_DIR

    for sub, name in (
        ("ST-cnts", "C2.tsv.gz"),
        ("ST-spotfiles", "C2_selection.tsv"),
        ("ST-imgs/C/C2", "5714_HE_BT_C2.jpg"),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).symlink_to(SAMPLE_DIR / name)
    return root


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")
def test_demo_compare_equals_evaluate(tmp_path):
    """``demo --compare`` (the widget's "Predict at measured spots" on the sample) scores
    the section exactly as ``napari-m2ort evaluate`` does, with the same TTA/smoothing."""
    import json

    from PIL import Image

    import napari_m2ort  # noqa: F401
    from napari_m2ort.model.weights import BUNDLED_PATH

    if not Path(BUNDLED_PATH).is_file():
        pytest.skip("the bundled weights are not installed")
    out, opts = tmp_path / "cmp", ["--tta", "flips", "--smooth-um", "150"]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM")}
    demo = [sys.executable, "-m", "napari_m2ort", "demo", "--out", str(out), "--compare", "--device", "cpu", *opts]
    proc = subprocess.run(demo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    her2st = _her2st_layout_of_sample(tmp_path / "her2st")
    metrics = tmp_path / "metrics.json"
    evaluate = [sys.executable, "-m", "napari_m2ort", "evaluate", "--her2st", str(her2st), "--sections", "C2",
                "--model", "bundled", "--device", "cpu", "--out", str(metrics), *opts]  # fmt: skip
    proc = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training data" in proc.stderr  # C2 trained the bundled model: evaluate says so
    got, want = json.loads((out / "compare.json").read_text()), json.loads(metrics.read_text())
    assert got["tta"] == want["tta"] == "flips" and got["smooth_um"] == want["smooth_um"] == 150
    for key in ("pcc_gene_mean", "pcc_spot_mean", "pcc_spot_mean_baseline"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["n_spots"] == want["n_spots"] and got["n_genes"] == want["n_genes"]
    assert [g["gene"] for g in got["per_gene"]] == [g["gene"] for g in want["per_gene"]]
    for a, b in zip(got["per_gene"], want["per_gene"]):
        assert a["pcc"] == pytest.approx(b["pcc"], abs=1e-9, nan_ok=True), a["gene"]
    img = np.asarray(Image.open(out / "compare.png").convert("RGB")).astype(float)
    assert img.shape[0] > 800 and img.shape[1] > 1200  # the whole window, docks included
    assert img.std() > 20
