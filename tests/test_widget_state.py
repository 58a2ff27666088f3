"""The widgets' evented state and model catalogue, without Qt."""

import subprocess
import sys

import pytest


def test_core_and_state_modules_do_not_import_qt():
    code = (
        "import sys\n"
        "import napari_m2ort.compare, napari_m2ort.raster, napari_m2ort.widgets.state, napari_m2ort.widgets._models\n"
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
    model = object()
    spec = cat.add_memory(model, card, name="tuned")
    assert spec.startswith("memory:") and added == [spec]
    assert cat.load(spec) == (model, card) and cat.card(spec) is card
    assert cat.labels[spec] == "tuned (2 genes)"
    assert "2 genes" in describe_card(card)
    with pytest.raises(M2ORTError):
        cat.load("memory:gone")
    with pytest.raises(M2ORTError):
        cat.add_checkpoint(tmp_path / "missing.safetensors")
