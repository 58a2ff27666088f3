"""Bad input to the CLI, built from real files: exit code 2, one line, no traceback,
nothing written, and memory bounded where a value would have asked for a huge job.

One small real slide serves every case: the packaged HER2+ C2 JPEG (0.69 µm/px). Every
case here is refused before any pixel is decoded or the model runs, so the file is fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import napari_m2ort
from napari_m2ort.cli import main
from napari_m2ort.errors import M2ORTError

PKG = Path(napari_m2ort.__file__).resolve().parent
SLIDE = PKG / "data" / "her2st_C2" / "5714_HE_BT_C2.jpg"
DATA = Path(__file__).resolve().parent / "data"
LOWRES = DATA / "visium_spaceranger" / "spatial" / "tissue_lowres_image.png"  # ~13.7 µm/px
MOUSE = DATA / "squidpy_mouse_brain" / "test_img.jpg"


def _refused(capsys, argv, written=()):
    """Run the CLI; assert exit code 2, exactly one stderr line, no traceback, nothing written."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and ".tmp" not in err
    for p in written:
        assert not Path(p).exists(), p
    return lines[0]


PREDICT = ["predict", SLIDE, "--mpp", "0.69", "--device", "cpu"]


def test_colour_flags_do_not_depend_on_the_other_spots(monkeypatch):
    """The colour test reads one thumbnail per slide file (cached, so a prefetch makes it
    instant) and judges each spot on the part of it under the spots asked about: a spot's
    flag is the same asked alone, in a region, or with the whole section."""
    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.pipelines import domain

    slide = open_slide(SLIDE, mpp=0.69, quiet=True)
    try:
        h, w = slide.size_um
        grid = np.stack(np.meshgrid(np.arange(-200, w + 200, 300.0), np.arange(-200, h + 200, 300.0)), -1)
        grid = grid.reshape(-1, 2)
        everything = domain.colour_flags(slide, grid, 155.0)
        assert {"ok", "blank"} <= set(everything)
        reads = []
        monkeypatch.setattr(type(slide), "thumbnail", lambda *a, **k: reads.append(1) / 0)  # cached: never read
        for part in (slice(0, 1), slice(40, 60), slice(len(grid) - 7, None)):
            assert list(domain.colour_flags(slide, grid[part], 155.0)) == list(everything[part])
        assert not reads
    finally:
        slide.close()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--layout", "custom", "--pitch", "100", "--diameter", "-55"], "diameter"),
        (["--layout", "custom", "--pitch", "nan"], "pitch"),
        (["--layout", "custom", "--pitch", "inf"], "pitch"),
        (["--batch-size", "-4"], "batch size"),
        (["--batch-size", "0"], "batch size"),
        (["--mpp", "0"], "pixel size"),
        (["--mpp", "-1"], "pixel size"),
        (["--region", "1,2,3"], "four numbers"),
        (["--region", "0,0,0,100"], "no area"),
        (["--region", "nan,0,100,100"], "finite"),
        (["--smooth-um", "-1"], "smoothing"),
        (["--smooth-um", "nan"], "smoothing"),
        (["--tta", "sideways"], "invalid choice"),
        (["--max-spots", "0"], "max-spots"),
        (["--batch-size", "four"], "invalid int"),
    ],
)
def test_predict_bad_numbers(capsys, tmp_path, extra, words):
    out = tmp_path / "p.h5ad"
    line = _refused(capsys, [*PREDICT, "--out", out, *extra], [out])
    assert words.lower() in line.lower(), line


def test_negative_region_parses_both_ways():
    from napari_m2ort.cli import _join_negative, build_parser
    from napari_m2ort.pipelines import parse_region

    for argv in (["--region", "-5,0,100,100"], ["--region=-5,0,100,100"]):
        args = build_parser().parse_args(_join_negative(["predict", "s.tif", "--out", "o.h5ad", *argv]))
        assert parse_region(args.region) == (-5.0, 0.0, 100.0, 100.0)


@pytest.mark.parametrize("name", ["p.txt", "p.h5", "p"])
def test_predict_unsupported_output_type(capsys, tmp_path, name):
    out = tmp_path / name
    line = _refused(capsys, [*PREDICT, "--out", out], [out])
    assert str(out) in line and ".h5ad" in line and ".csv" in line


def test_predict_output_is_a_folder_or_exists(capsys, tmp_path):
    folder = tmp_path / "x.h5ad"
    folder.mkdir()
    line = _refused(capsys, [*PREDICT, "--out", folder])
    assert "is a folder" in line and str(folder) in line
    existing = tmp_path / "old.csv"
    existing.write_text("keep me")
    line = _refused(capsys, [*PREDICT, "--out", existing])
    assert "--overwrite" in line and existing.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_predict_read_only_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _refused(capsys, [*PREDICT, "--out", ro / "p.h5ad"], [ro / "p.h5ad"])
        assert "not writable" in line and str(ro) in line
    finally:
        ro.chmod(0o755)


