"""Data that do not match, and patch caches that cannot be trusted, built from the real
committed data (HER2+ C2/B4, the Space Ranger and squidpy fixtures).

Mismatched files stop with an M2ORTError that names the file, counts what was skipped
and gives the likely cause; a panel that misses the data's gene names says how they
differ; a truncated, corrupted or stale patch cache is named, deleted and rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_m2ort.errors import M2ORTError
from napari_m2ort.io import st
from napari_m2ort.io.st import STDataWarning
from napari_m2ort.patch_cache import PatchCacheWarning
from napari_m2ort.progress import run_to_end
from napari_m2ort.targets import select_panel
from napari_m2ort.training import prepare_section


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", STDataWarning)
        return fn(*args, **kwargs)


def _layout(root: Path, her2st: Path, section: str, counts_of: str, spots_of: str, image_of: str) -> Path:
    """A her2st-layout folder whose ``section`` takes each file from another section."""
    for src, dst in (
        (her2st / "ST-cnts" / f"{counts_of}.tsv.gz", root / "ST-cnts" / f"{section}.tsv.gz"),
        (her2st / "ST-spotfiles" / f"{spots_of}_selection.tsv", root / "ST-spotfiles" / f"{section}_selection.tsv"),
    ):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    image = next((her2st / "ST-imgs" / image_of[0] / image_of).glob("*.jpg"))
    dst = root / "ST-imgs" / section[0] / section / image.name
    dst.parent.mkdir(parents=True)
    dst.symlink_to(image)
    return root


@pytest.fixture(scope="module")
def c2(her2st):
    return _quiet(st.read_her2st, her2st, "C2")


# ---------------------------------------------------------------- files that do not belong together


def test_counts_of_another_section_stop(her2st, tmp_path):
    root = _layout(tmp_path, her2st, "C2", counts_of="C2", spots_of="B4", image_of="C2")
    with pytest.raises(M2ORTError) as info:
        _quiet(st.read_her2st, root, "C2")
    msg = str(info.value)
    assert msg.startswith(
        f"{root / 'ST-spotfiles' / 'C2_selection.tsv'}: 162 of 284 selected spots have no row in C2.tsv.gz"
    )
    assert "(57 %). More than half skipped" in msg and "belong to different sections" in msg
    assert "122 left" in msg


def test_spot_file_of_another_section_stop(her2st, tmp_path):
    # B4's counts with C2's spot file: 121 of C2's spots match, but 162 of B4's 283 rows do not
    root = _layout(tmp_path, her2st, "B4", counts_of="B4", spots_of="C2", image_of="B4")
    with pytest.raises(M2ORTError) as info:
        _quiet(st.read_her2st, root, "B4")
    msg = str(info.value)
    assert msg.startswith(f"{root / 'ST-cnts' / 'B4.tsv.gz'}: 162 of 283 counts rows have no spot in B4_selection.tsv")
    assert "belong to different sections" in msg


def _shifted(her2st, tmp_path, dx: float) -> tuple[Path, Path, Path, pd.DataFrame]:
    spots = pd.read_csv(her2st / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    spots["pixel_x"] += dx
    spots.to_csv(tmp_path / "C2_selection.tsv", sep="\t", index=False)
    image = next((her2st / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    return image, her2st / "ST-cnts" / "C2.tsv.gz", tmp_path / "C2_selection.tsv", spots


def test_spots_outside_the_image_stop(her2st, tmp_path):
    image, counts, sel, spots = _shifted(her2st, tmp_path, 6000.0)
    outside = int((spots.pixel_x > 9274).sum())
    assert outside == 173
    with pytest.raises(M2ORTError) as info:
        _quiet(st.read_legacy_st, image, counts, sel)
    msg = str(info.value)
    assert msg.startswith(f"{counts}: 173 of 187 spots lie outside the 9274 × 9911 px image {image.name} (93 %)")
    assert "another image or another scale" in msg and "14 left" in msg


def test_few_spots_outside_the_image_are_skipped(her2st, tmp_path):
    image, counts, sel, spots = _shifted(her2st, tmp_path, 2500.0)
    outside = int((spots.pixel_x > 9274).sum())
    assert 0 < outside <= 187 // 2
    with pytest.warns(STDataWarning, match=f"{outside} of 187 spots lie outside the 9274 × 9911 px image"):
        s = st.read_legacy_st(image, counts, sel)
    assert s.n_spots == 187 - outside


def test_visium_barcodes_of_another_run_stop(data_dir, tmp_path):
    dst = tmp_path / "vis"
    shutil.copytree(data_dir / "visium_spaceranger", dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    pos_file = dst / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(pos_file, header=None)
    import h5py

    with h5py.File(dst / "filtered_feature_bc_matrix.h5", "r") as f:
        barcodes = [b.decode() for b in f["matrix/barcodes"][()]]
    other = pos[0].isin(barcodes[:60])
    pos.loc[other, 0] = pos.loc[other, 0].str.replace("-1", "-2")  # another run's suffix
    pos.to_csv(pos_file, header=False, index=False)
    with pytest.raises(M2ORTError) as info:
        _quiet(st.read_visium, dst)
    msg = str(info.value)
    assert msg.startswith(
        f"{dst / 'filtered_feature_bc_matrix.h5'}: 60 of 100 barcodes have no row in tissue_positions_list.csv"
    )
    assert "different Space Ranger runs" in msg


def test_h5ad_coordinates_of_another_scale_stop(data_dir, tmp_path):
    d = data_dir / "squidpy_mouse_brain"
    adata = ad.read_h5ad(d / "test_data.h5ad")
    adata.obsm["spatial"] = adata.obsm["spatial"] * 4.0  # e.g. pixels of a 4× larger scan
    adata.write_h5ad(tmp_path / "x4.h5ad")
    with pytest.raises(M2ORTError) as info:
        _quiet(st.read_h5ad, tmp_path / "x4.h5ad", image=d / "test_img.jpg")
    msg = str(info.value)
    assert (
        msg.startswith(f"{tmp_path / 'x4.h5ad'}: ") and "spots lie outside the 950 × 1717 px image test_img.jpg" in msg
    )
    assert "another image or another scale" in msg


# ---------------------------------------------------------------- a gene panel the data does not name


def test_lowercased_genes_in_h5ad_say_case_would_match(c2, tmp_path):
    top = select_panel([c2.adata], n=250)
    panel = ["ERBB2"] + [g for g in top if g != "ERBB2"][:249]
    adata = c2.adata.copy()
    adata.var_names = [g.lower() for g in adata.var_names]
    adata.write_h5ad(tmp_path / "lower.h5ad")
    section = st.read_h5ad(tmp_path / "lower.h5ad")
    with pytest.raises(M2ORTError) as info:
        run_to_end(prepare_section(section, panel, 0.69))
    assert str(info.value) == (
        f"{tmp_path / 'lower.h5ad'} (section C2): none of the 250 panel genes is in this data; 250 match if case "
        "is ignored (e.g. 'erbb2' vs 'ERBB2'): rename the genes to the panel's spelling."
    )


def test_most_panel_genes_missing_stop_even_when_allowed(c2):
    panel = select_panel([c2.adata], n=250)
    renamed = {g: g.lower() for g in panel[:200]}
    adata = c2.adata.copy()
    adata.var_names = [renamed.get(g, g) for g in adata.var_names]
    section = dataclasses.replace(c2, adata=adata)
    with pytest.raises(M2ORTError) as info:
        run_to_end(prepare_section(section, panel, 0.69, allow_missing=True))
    msg = str(info.value)
    assert "C2.tsv.gz (section C2): 200 of 250 panel genes are not in this data" in msg
    assert "200 match if case is ignored" in msg and "more than half of the panel missing" in msg
    # a few missing: the same hint, and the old advice
    with pytest.raises(M2ORTError, match=r"200 of 250 panel genes .* 200 match if case is ignored.*top:250"):
        run_to_end(prepare_section(section, panel, 0.69))


def test_ensembl_panel_against_symbols_names_the_column(data_dir):
    d = data_dir / "squidpy_mouse_brain"
    section = _quiet(st.read_h5ad, d / "test_data.h5ad", image=d / "test_img.jpg")
    panel = list(section.adata.var["gene_ids"][:50])
    with pytest.raises(M2ORTError) as info:
        run_to_end(prepare_section(section, panel, 0.69))
    msg = str(info.value)
    assert msg.startswith(f"{d / 'test_data.h5ad'} (section V1_Adult_Mouse_Brain): none of the 50 panel genes")
    assert "this data names genes by symbols (e.g. 4732440D04Rik) but the panel uses Ensembl ids" in msg
    assert "var['gene_ids'] holds 50 of them: use it as the gene names" in msg


def test_ensembl_data_without_symbols_say_map_them(data_dir, tmp_path):
    d = data_dir / "squidpy_mouse_brain"
    adata = ad.read_h5ad(d / "test_data.h5ad")
    panel = list(adata.var_names[:50])
    adata.var_names = adata.var["gene_ids"].astype(str).to_numpy()
    adata.var = adata.var.drop(columns=["gene_ids"])
    adata.write_h5ad(tmp_path / "ids.h5ad")
    section = _quiet(st.read_h5ad, tmp_path / "ids.h5ad", image=d / "test_img.jpg")
    with pytest.raises(M2ORTError) as info:
        run_to_end(prepare_section(section, panel, 0.69))
    msg = str(info.value)
    assert "none of the 50 panel genes is in this data" in msg and str(tmp_path / "ids.h5ad") in msg
    assert "this data names genes by Ensembl ids (e.g. ENSMUSG00000090031) but the panel uses symbols" in msg
    assert "map one naming to the other first" in msg


def test_most_spots_without_panel_counts_stop(c2):
    x = sp.csr_matrix(c2.adata.X)
    frac = (x > 0).mean(axis=0).A1
    rare = [i for i in np.argsort(frac) if frac[i] > 0][:3]
    panel = [c2.genes[i] for i in rare]
    empty = int(((x[:, rare] > 0).sum(axis=1).A1 == 0).sum())
    assert empty > c2.n_spots / 2
    with pytest.raises(M2ORTError) as info:
        run_to_end(prepare_section(c2, panel, 0.69))
    msg = str(info.value)
    assert f"C2.tsv.gz (section C2): {empty} of 187 spots have no counts in any of the 3 panel genes" in msg
    assert "the panel does not fit this data" in msg


# ---------------------------------------------------------------- patch caches


@pytest.fixture(scope="module")
def small_c2(c2):
    """Six spots of C2, so each rebuild samples only a few patches."""
    section = dataclasses.replace(c2, adata=c2.adata[:6].copy())
    return section, select_panel([section.adata], n=8)


def _prepare(small_c2, cache: Path):
    section, genes = small_c2
    stages = []
    res = run_to_end(prepare_section(section, genes, 0.69, cache_dir=cache), lambda ev: stages.append(ev.message))
    return res, stages


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip(f: Path):
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 4000, len(data), 97):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _other_shape(f: Path):
    np.save(f, np.zeros((3, 224, 224, 3), np.uint8))


def _header_only(f: Path):
    f.write_bytes(f.read_bytes()[:40])


def _no_checksum(f: Path):
    f.with_suffix(".json").unlink()


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate, "truncated"),
        (_flip, r"does not match the SHA-1 in .*\.json; corrupted"),
        (_other_shape, r"holds uint8 \(3, 224, 224, 3\), expected uint8 \(6, 224, 224, 3\); stale"),
        (_header_only, "not a readable .npy file"),
        (_no_checksum, "has no checksum file"),
    ],
)
def test_damaged_patch_cache_is_named_and_rebuilt(small_c2, tmp_path, damage, why):
    first, _ = _prepare(small_c2, tmp_path)
    (npy,) = tmp_path.glob("C2-*.npy")
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["shape"] == [6, 224, 224, 3] and meta["bytes"] == npy.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchCacheWarning)  # an intact cache is used without a word
        again, stages = _prepare(small_c2, tmp_path)
    assert stages[-1].endswith("cached") and np.array_equal(again.level1, first.level1)

    damage(npy)
    with pytest.warns(PatchCacheWarning, match=rf"{npy}: the patch cache .*{why}.*Deleting it and sampling"):
        rebuilt, stages = _prepare(small_c2, tmp_path)
    assert "sampling patches" in stages[-1]
    assert np.array_equal(rebuilt.level1, first.level1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([npy.name, npy.with_suffix(".json").name])
    assert _prepare(small_c2, tmp_path)[1][-1].endswith("cached")  # and trusted again


def test_unwritable_cache_only_warns(small_c2, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(PatchCacheWarning, match=f"{blocker / 'cache'}.*cannot write the patch cache"):
        res, _ = _prepare(small_c2, blocker / "cache")
    assert res.level1.shape == (6, 224, 224, 3)
