"""Training engine on a real HER2+ section: loss falls, stop keeps the best checkpoint,
resume continues, block validation does not mix neighbours."""

import numpy as np
import pytest
import timm
import torch

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io.st import read_her2st
from napari_m2ort.model.weights import ModelCard, load_checkpoint
from napari_m2ort.progress import run_to_end
from napari_m2ort.targets import select_panel
from napari_m2ort.training import TrainConfig, prepare_section, spatial_block_split, train


@pytest.fixture(scope="module")
def c2_cached(her2st, tmp_path_factory):
    section = read_her2st(her2st, "C2")
    genes = select_panel([section.adata], n=16)
    cache = tmp_path_factory.mktemp("patches")
    cached = run_to_end(prepare_section(section, genes, 0.69, cache_dir=cache))
    again = run_to_end(prepare_section(section, genes, 0.69, cache_dir=cache))  # from cache
    assert np.array_equal(cached.level1, again.level1)
    return cached


def test_cached_section(c2_cached):
    assert c2_cached.level1.shape[1:] == (224, 224, 3)
    assert c2_cached.y.shape == (len(c2_cached), 16)
    assert np.isfinite(c2_cached.y).all() and c2_cached.y.min() >= 0


def test_spatial_blocks_hold_out_whole_blocks(c2_cached):
    val = spatial_block_split(c2_cached.centers_um, block_um=1000, val_fraction=0.2)
    assert 0.1 < val.mean() < 0.5
    blocks = np.floor(c2_cached.centers_um / 1000).astype(int)
    vb = {tuple(b) for b in blocks[val]}
    tb = {tuple(b) for b in blocks[~val]}
    assert not vb & tb
    with pytest.raises(M2ORTError, match="too few"):
        spatial_block_split(c2_cached.centers_um[:5])


def test_loss_falls_on_real_section(c2_cached):
    torch.manual_seed(0)
    small = c2_cached.subset(np.arange(len(c2_cached)) < 48)
    model = timm.create_model("m2ort_small", num_classes=16, depth=1)
    card = ModelCard(variant="m2ort_small", genes=small.genes, mpp=0.69)
    cfg = TrainConfig(epochs=6, lr=1e-3, batch_size=16, augment=False, device="cpu")
    res = run_to_end(train(model, card, [small], [], cfg))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.7 * losses[0], losses


def test_stop_keeps_best_checkpoint_and_resume(c2_cached, tmp_path):
    torch.manual_seed(0)
    genes = c2_cached.genes
    val = spatial_block_split(c2_cached.centers_um)
    tr, va = c2_cached.subset(~val), c2_cached.subset(val)
    tr = tr.subset(np.arange(len(tr)) < 32)
    model = timm.create_model("m2ort_small", num_classes=len(genes))
    card = ModelCard(variant="m2ort_small", genes=genes, mpp=0.69)
    out = tmp_path / "ft.safetensors"
    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu", precision="bf16")
    steps = []

    def on(ev):
        if ev.stage == "train" and ev.data:
            steps.append(ev.data["step"])

    # stop in the middle of epoch 2 (2 steps per epoch)
    res = run_to_end(train(model, card, [tr], [va], cfg, out_path=out, should_stop=lambda: len(steps) >= 3), on)
    assert res.stopped and res.epochs_done == 1 and res.best_epoch == 1
    assert out.exists() and not list(tmp_path.glob("*.tmp*"))
    loaded, loaded_card = load_checkpoint(out)
    assert loaded_card.genes == genes and loaded_card.metrics["best_epoch"] == 1
    assert loaded_card.target_mean is not None
    x = torch.rand(2, 3, 224, 224)
    args = (x, torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(x, 4))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(*args).numpy(), res.model.eval()(*args).numpy(), rtol=1e-4, atol=1e-4)
    # resume from the checkpoint for one more epoch
    res2 = run_to_end(
        train(
            loaded,
            loaded_card,
            [tr],
            [va],
            TrainConfig(epochs=1, batch_size=16, device="cpu"),
            out_path=tmp_path / "ft2.safetensors",
            start_epoch=res.epochs_done,
        )
    )
    assert res2.history[0]["epoch"] == 2 and not res2.stopped


def test_genes_missing_is_a_clear_error(her2st):
    section = read_her2st(her2st, "C2")
    with pytest.raises(M2ORTError, match="panel genes are not in this data"):
        run_to_end(prepare_section(section, ["ERBB2", "NOT_A_GENE_1"], 0.69))


