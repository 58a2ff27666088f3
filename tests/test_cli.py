"""The headless CLI on real data: convert, predict, evaluate, train, and clean errors."""

import json

import anndata as ad
import numpy as np
import pytest

from napari_m2ort.cli import main
from napari_m2ort.slide import open_image


@pytest.fixture(scope="module")
def c2_crop_tif(her2st, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = her2st / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
    crop = d / "c2 crop.png"
    with open_image(src) as im:  # the bomb guard is lifted for this open only
        im.crop((4000, 4500, 6500, 7000)).save(crop)
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


def test_evaluate_bundled_on_a_section(her2st, tmp_path, capsys):
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
    from napari_m2ort.tta import DEFAULT_SMOOTH_UM, DEFAULT_TTA, OUTPUT_RULE

    assert m["tta"] == DEFAULT_TTA and m["smooth_um"] == DEFAULT_SMOOTH_UM and m["output_rule"] == OUTPUT_RULE
    assert "pcc_markers" in m and "pcc_markers_mean" in m and m["in_training_data"] == ["C2"]
    err = capsys.readouterr().err
    warned = [x for x in err.splitlines() if x.startswith("warning: ") and "training data" in x]
    assert len(warned) == 1 and "C2" in warned[0]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_train_one_epoch_new_panel(her2st, tmp_path, capsys):
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
            "--weight-decay",
            "0.1",
            "--drop-path",
            "0.2",
            "--target-norm",
            "section_z",
            "--target-smooth",
            "100",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PCC-gene" in printed and "validation" in printed and "fit (training spots)" in printed
    from napari_m2ort.model.weights import load_checkpoint

    model, card = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert len(card.genes) == 12 and card.target_mean is not None and card.metrics["best_epoch"] == 1
    recipe = card.metrics["train_config"]
    assert recipe["drop_path"] == 0.2 and recipe["weight_decay"] == 0.1 and recipe["target_norm"] == "section_z"
    assert recipe["target_smooth_um"] == 100.0
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist[0]["epoch"] == 1 and "val" in hist[0]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys, data_dir):
    assert main(["predict", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "x.h5ad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.svs" in err[0]
    bad = data_dir / "slide_fixtures" / "unopenable.tiff"
    assert main(["predict", str(bad), "--out", str(tmp_path / "x.h5ad")]) == 2
    assert main(["train", "--her2st", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "x.h5ad").exists()


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_predict_output_structure_flags_tta_smoothing(c2_crop_tif, tmp_path, capsys):
    """A region reaching past the slide's corner (negative x0, the --region -X form):
    flags, uncertainty, the inference options and the smoothing note in the file."""
    out = tmp_path / "corner.h5ad"
    args = ["predict", str(c2_crop_tif), "--out", str(out), "--region", "-100,-100,300,300", "--device", "cpu"]
    assert main([*args, "--tta", "flips", "--smooth-um", "120", "--precision", "fp32"]) == 0
    a = ad.read_h5ad(out)
    meta = a.uns["m2ort"]
    assert meta["tta"] == "flips" and meta["smooth_um"] == 120.0 and "smoothed" in meta["smoothing"]
    assert "clipped at 0" in meta["output_rule"] and meta["library_id"] in a.uns["spatial"]
    assert a.layers["uncertainty"].shape == a.shape and np.allclose(
        a.obs["uncertainty"], a.layers["uncertainty"].mean(1)
    )
    assert set(a.obs["flag"]) <= {"ok", "off-slide", "blank", "not-HE"} and (a.obs["flag"] == "off-slide").any()
    assert (np.asarray(a.X) >= 0).all()
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(x.startswith("warning: ") or ":" in x for x in err.splitlines())
    # the same output again: refused unless --overwrite; csv by extension
    assert main(args) == 2
    assert main([*args, "--overwrite", "--tta", "none", "--smooth-um", "0"]) == 0
    b = ad.read_h5ad(out)
    assert b.uns["m2ort"]["tta"] == "none" and "uncertainty" not in b.layers and b.uns["m2ort"]["smoothing"] == "none"
    csv = tmp_path / "corner.csv"
    assert main([*args[:3], str(csv), *args[4:], "--tta", "none"]) == 0
    assert csv.read_text().splitlines()[0].startswith("spot,x_um,y_um,")


def test_help_is_fast_and_says_defaults():
    """--help needs no torch: the parser is built in a process that never imports it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv[0] = 'napari-m2ort'; import napari_m2ort.cli as c; c.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'timm', 'napari', 'dask', 'anndata') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    from napari_m2ort.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "front door" not in text and "M2ORTError" not in text
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
    predict = sub.choices["predict"].format_help()
    from napari_m2ort.tta import DEFAULT_TTA

    assert f"(default: {DEFAULT_TTA})" in predict and "(default: visium)" in predict


def test_cli_choices_match_the_core():
    from napari_m2ort import cli
    from napari_m2ort.augment import GEOMETRIES, STAINS
    from napari_m2ort.losses import LOSSES
    from napari_m2ort.targets import PANEL_RULES
    from napari_m2ort.training import TARGET_NORMS

    assert cli.LOSSES == tuple(LOSSES) and cli.GEOMETRIES == tuple(GEOMETRIES) and cli.STAINS == tuple(STAINS)
    assert cli.PANEL_RULES == tuple(PANEL_RULES) and cli.TARGET_NORMS == tuple(TARGET_NORMS)


def test_section_table():
    from napari_m2ort.cli import section_table

    val = {"per_section": {"C2:val": {"n_spots": 40, "pcc_gene_mean": 0.2, "pcc_spot_mean": 0.5}},
           "pcc_gene_mean": 0.2, "pcc_spot_mean": 0.5, "n_spots": 40}  # fmt: skip
    fit = {"per_section": {"C2:train": {"n_spots": 150, "pcc_gene_mean": 0.4, "pcc_spot_mean": 0.7}},
           "pcc_gene_mean": 0.4, "pcc_spot_mean": 0.7, "n_spots": 150}  # fmt: skip
    table = section_table(val, fit)
    assert "C2:val" in table and "0.200" in table and "C2:train" in table and "0.400" in table
    assert "validation" in table and "fit" in table
