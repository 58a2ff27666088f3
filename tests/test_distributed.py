"""Cohort batch prediction on dask.distributed: equality with the single-process path,
resume, a bad slide in the cohort, and a worker killed mid-task.

Real data: two crops of HER2+ sections converted to pyramidal OME-TIFF, a random M2ORT-S
checkpoint (20 genes), LocalClusters of 2 worker processes x 1 thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
import timm
import torch

from napari_m2ort import batch_resume
from napari_m2ort import batch_worker as worker
from napari_m2ort import distributed as dist
from napari_m2ort.cli import main as cli_main
from napari_m2ort.errors import M2ORTError
from napari_m2ort.inference import predict
from napari_m2ort.io.convert import convert_to_ome_tiff
from napari_m2ort.io.slides import open_slide
from napari_m2ort.model.weights import ModelCard, load_checkpoint, save_checkpoint
from napari_m2ort.pipelines import parse_region, spots_for_slide
from napari_m2ort.progress import run_to_end
from napari_m2ort.slide import open_image

distributed = pytest.importorskip("distributed")
anndata = pytest.importorskip("anndata")

GENES = [f"G{i}" for i in range(20)]
# (section image, crop box in px) — tissue-rich 2400 px squares (1656 µm at 0.69 µm/px)
SECTIONS = {
    "C2": ("C/C2/5714_HE_BT_C2.jpg", (4200, 5000, 6600, 7400)),
    "D1": ("C/C3/5714_HE_BT_D1.jpg", (3400, 2400, 5800, 4800)),
}
REGION = "250,250,1050,950"  # µm: ~65 Visium spots per slide (the crops are all tissue)
# fp32: "auto" is bf16 on CPUs with native bf16, whose rounding depends on batch make-up
SETTINGS = dict(region=REGION, tissue=False, layout="visium", device="cpu", batch_size=16, precision="fp32")


@pytest.fixture(scope="module")
def cohort(her2st, data_dir, tmp_path_factory):
    """{name: OME-TIFF path} for the two crops, plus the unopenable fixture."""
    src = tmp_path_factory.mktemp("crops")
    out = {}
    for name, (rel, box) in SECTIONS.items():
        with open_image(her2st / "ST-imgs" / rel) as im:  # the bomb guard is lifted for this open only
            crop = im.crop(box).convert("RGB")
        png = src / f"{name}.png"
        crop.save(png, compress_level=1)
        out[name] = convert_to_ome_tiff(png, src / f"{name}.ome.tif", mpp=0.69)
    bad = data_dir / "slide_fixtures" / "unopenable.tiff"
    if not bad.is_file():
        pytest.skip(f"{bad} missing")
    out["bad"] = bad
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=len(GENES)).eval()
    path = tmp_path_factory.mktemp("model") / "m2ort_s_random.safetensors"
    save_checkpoint(model, ModelCard(variant="m2ort_small", genes=GENES, mpp=0.69), path)
    return path


@pytest.fixture(scope="module")
def reference(cohort, checkpoint):
    """Single-process predictions (inference.predict) of the same spots: {name: (ids, values)}."""
    model, card = load_checkpoint(checkpoint)
    ref = {}
    for name in SECTIONS:
        slide = open_slide(cohort[name])
        spots = spots_for_slide(slide, [parse_region(REGION)], "visium")
        pred = run_to_end(predict(slide, spots.centers_um, model, card, device="cpu", batch_size=16, precision="fp32"))
        assert pred.complete
        ref[name] = ([str(i) for i in spots.ids], pred.values, spots.centers_um)
    return ref


@pytest.fixture(scope="module")
def cluster():
    """A running 2-process cluster for the tests that connect to an existing scheduler."""
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(lc)
    try:
        yield client
    finally:
        client.close()
        lc.close()


def _check_output(path, ids, values):
    adata = anndata.read_h5ad(path)
    assert list(adata.obs_names) == ids  # every spot exactly once, in layout order
    assert adata.obs_names.is_unique
    assert list(adata.var_names) == GENES
    np.testing.assert_allclose(np.asarray(adata.X), values, rtol=0, atol=1e-5)
    meta = json.loads(adata.uns["m2ort"]["batch"])
    assert meta["complete"] and meta["n_spots"] == len(ids)
    assert "spatial" in adata.obsm and "spatial_um" in adata.obsm
    return adata


# --------------------------------------------------------------------- usage errors


def test_usage_errors_raise_before_any_cluster(cohort, checkpoint, tmp_path):
    with pytest.raises(M2ORTError, match="no such model file"):
        dist.batch_predict([cohort["C2"]], tmp_path, model_path=tmp_path / "nope.safetensors")
    with pytest.raises(M2ORTError, match="four numbers"):
        dist.batch_predict([cohort["C2"]], tmp_path, model_path=checkpoint, region="1,2,3")
    twin = tmp_path / "other" / cohort["C2"].name
    twin.parent.mkdir()
    shutil.copy(cohort["C2"], twin)
    with pytest.raises(M2ORTError, match="both be written"):
        dist.batch_predict([cohort["C2"], twin], tmp_path, model_path=checkpoint)
    with pytest.raises(M2ORTError, match="at least 1"):
        dist.batch_predict([cohort["C2"]], tmp_path, model_path=checkpoint, tile_spots=0)
    assert (
        cli_main(["batch", str(cohort["C2"]), "--out", str(tmp_path), "--model", str(tmp_path / "nope.safetensors")])
        == 2
    )


# --------------------------------------------------------------------- a cohort run


@pytest.fixture(scope="module")
def first_run(cohort, checkpoint, tmp_path_factory):
    """The default path: batch_predict starts (and closes) its own LocalCluster."""
    out = tmp_path_factory.mktemp("batch_out")
    slides = [cohort["C2"], cohort["bad"], cohort["D1"]]
    summary = dist.batch_predict(
        slides,
        out,
        model_path=checkpoint,
        tile_spots=20,
        scheduler="local",
        workers=2,
        threads_per_worker=1,
        dashboard_address=":0",
        progress=False,
        **SETTINGS,
    )
    return out, summary


def test_matches_single_process_prediction(first_run, reference):
    out, summary = first_run
    for name in SECTIONS:
        r = summary[name]
        ids, values, _ = reference[name]
        assert r.status == "done", r.error
        assert r.spots == len(ids) and r.tiles >= 2  # really split into several tasks
        assert r.output == out / f"{name}.h5ad"
        _check_output(r.output, ids, values)
    assert summary.workers == 2 and summary.tiles == sum(summary[n].tiles for n in SECTIONS)
    assert summary.spots_predicted == sum(len(reference[n][0]) for n in SECTIONS)


def test_bad_slide_reported_others_finish(first_run):
    _, summary = first_run
    bad = summary["unopenable"]
    assert bad.status == "failed" and bad.output is None
    assert "unopenable.tiff" in bad.error
    assert [r.status for r in summary.slides] == ["done", "failed", "done"]
    assert not summary.ok and summary.exit_code == 1
    table = summary.table()
    for word in ("slide", "spots", "seconds", "status", "output", "C2", "D1", "unopenable", "failed"):
        assert word in table


def test_resume_skips_complete_outputs(first_run, cohort, checkpoint):
    out, _ = first_run
    before = {n: os.stat(out / f"{n}.h5ad").st_mtime_ns for n in SECTIONS}
    # both good slides are complete: no cluster is needed for them, only for the bad one
    summary = dist.batch_predict(
        [cohort["C2"], cohort["D1"]], out, model_path=checkpoint, tile_spots=20, progress=False, **SETTINGS
    )
    assert [r.status for r in summary.slides] == ["skipped", "skipped"] and summary.ok
    assert summary.tiles == 0 and summary.spots_predicted == 0
    assert summary["C2"].spots > 0 and summary["C2"].note == "output complete"
    assert {n: os.stat(out / f"{n}.h5ad").st_mtime_ns for n in SECTIONS} == before
    # another setting is another job: its key no longer matches the file's
    key = batch_resume.job_key(str(cohort["C2"]), {"region": "0,0,1,1"})
    assert batch_resume.output_complete(out / "C2.h5ad", key) is None


def test_cli_existing_scheduler_redoes_damaged_output(
    first_run, cohort, checkpoint, reference, cluster, tmp_path, capsys
):
    src, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    (out / "D1.h5ad").write_bytes(b"not an h5ad: a crashed copy")
    rc = cli_main(
        [
            "batch",
            str(cohort["C2"]),
            str(cohort["D1"]),
            str(cohort["bad"]),
            "--out",
            str(out),
            "--scheduler",
            cluster.scheduler.address,
            "--region",
            REGION,
            "--tile-spots",
            "25",
            "--batch-size",
            "16",
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--tta",  # the first run's inference options (the CLI's defaults are TTA + smoothing)
            "none",
            "--smooth-um",
            "0",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 1  # the unopenable slide
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "skipped" in lines["C2"] and "done" in lines["D1"] and "failed" in lines["unopenable"]
    ids, values, _ = reference["D1"]
    _check_output(out / "D1.h5ad", ids, values)
    assert len(cluster.scheduler_info()["workers"]) == 2  # a client-only connection: left running


# --------------------------------------------------------------------- failing tasks


def test_task_errors_retried_then_fail_only_their_slide(cohort, checkpoint, tmp_path, monkeypatch):
    """In-process workers, so the worker-side slide cache can be patched: every read of
    C2 fails with an M2ORTError (-> C2 failed without retries, its other tiles
    cancelled), the first read of D1 fails once with an OSError (-> retried, D1 done)."""
    from distributed import Client, LocalCluster

    real = worker._worker_slide
    calls = {"C2": 0, "D1": 0}

    def flaky(path, mpp):
        name = dist.output_name(path)
        calls[name] += 1
        if name == "C2":
            raise M2ORTError(f"{path}: tile data damaged")
        if calls[name] == 1:
            raise OSError("network file system hiccup")
        return real(path, mpp)

    monkeypatch.setattr(worker, "_worker_slide", flaky)
    try:
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc,
            Client(lc) as client,
        ):
            summary = dist.batch_predict(
                [cohort["C2"], cohort["D1"]],
                tmp_path,
                model_path=checkpoint,
                region="250,250,500,500",
                tile_spots=2,
                client=client,
                retries=1,
                progress=False,
                device="cpu",
                batch_size=16,
            )
    finally:
        worker._SLIDES.clear()
        worker._MODELS.clear()
    c2, d1 = summary["C2"], summary["D1"]
    assert c2.status == "failed" and "tile data damaged" in c2.error and c2.output is None
    assert not (tmp_path / "C2.h5ad").exists()
    assert 1 <= calls["C2"] <= c2.tiles  # M2ORTError cannot succeed on retry: each tile at most once
    assert d1.status == "done" and d1.tiles >= 2 and calls["D1"] == d1.tiles + 1
    assert anndata.read_h5ad(d1.output).n_obs == d1.spots
    assert summary.exit_code == 1


# --------------------------------------------------------------------- a worker dies


class _KillOnce(distributed.WorkerPlugin):
    """SIGKILL this worker process while it runs its second tile (once per cohort run)."""

    name = "m2ort-kill-once"

    def __init__(self, marker: str):
        self.marker = marker
        self.finished = 0

    def setup(self, worker):
        self.finished = 0

    def transition(self, key, start, finish, **kwargs):
        if not str(key).startswith("m2ort-tile"):
            return
        if finish == "memory":
            self.finished += 1
        elif finish == "executing" and self.finished >= 1:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, json.dumps({"pid": os.getpid(), "key": str(key)}).encode())
            os.close(fd)
            # let the task get into the model's forward pass, then die without cleanup
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()


def test_killed_worker_tiles_are_retried(cohort, checkpoint, reference, cluster, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    marker = tmp_path / "killed.json"
    cluster.register_plugin(_KillOnce(str(marker)), name=_KillOnce.name)
    try:
        summary = dist.batch_predict(
            [cohort["D1"]],
            tmp_path / "out",
            model_path=checkpoint,
            tile_spots=10,
            client=cluster,
            progress=False,
            **SETTINGS,
        )
    finally:
        cluster.unregister_worker_plugin(_KillOnce.name)
    assert marker.is_file(), "no worker was killed"
    killed = json.loads(marker.read_text())
    r = summary["D1"]
    assert r.status == "done", r.error
    ids, values, _ = reference["D1"]
    assert r.tiles == -(-len(ids) // 10) and r.tiles >= 4
    _check_output(r.output, ids, values)
    # the killed process is gone and the nanny started a fresh one
    deadline = time.time() + 60
    while len(cluster.scheduler_info()["workers"]) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert killed["pid"] not in cluster.run(os.getpid).values()


def test_batch_smooths_over_the_whole_slide(cohort, checkpoint, reference, cluster, tmp_path):
    """Tiles of 20 spots, smoothing of sigma 150 µm: the same values as smoothing the
    whole slide's predictions at once (a tile's edge spots see their neighbours in other
    tiles), recorded as smoothed in the file."""
    from napari_m2ort.tta import smooth

    summary = dist.batch_predict(
        [cohort["C2"]], tmp_path, model_path=checkpoint, tile_spots=20, client=cluster, progress=False,
        smooth_um=150.0, tta="none", **SETTINGS,
    )  # fmt: skip
    r = summary["C2"]
    assert r.status == "done" and r.tiles >= 2, r.error
    ids, values, centers = reference["C2"]
    adata = _check_output(r.output, ids, smooth(values, centers, 150.0))
    assert adata.uns["m2ort"]["smooth_um"] == 150.0 and "smoothed" in adata.uns["m2ort"]["smoothing"]
    assert set(adata.obs["flag"]) <= {"ok", "off-slide", "blank", "not-HE"}
