"""The headless CLI on real data: convert, predict, evaluate, train, and clean errors."""

import json

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from napari_m2ort.cli import main

Image.MAX_IMAGE_PIXELS = None


@pytest.fixture(scope="module")
def c2_crop_tif(her2st, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
    crop = d / "c2 crop.png"
    Image.open(src).crop((4000, 4500, 6500, 7000)).save(crop)
    out = d / "c2.ome.tif"
    assert main(["convert", str(crop), "--out", str(out), "--mpp", "0.69"]) == 0
    return out


def test_predict_region_writes_anndata(c2_crop_tif, tmp_path):
    out = tmp_path / "pred.h5ad"
    rc = main(
        [
            "predict",
            str(c2_crop_tif),
            "--out",
            str(out),
            "--region",
            "300,300,800,700",
            "--layout",
            "visium",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    a = ad.read_h5ad(out)
    assert 15 <= a.n_obs <= 40 and a.n_vars == 250 and "ERBB2" in a.var_names
    assert np.isfinite(a.X).all()
    assert np.allclose(a.obsm["spatial"] * 0.69, a.obsm["spatial_um"], rtol=1e-5)
    assert "model_card" in a.uns["m2ort"]
    lib = next(iter(a.uns["spatial"]))
    assert a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55 / 0.69)


def test_predict_compiled_matches_eager(c2_crop_tif, tmp_path, capsys):
    import os
    import shutil

    args = ["predict", str(c2_crop_tif), "--region", "300,300,800,700", "--device", "cpu", "--precision", "bf16"]
    assert main([*args, "--out", str(tmp_path / "eager.h5ad")]) == 0
    assert main([*args, "--out", str(tmp_path / "compiled.h5ad"), "--compile"]) == 0
    eager, comp = ad.read_h5ad(tmp_path / "eager.h5ad"), ad.read_h5ad(tmp_path / "compiled.h5ad")
    compiled = json.loads(comp.uns["m2ort"]["inference"])["compiled"]
    assert compiled is (shutil.which(os.environ.get("CXX", "g++")) is not None)
    assert ("(compiled)" in capsys.readouterr().out) is compiled
    assert list(eager.obs_names) == list(comp.obs_names)
    rel = np.linalg.norm(comp.X - eager.X) / np.linalg.norm(eager.X)
    assert rel < 1e-2, rel


def test_evaluate_bundled_on_a_section(her2st, tmp_path):
    out = tmp_path / "metrics.json"
    rc = main(
        [
            "evaluate",
            "--her2st",
            str(her2st),
            "--sections",
            "C2",
            "--model",
            "bundled",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    m = json.loads(out.read_text())
    for key in (
        "pcc_gene_mean",
        "pcc_gene_top50",
        "pcc_spot_mean",
        "pcc_spot_mean_baseline",
        "rmse_mean",
        "n_spots",
        "n_genes",
        "n_genes_constant",
        "genes_missing",
    ):
        assert key in m
    assert m["n_spots"] == 186 and m["n_genes"] == 250 and m["genes_missing"] == []
    assert m["pcc_gene_mean"] > 0.1  # C2 was in the bundled model's training data


def test_train_one_epoch_new_panel(her2st, tmp_path):
    rc = main(
        [
            "train",
            "--her2st",
            str(her2st),
            "--sections",
            "C2",
            "--model",
            "m2ort_small",
            "--genes",
            "top:12",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--val",
            "blocks",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert rc == 0
    from napari_m2ort.model.weights import load_checkpoint

    model, card = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert len(card.genes) == 12 and card.target_mean is not None and card.metrics["best_epoch"] == 1
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist[0]["epoch"] == 1 and "val" in hist[0]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys, shared_data):
    assert main(["predict", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "x.h5ad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.svs" in err[0]
    bad = shared_data / "slide_fixtures" / "unopenable.tiff"
    assert main(["predict", str(bad), "--out", str(tmp_path / "x.h5ad")]) == 2
    assert main(["train", "--her2st", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "x.h5ad").exists()