def test_predict_missing_or_unopenable_slide(capsys, tmp_path):
    out = tmp_path / "p.h5ad"
    line = _refused(capsys, ["predict", tmp_path / "missing.svs", "--out", out], [out])
    assert "missing.svs" in line
    _refused(capsys, ["predict", DATA / "slide_fixtures" / "unopenable.tiff", "--out", out], [out])


def test_size_budget_refused_with_estimate(capsys, tmp_path):
    out = tmp_path / "p.h5ad"
    line = _refused(capsys, [*PREDICT, "--out", out, "--max-spots", "100"], [out])
    assert "above the limit of 100 spots" in line and "memory" in line and "--max-spots" in line


def test_size_budget_memory_bounded(tmp_path):
    """A 1 µm pitch over the whole slide means ~45 M spots: refused from the estimate,
    in a process whose peak memory stays that of a plain start (no layout allocated)."""
    out = tmp_path / "p.h5ad"
    code = textwrap.dedent(
        f"""
        import sys
        from napari_m2ort.cli import main
        sys.exit(main(["predict", {str(SLIDE)!r}, "--mpp", "0.69", "--out", {str(out)!r}, "--layout", "custom",
                       "--pitch", "1", "--diameter", "1", "--device", "cpu"]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
    assert len(lines) == 1 and "spots" in lines[0] and "memory" in lines[0], err
    assert "Traceback" not in err and not out.exists()
    peak_mb = usage.ru_maxrss / 1024  # kB on Linux
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB"


def test_resolution_far_coarser_refused(capsys, tmp_path):
    out = tmp_path / "p.h5ad"
    line = _refused(capsys, ["predict", LOWRES, "--mpp", "13.7", "--out", out, "--device", "cpu"], [out])
    assert "coarser" in line and "13.7 µm/px" in line and "0.69 µm/px" in line and "--force" in line


def test_resolution_rules_in_the_core():
    from napari_m2ort.pipelines.domain import check_resolution

    assert check_resolution(0.5, 0.69) is None and check_resolution(0.9, 0.69) is None
    warn = check_resolution(2.0, 0.69)
    assert "coarser" in warn and "2 µm/px" in warn and "0.69 µm/px" in warn
    with pytest.raises(M2ORTError, match="coarser"):
        check_resolution(13.7, 0.69)
    assert "coarser" in check_resolution(13.7, 0.69, force=True)


def test_colour_flags_on_real_images(tmp_path):
    """H&E (the C2 section, the mouse-brain crop, the Visium low-res image) passes; the
    same C2 tissue in greyscale is flagged not-HE; glass is blank."""

    from napari_m2ort.io.slides import open_slide
    from napari_m2ort.pipelines.domain import colour_flags, flag_warning
    from napari_m2ort.slide import open_image

    with open_image(SLIDE) as im:  # the bomb guard is lifted for this open only
        crop = im.crop((4000, 4500, 6000, 6500))
    crop.save(tmp_path / "he.png")
    crop.convert("L").convert("RGB").save(tmp_path / "grey.png")
    grid = np.stack(np.meshgrid(np.arange(100, 1300, 100.0), np.arange(100, 1300, 100.0)), -1).reshape(-1, 2)

    def flags(path, mpp, centres):
        slide = open_slide(path, mpp=mpp, quiet=True)
        try:
            return colour_flags(slide, centres, 155.0)
        finally:
            slide.close()

    he = flags(tmp_path / "he.png", 0.69, grid)
    assert (he == "ok").mean() > 0.8 and flag_warning(he) is None
    grey = flags(tmp_path / "grey.png", 0.69, grid)
    assert (grey == "not-HE").mean() > 0.8 and "not-HE" in flag_warning(grey)
    import anndata as ad

    spots = np.asarray(ad.read_h5ad(MOUSE.parent / "test_data.h5ad").obsm["spatial"], float)  # px = µm at 1
    mouse = flags(MOUSE, 1.0, spots)
    assert (mouse == "ok").mean() > 0.8, mouse
    lowres = flags(LOWRES, 13.7, np.array([[4100.0, 4100.0]]))
    assert lowres[0] == "ok"
    corner = flags(SLIDE, 0.69, np.array([[60.0, 60.0]]))  # glass at the corner of the section
    assert corner[0] == "blank"
    # tinted glass with the ST array's printed dots, up and left of the tissue
    dotted = np.stack(np.meshgrid(np.arange(250, 1000, 100.0), np.arange(250, 800, 100.0)), -1).reshape(-1, 2)
    assert (flags(SLIDE, 0.69, dotted) == "blank").all()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--epochs", "0"], "epochs"),
        (["--lr", "nan"], "learning rate"),
        (["--lr", "-1"], "learning rate"),
        (["--batch-size", "0"], "batch size"),
        (["--ema", "1.5"], "ema"),
        (["--warmup", "-1"], "warmup"),
        (["--loss", "l1"], "invalid choice"),
        (["--target-smooth", "-5"], "target smoothing"),
        (["--target-norm", "section_z", "--loss", "poisson"], "raw counts"),
    ],
)
def test_train_bad_numbers(capsys, tmp_path, extra, words):
    out = tmp_path / "run"
    line = _refused(capsys, ["train", "--her2st", tmp_path, "--sections", "C2", "--out", out, *extra], [out])
    assert words in line.lower(), line


def test_train_out_is_a_file_or_holds_a_model(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("not a folder")
    line = _refused(capsys, ["train", "--her2st", tmp_path, "--sections", "C2", "--out", f])
    assert "is a file" in line and str(f) in line and f.read_text() == "not a folder"
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_text("an earlier model")
    line = _refused(capsys, ["train", "--her2st", tmp_path, "--sections", "C2", "--out", run])
    assert "--overwrite" in line and (run / "model.safetensors").read_text() == "an earlier model"


def test_train_refused_by_the_model_leaves_no_folder(capsys, tmp_path, her2st):
    """Drop path is built into a new model only: the bundled one refuses it, after the
    output folder was made; the folder goes again, so nothing half-made stays."""
    out = tmp_path / "new" / "run"
    argv = ["train", "--her2st", her2st, "--sections", "C2", "--model", "bundled", "--drop-path", "0.2", "--out", out]
    line = _refused(capsys, argv, [out, out.parent])
    assert "drop path" in line.lower(), line


def test_evaluate_bad_output_and_options(capsys, tmp_path):
    out = tmp_path / "metrics.txt"
    line = _refused(capsys, ["evaluate", "--her2st", tmp_path, "--sections", "C2", "--out", out], [out])
    assert ".json" in line
    out = tmp_path / "metrics.json"
    _refused(capsys, ["evaluate", "--her2st", tmp_path, "--sections", "C2", "--out", out, "--smooth-um", "inf"], [out])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--workers", "0"], "workers"),
        (["--tile-spots", "-1"], "tile-spots"),
        (["--threads-per-worker", "0"], "threads"),
        (["--batch-size", "-4"], "batch size"),
        (["--region", "1,2,3"], "four numbers"),
    ],
)
def test_batch_bad_options_before_any_cluster(capsys, tmp_path, extra, words):
    out = tmp_path / "batch"
    line = _refused(capsys, ["batch", SLIDE, "--out", out, *extra], [out])
    assert words in line.lower(), line


def test_batch_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "out.h5ad"
    f.write_text("x")
    line = _refused(capsys, ["batch", SLIDE, "--out", f])
    assert "is a file" in line and str(f) in line


def test_unopenable_slide_is_not_retried_on_a_worker():
    """A task's M2ORTError comes back as a value: dask retries only raised exceptions."""
    from napari_m2ort.batch_worker import predict_tile
    from napari_m2ort.model.weights import BUNDLED_PATH

    if not BUNDLED_PATH.is_file():
        pytest.skip("bundled weights not installed")
    res = predict_tile(0, 0, str(DATA / "slide_fixtures" / "unopenable.tiff"), 0.69, np.zeros((1, 2)),
                       np.zeros(1, int), str(BUNDLED_PATH), "cpu", "fp32", 4, 1)  # fmt: skip
    assert res.error and "unopenable.tiff" in res.error


@pytest.mark.parametrize(
    "extra, words",
    [(["--gene", "NOTAGENE"], "notagene"), (["--spots", "0"], "spots"), (["--model", "nope.safetensors"], "nope")],
)
def test_demo_refused_before_any_window(capsys, tmp_path, extra, words):
    out = tmp_path / "demo"
    line = _refused(capsys, ["demo", "--out", out, *extra], [out / "predictions.h5ad"])
    assert words in line.lower(), line


@pytest.mark.parametrize("extra", [["--quality", "0"], ["--mpp", "-2"]])
def test_convert_bad_options(capsys, tmp_path, extra):
    out = tmp_path / "c.ome.tif"
    _refused(capsys, ["convert", SLIDE, "--out", out, *extra], [out])


def test_convert_bad_output_type(capsys, tmp_path):
    out = tmp_path / "c.png"
    line = _refused(capsys, ["convert", SLIDE, "--out", out, "--mpp", "0.69"], [out])
    assert ".tif" in line