def test_lr_schedule_warmup_then_cosine_to_zero():
    from napari_m2ort.training import lr_factor

    f = lr_factor(TrainConfig(epochs=10, schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    ramp = [f(s) for s in range(10)]
    assert ramp == sorted(ramp) and ramp[0] < 0.2 and ramp[-1] < 1.0
    assert f(10) == pytest.approx(1.0)
    tail = [f(s) for s in range(10, 100)]
    assert tail == sorted(tail, reverse=True) and tail[-1] < 0.01
    assert f(55) == pytest.approx(0.5, abs=0.03)  # halfway through the cosine part
    const = lr_factor(TrainConfig(epochs=3), steps_per_epoch=4)
    assert [const(s) for s in range(12)] == [1.0] * 12
    with pytest.raises(M2ORTError, match="schedule"):
        lr_factor(TrainConfig(schedule="step"), 4)


def test_recipe_options_validation_per_section_and_fit(c2_cached):
    """Per-section validation, a fit table, EMA and the count losses run end to end."""
    from napari_m2ort.evaluation import evaluate_sections

    assert c2_cached.counts is not None and c2_cached.depth.shape == (len(c2_cached),)
    val = spatial_block_split(c2_cached.centers_um)
    tr, va = c2_cached.subset(~val, ":train"), c2_cached.subset(val, ":val")
    tr = tr.subset(np.arange(len(tr)) < 24)
    half = np.arange(len(va)) < len(va) // 2
    va1, va2 = va.subset(half, "a"), va.subset(~half, "b")
    for loss, geometry, stain in (("mse_depth", "dihedral", "hed"), ("nb", "flips", "rgb")):
        torch.manual_seed(0)
        model = timm.create_model("m2ort_small", num_classes=len(tr.genes), depth=1)
        card = ModelCard(variant="m2ort_small", genes=tr.genes, mpp=0.69)
        cfg = TrainConfig(
            epochs=2, batch_size=12, device="cpu", loss=loss, geometry=geometry, stain=stain, color_jitter=0.05, ema=0.9
        )
        res = run_to_end(train(model, card, [tr], [va1, va2], cfg))
        v = res.history[-1]["val"]
        assert set(v["per_section"]) == {va1.name, va2.name}
        per = [s["pcc_gene_mean"] for s in v["per_section"].values()]
        assert v["pcc_gene_mean"] == pytest.approx(np.mean(per))
        assert set(res.fit["per_section"]) == {tr.name} and card.metrics["fit"] == res.fit
        again = evaluate_sections(res.model, [va1, va2], None)
        assert again["pcc_gene_mean"] == pytest.approx(res.best_metrics["pcc_gene_mean"], abs=1e-6)
    with pytest.raises(M2ORTError, match="geometry"):
        run_to_end(train(model, card, [tr], [], TrainConfig(epochs=1, geometry="twirl", device="cpu")))


def test_section_targets_remove_section_offsets_but_keep_each_sections_order(c2_cached):
    """A shallow section (B4-like: lower, noisier log1p-CPM) no longer differs from a deep
    one in mean (and, for section_z, spread), while each gene's order within a section,
    which PCC-gene scores, is untouched; training on it runs and records the choice."""
    from napari_m2ort.training import section_normalized_targets

    half = np.arange(len(c2_cached)) < len(c2_cached) // 2
    deep = c2_cached.subset(half, ":a")
    shallow = c2_cached.subset(~half, ":b")
    shallow.y = (0.4 * shallow.y + 1.0).astype(np.float32)
    n = len(deep)
    keep = (deep.y.std(0) > 0) & (shallow.y.std(0) > 0)
    for mode in ("section_center", "section_z"):
        y, scale = section_normalized_targets([deep, shallow], mode)
        assert y.shape == (len(deep) + len(shallow), len(deep.genes))
        assert np.allclose(y[:n].mean(0), y[n:].mean(0), atol=1e-4)
        for part, orig in ((y[:n], deep.y), (y[n:], shallow.y)):
            r = [np.corrcoef(part[:, j], orig[:, j])[0, 1] for j in np.flatnonzero(keep)]
            assert np.allclose(r, 1.0, atol=1e-5)
        if mode == "section_z":
            assert np.allclose(y[:n, keep].std(0), y[n:, keep].std(0), rtol=1e-3)
            assert np.allclose(scale[keep], y[:n, keep].std(0), rtol=1e-3)
    y, scale = section_normalized_targets([deep, shallow], "none")
    assert np.array_equal(y[n:], shallow.y) and np.all(scale == 1)

    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=len(deep.genes), depth=1)
    card = ModelCard(variant="m2ort_small", genes=deep.genes, mpp=0.69)
    small = [deep.subset(np.arange(n) < 12), shallow.subset(np.arange(len(shallow)) < 12)]
    cfg = TrainConfig(epochs=1, batch_size=12, device="cpu", target_norm="section_z")
    res = run_to_end(train(model, card, small, [], cfg))
    assert np.isfinite(res.history[0]["train_loss"])
    with pytest.raises(M2ORTError, match="raw counts"):
        run_to_end(
            train(model, card, small, [], TrainConfig(epochs=1, device="cpu", loss="poisson", target_norm="section_z"))
        )
    with pytest.raises(M2ORTError, match="target normalisation"):
        run_to_end(train(model, card, small, [], TrainConfig(epochs=1, device="cpu", target_norm="global")))


def test_smoothed_targets_average_neighbours_within_training_spots_only(c2_cached):
    """Neighbour averaging lowers the spot-to-spot noise of the targets, keeps each gene's
    mean, never touches the patches, and a spot far from all others keeps its value."""
    from napari_m2ort.training import smoothed_targets

    val = spatial_block_split(c2_cached.centers_um)
    tr = c2_cached.subset(~val, ":train")
    (sm,) = smoothed_targets([tr], 150.0)
    assert sm.level1 is tr.level1 and sm.y.shape == tr.y.shape
    assert np.allclose(sm.y.mean(0), tr.y.mean(0), atol=0.15)
    assert np.all(sm.y.std(0) <= tr.y.std(0) + 1e-6) and sm.y.std(0).mean() < 0.9 * tr.y.std(0).mean()
    assert smoothed_targets([tr], 0.0)[0] is tr
    lone = tr.subset(np.arange(len(tr)) < 3)
    lone.centers_um = np.array([[0.0, 0.0], [5000.0, 0.0], [0.0, 5000.0]])
    assert np.allclose(smoothed_targets([lone], 150.0)[0].y, lone.y)
    with pytest.raises(M2ORTError, match="moothing"):
        smoothed_targets([tr], -5.0)
