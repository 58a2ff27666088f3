"""The widgets' evented state and model catalogue, without Qt."""

import subprocess
import sys

import pytest
import torch


def test_core_and_state_modules_do_not_import_qt():
    code = (
        "import sys\n"
        "import napari_m2ort.compare, napari_m2ort.raster, napari_m2ort.widgets.state, napari_m2ort.widgets._models\n"
        "import napari_m2ort.widgets._tuned_card\n"
        "qt = sorted(m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6'))\n"
        "assert not qt, qt\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_settings_emit_on_change_only():
    from napari_m2ort.widgets.state import PredictSettings

    s = PredictSettings()
    seen = []
    s.events.batch_size.connect(seen.append)
    s.batch_size = 4
    s.batch_size = 4
    assert seen == [4]


def test_run_summary_reads_like_the_old_dict():
    from napari_m2ort.widgets.state import RunSummary

    run = RunSummary(n_spots=3, skipped=1, seconds=0.5, device="cpu")
    assert run["n_spots"] == 3 and run.get("device") == "cpu" and run.get("nope", "x") == "x"
    assert "stopped" in run and run["stopped"] is False
    with pytest.raises(KeyError):
        run["nope"]
    assert run.record()["skipped"] == 1 and dict(run)["seconds"] == 0.5


def test_model_catalogue_memory_models(tmp_path):
    from napari_m2ort.errors import M2ORTError
    from napari_m2ort.model.weights import ModelCard
    from napari_m2ort.widgets._models import ModelCatalogue, describe_card

    cat = ModelCatalogue()
    added = []
    cat.added.connect(added.append)
    card = ModelCard(variant="m2ort_small", genes=["A", "B"], mpp=0.69)
    model = torch.nn.Linear(2, 2)  # any module: the catalogue holds it, the spec resolves it
    spec = cat.add_memory(model, card, name="tuned")
    assert spec.startswith("memory:") and added == [spec]
    assert cat.load(spec) == (model, card) and cat.card(spec) is card
    from napari_m2ort.pipelines import resolve_model

    assert resolve_model(spec)[0] is model  # every use case resolves the widget's spec
    assert cat.labels[spec] == "tuned (2 genes)"
    assert "2 genes" in describe_card(card)
    with pytest.raises(M2ORTError):
        cat.load("memory:gone")
    with pytest.raises(M2ORTError):
        cat.add_checkpoint(tmp_path / "missing.safetensors")


def test_model_catalogue_loads_a_model_once_for_concurrent_callers(monkeypatch):
    """The widget preloads the selected model in the background; a Predict clicked
    meanwhile waits for that load instead of loading the weights a second time."""
    import threading
    import time

    from napari_m2ort import pipelines
    from napari_m2ort.widgets._models import ModelCatalogue

    calls = []

    def slow_resolve(spec):
        calls.append(spec)
        time.sleep(0.3)
        return object(), object()

    monkeypatch.setattr(pipelines, "resolve_model", slow_resolve)
    cat = ModelCatalogue()
    cat.labels["file:/x.safetensors"] = "x"
    got = []
    threads = [threading.Thread(target=lambda: got.append(cat.load("file:/x.safetensors"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["file:/x.safetensors"] and len(got) == 3 and len({id(g[0]) for g in got}) == 1


def test_tuned_card_describes_its_own_training_only():
    import datetime as dt
    from types import SimpleNamespace

    from napari_m2ort.model.weights import ModelCard
    from napari_m2ort.widgets._tuned_card import describe_training, kept_epoch_words

    # what pipelines.model_for_training hands over today: the parent's notes and date kept
    card = ModelCard(
        variant="m2ort_small", genes=["A", "B"], mpp=0.69, training_data="fine-tuned from bundled on C3",
        notes="Held-out metrics: leave-one-section-out CV over sections C2-C5.", created="2026-11-22T02:18:04+00:00",
        metrics={"validation": {"pcc_gene_mean": 0.31, "per_section": {"C3:val": {"pcc_gene_mean": 0.31, "n_spots": 40}}},
                 "best_epoch": 2, "train_config": {"mode": "head", "lr": 1e-4, "batch_size": 16},
                 "fit": {"per_section": {"C3:train": {"pcc_gene_mean": 0.5, "pcc_spot_mean": 0.9, "n_spots": 150}}}},
    )  # fmt: skip
    history = [{"epoch": 1, "train_loss": 0.6, "val": {"pcc_gene_mean": 0.2}}, {"epoch": 2, "train_loss": 0.5}]
    result = SimpleNamespace(card=card, history=history, best_epoch=2, best_metrics=card.metrics["validation"],
                             fit={}, epochs_done=2, stopped=True)  # fmt: skip
    assert kept_epoch_words(result) == "kept epoch 2 (validation PCC-gene 0.310)"
    now = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.timezone.utc)
    section = SimpleNamespace(name="C3", n_spots=190)
    out = describe_training(result, started_from="M2ORT-S bundled", sections=[section], val="blocks",
                            epochs_planned=5, now=now)  # fmt: skip
    assert out is not card and "leave-one-section-out" in card.notes  # the input is left alone
    assert "CV" not in out.notes and "leave-one" not in out.notes
    assert out.created == "2026-11-30T10:00:00+00:00"
    tune = out.metrics["fine_tune"]
    assert tune["sections"] == {"C3": 190} and tune["epochs_done"] == 2 and tune["epochs_planned"] == 5
    assert tune["stopped"] and tune["best_epoch"] == 2 and tune["started_from"] == "M2ORT-S bundled"
    assert [h["val_pcc_gene"] for h in tune["history"]] == [0.2, None]
    for words in ("starting from M2ORT-S bundled", "C3 (190 spots)", "2 of 5 epoch(s) (cancelled)", "kept epoch 2",
                  "C3:val 0.310 (40 spots)", "C3:train PCC-gene 0.500, PCC-spot 0.900 (150 spots)"):  # fmt: skip
        assert words in out.notes, out.notes


def test_finish_run_puts_the_final_smoothed_values_and_spread_on_the_layer():
    import numpy as np
    import pandas as pd
    from napari.layers import Points

    from napari_m2ort.io.export import points_layer_to_anndata
    from napari_m2ort.widgets._layers import finish_run

    layer = Points(np.zeros((3, 2)), features=pd.DataFrame({"A": [1.0, 2, 3], "B": [4.0, 5, 6]}))
    layer.metadata.update(spot_ids=["s0", "s1", "s2"], flags=["ok"] * 3, mpp=0.5)
    final = np.array([[9.0, 8.0], [7.0, 6.0]], np.float32)
    finish_run(layer, ["s2", "s0"], final, final / 10, {"tta": "dihedral", "smooth_um": 100.0})
    assert layer.features["A"].tolist() == [7.0, 2.0, 9.0] and layer.features["B"].tolist() == [6.0, 5.0, 8.0]
    spread = layer.metadata["uncertainty"]
    assert np.allclose(spread[[2, 0]], final / 10) and np.isnan(spread[1]).all()
    adata = points_layer_to_anndata(layer.data, {"features": layer.features, "metadata": layer.metadata})
    m = adata.uns["m2ort"]
    assert m["tta"] == "dihedral" and m["smooth_um"] == 100.0 and "smoothed" in m["smoothing"]
    assert adata.layers["uncertainty"].shape == (3, 2)
