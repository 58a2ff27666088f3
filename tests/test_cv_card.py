"""The final cross-validation table, the released model card's metrics, and what the
widget says about a card: fake CV results in tmp_path, no external data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cv_table():
    return _module("cv_table_under_test", ROOT / "benchmarks" / "cv_table.py")


@pytest.fixture
def release():
    return _module("release_bundled_under_test", ROOT / "scripts" / "release_bundled.py")


def _grid_entry(pcc: float, markers: float) -> dict:
    return {
        "pcc_gene_mean": pcc,
        "pcc_markers": {"ERBB2": markers, "CD24": markers + 0.1},
        "pcc_markers_mean": markers + 0.05,
    }


def _record(model: str, fold: str, base: float, tag: str) -> dict:
    """One cv_her2st.py result with the fields the tables read; numbers derived from base."""
    train = [s for s in ("C2", "C3", "C4", "C5") if s != fold] + ["B4"]
    inference = {
        "none/0": _grid_entry(base, base),
        "none/100": _grid_entry(base + 0.01, base + 0.02),
        "dihedral/0": _grid_entry(base + 0.002, base),
        "dihedral/100": _grid_entry(base + 0.012, base + 0.03),
    }
    per = {f"{s}:train": {"pcc_gene_mean": base - 0.05 if s != "B4" else base + 0.2} for s in train}
    return {
        "model": model,
        "tag": tag,
        "fold": fold,
        "train_sections": train,
        "lr": 1e-4,
        "epochs": 8,
        "geometry": "dihedral",
        "metrics": dict(inference["none/0"], tta="none", smooth_um=0.0),
        "inference": inference,
        "uncertainty": {"dihedral/0": {"spearman_spot_gene": base + 0.2, "spearman_spot_mean": 0.7}},
        "fit": {"per_section": per, "pcc_gene_mean": base},
        "best_epoch": 4,
        "seconds": 100.0,
    }


BASES = {("m2ort_small", "C2"): 0.20, ("m2ort_small", "C3"): 0.26, ("m2ort_small", "C5"): 0.23, ("resnet18", "C4"): 0.3}


@pytest.fixture
def results(tmp_path, monkeypatch, cv_table):
    tag = cv_table.FINAL_TAG
    for (model, fold), base in BASES.items():
        (tmp_path / f"cv_{model}{tag}_{fold}.json").write_text(json.dumps(_record(model, fold, base, tag)))
    # another recipe of the same model must not enter the final table
    (tmp_path / f"cv_m2ort_small{tag}_long_C4.json").write_text(
        json.dumps(_record("m2ort_small", "C4", 0.9, tag=f"{tag}_long"))
    )
    monkeypatch.setattr(cv_table, "RESULTS", tmp_path)
    return cv_table.load()


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*") for c in line.strip().strip("|").split("|")]


def test_final_table_mean_row_is_mean_of_folds(cv_table, results):
    text = cv_table.final_table(results)
    lines = text.splitlines()
    folds = [_cells(x) for x in lines if x.startswith("| M2ORT-S |")]
    assert [f[1] for f in folds] == ["C2", "C3", "C5"]
    mean_row = _cells(next(x for x in lines if x.startswith("| **M2ORT-S mean**")))
    assert mean_row[1] == "3 of 4 folds (C2, C3, C5)"
    for col in range(2, 10):  # every metric column
        assert float(mean_row[col]) == pytest.approx(sum(float(f[col]) for f in folds) / 3, abs=1e-3)
    # raw, smoothed, markers at the shipped defaults (none/100), uncertainty, fit on C and on B4
    m = [0.20, 0.26, 0.23]
    expect = [sum(m) / 3, sum(m) / 3 + 0.01, sum(m) / 3 + 0.002, sum(m) / 3 + 0.012, sum(m) / 3 + 0.07]
    assert [float(v) for v in mean_row[2:7]] == pytest.approx(expect, abs=1e-3)
    assert float(mean_row[7]) == pytest.approx(sum(m) / 3 + 0.2, abs=1e-3)
    assert float(mean_row[8]) == pytest.approx(sum(m) / 3 - 0.05, abs=1e-3)
    assert float(mean_row[9]) == pytest.approx(sum(m) / 3 + 0.2, abs=1e-3)
    resnet = _cells(next(x for x in lines if x.startswith("| **ST-Net-style ResNet-18 mean**")))
    assert resnet[1] == "1 of 4 folds (C4)" and float(resnet[2]) == pytest.approx(0.3)
    assert "0.900" not in text  # the <FINAL_TAG>_long run stays out
    markers = cv_table.marker_table(results)
    erbb2 = _cells(next(x for x in markers.splitlines() if x.startswith("| ERBB2 |")))
    assert float(erbb2[1]) == pytest.approx(sum(m) / 3 + 0.02, abs=1e-3)  # none/100's markers


def test_final_table_with_all_folds_and_readme(cv_table, results):
    rows = results + [_record("m2ort_small", "C4", 0.25, cv_table.FINAL_TAG)]
    mean_row = next(x for x in cv_table.final_table(rows).splitlines() if x.startswith("| **M2ORT-S mean**"))
    assert _cells(mean_row)[1] == "4 of 4 folds"
    readme = "a\n<!-- cv-final:start -->\nold\n<!-- cv-final:end -->\nb\\n\n"
    out = cv_table.replace_between(readme, cv_table.FINAL_START, cv_table.FINAL_END, "new \\1 table")
    assert out == "a\n<!-- cv-final:start -->\nnew \\1 table\n<!-- cv-final:end -->\nb\\n\n"
    assert cv_table.replace_between("no markers", cv_table.FINAL_START, cv_table.FINAL_END, "x") == "no markers"


def test_card_metrics(release, cv_table, results):
    checkpoint = {
        "validation": {"pcc_gene_mean": 0.31, "per_section": {"C2": {"pcc_gene_mean": 0.3}}},
        "fit": {"per_section": {"C2": {"pcc_gene_mean": 0.4}}, "pcc_gene_mean": 0.4},
        "best_epoch": 7,
        "train_config": {"lr": 1e-4},
    }
    m = release.card_metrics(checkpoint, results, "napari-m2ort train --lr 1e-4", "", cv_table, ["ERBB2", "CD24"])
    for key in ("cross_validation", "fit", "validation", "markers", "inference_defaults", "training_command"):
        assert m[key], key
    assert m["best_epoch"] == 7 and m["train_config"] == {"lr": 1e-4}
    assert m["fit"] == checkpoint["fit"] and m["validation"] == checkpoint["validation"]
    assert "leave_one_section_out_cv_patient_C" not in m and "held_out_spatial_blocks" not in m
    assert "pools" not in json.dumps(m)
    assert m["markers"]["genes"][:2] == ["ERBB2", "GRB7"] and m["markers"]["panel_rule"].startswith("markers+")
    assert "GRB7" in m["markers"]["missing_from_panel"] and "ERBB2" not in m["markers"]["missing_from_panel"]
    assert m["inference_defaults"] == {"tta": cv_table.DEFAULT_TTA, "smooth_um": cv_table.DEFAULT_SMOOTH_UM}
    cv = m["cross_validation"]
    assert cv["design"].startswith("leave-one-section-out over C2–C5") and "B4" in cv["design"]
    assert cv["recipe"]["tag"] == cv_table.FINAL_TAG and "8 epochs" in cv["recipe"]["m2ort_small"]
    s = cv["m2ort_small"]
    assert set(s) == {"C2", "C3", "C5", "mean_over_folds"}
    fold = s["C3"]
    assert fold["pcc_gene_mean_raw"] == pytest.approx(0.26)
    assert fold["pcc_gene_mean_defaults"] == pytest.approx(0.27)
    assert fold["pcc_gene_mean_dihedral_100"] == pytest.approx(0.272)
    assert fold["pcc_markers_mean_defaults"] == pytest.approx(0.33)
    assert fold["pcc_markers_defaults"] == pytest.approx({"ERBB2": 0.28, "CD24": 0.38})
    assert fold["uncertainty_spearman_spot_gene"] == pytest.approx(0.46) and fold["uncertainty_at"] == "dihedral/0"
    assert fold["fit"]["pcc_gene_mean_C_train"] == pytest.approx(0.21)
    assert fold["fit"]["pcc_gene_mean_B4_train"] == pytest.approx(0.46)
    assert fold["fit"]["per_section"]["B4:train"] == pytest.approx(0.46)
    mean = s["mean_over_folds"]
    assert mean["n_folds"] == 3 and mean["folds"] == ["C2", "C3", "C5"]
    for key in (
        "pcc_gene_mean_raw",
        "pcc_gene_mean_defaults",
        "pcc_gene_mean_dihedral_100",
        "pcc_markers_mean_defaults",
    ):
        assert mean[key] == pytest.approx(sum(s[f][key] for f in ("C2", "C3", "C5")) / 3), key
    assert mean["pcc_markers_defaults"]["CD24"] == pytest.approx(0.23 + 0.12)
    assert cv["resnet18"]["mean_over_folds"]["n_folds"] == 1
    json.dumps(m)  # the card is JSON


def test_cross_validated_pcc_new_and_old_cards(release, cv_table, results):
    from napari_m2ort.widgets._models import cross_validated_pcc, describe_card

    metrics = release.card_metrics(
        {}, results + [_record("m2ort_small", "C4", 0.25, cv_table.FINAL_TAG)], "", "", cv_table
    )
    card = SimpleNamespace(variant="m2ort_small", genes=["A"], mpp=0.69, fov_um=155.0, metrics=metrics)
    value, what = cross_validated_pcc(card)
    assert value == pytest.approx((0.20 + 0.26 + 0.23 + 0.25) / 4 + 0.01)  # at the shipped defaults
    assert what == "leave-one-section-out, 4 held-out sections, σ100 µm smoothing"
    assert f"cross-validated PCC-gene {value:.2f} (leave-one-section-out, 4 held-out" in describe_card(card)
    # a variant the card has no folds for says nothing
    assert cross_validated_pcc(SimpleNamespace(variant="m2ort_base", metrics=metrics)) is None
    old = {
        "training_command": "train --lr 1e-4",
        "leave_one_section_out_cv_patient_C": {
            "m2ort_small (lr 0.0001 constant, 15 epochs)": {"mean_over_folds": {"pcc_gene_mean": 0.22}}
        },
    }
    assert cross_validated_pcc(SimpleNamespace(variant="m2ort_small", metrics=old)) == (
        0.22,
        "leave-one-section-out patient C",
    )
