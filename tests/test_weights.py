"""Checkpoints: safetensors + model card round trips, atomic writes, readable errors."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import timm
import torch

import napari_m2ort  # noqa: F401  (registers the variants with timm)
from napari_m2ort.errors import M2ORTError
from napari_m2ort.model import weights
from napari_m2ort.model.weights import (
    ModelCard,
    check_genes,
    load_bundled,
    load_checkpoint,
    read_card,
    read_digest,
    replace_head,
    save_checkpoint,
)

N_GENES = 12


def make_card(n: int = N_GENES, **kw) -> ModelCard:
    args = dict(
        variant="m2ort_small",
        genes=[f"G{i}" for i in range(n)],
        mpp=0.69,
        training_data="synthetic test",
        metrics={"pcc_gene": 0.1},
        target_mean=[0.5] * n,
    )
    args.update(kw)
    return ModelCard(**args)


def make_model(n: int = N_GENES, tied: bool = False):
    torch.manual_seed(0)
    return timm.create_model("m2ort_small", num_classes=n, tied_kv=tied).eval()


def inputs(b: int = 1):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.rand(b, 3, s, s, generator=g) for s in (224, 112, 56))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_checkpoint(model, make_card(), path)
    return path


# -- model card -----------------------------------------------------------------------------
def test_card_json_round_trip_keeps_unknown_fields():
    card = make_card(notes="ünïcode ok")
    data = json.loads(card.to_json())
    assert data["fov_um"] == pytest.approx(224 * 0.69)
    data["from_the_future"] = [1, 2]
    back = ModelCard.from_json(json.dumps(data))
    assert back.extra == {"from_the_future": [1, 2]}
    assert {**vars(back), "extra": {}} == vars(card)
    assert json.loads(back.to_json())["from_the_future"] == [1, 2]
    assert back.version == napari_m2ort.__version__


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"genes": ["A", "B", "A"]}, "more than once"),
        ({"genes": []}, "no genes"),
        ({"mpp": 0}, "positive"),
        ({"target_mean": [0.0]}, "target_mean has 1 values"),
    ],
)
def test_card_validation(kw, match):
    with pytest.raises(M2ORTError, match=match):
        make_card(**kw)


def test_card_from_bad_json():
    with pytest.raises(M2ORTError, match="not valid JSON"):
        ModelCard.from_json("{oops")
    with pytest.raises(M2ORTError, match="lacks required fields: genes, mpp"):
        ModelCard.from_json('{"variant": "m2ort_small"}')


def test_check_genes():
    res = check_genes(make_card(3), ["G2", "X", "G0"])
    assert res.missing == ["G1"] and res.extra == ["X"] and res.n_common == 2 and not res.ok
    assert "1 missing (G1)" in str(res)
    assert check_genes(make_card(3), ["G0", "G1", "G2"]).ok


# -- round trips ----------------------------------------------------------------------------
def test_round_trip_identical_outputs(model, saved):
    loaded, card = load_checkpoint(saved)
    ref = make_card()
    assert (card.genes, card.mpp, card.metrics, card.target_mean) == (ref.genes, ref.mpp, ref.metrics, ref.target_mean)
    assert not loaded.training
    x = inputs()
    with torch.inference_mode():
        assert torch.equal(loaded(*x), model(*x))
    assert read_card(saved).genes == card.genes


def test_file_is_plain_safetensors_with_card(saved):
    raw = saved.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    card = json.loads(header["__metadata__"]["napari_m2ort.card"])
    assert card["variant"] == "m2ort_small" and len(card["genes"]) == N_GENES


def test_read_digest_identifies_the_weights(model, saved, tmp_path):
    digest = read_digest(saved)
    assert len(digest) == 64 and digest == read_digest(save_checkpoint(model, make_card(), tmp_path / "b.safetensors"))
    assert read_digest(write_raw(tmp_path / "bare.safetensors", model.state_dict(), None)) is None
    with pytest.raises(M2ORTError, match="no such checkpoint"):
        read_digest(tmp_path / "absent.safetensors")


def test_fp16_shipping_round_trip(model, tmp_path):
    path = save_checkpoint(model, make_card(), tmp_path / "half.safetensors", dtype="float16")
    assert path.stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.parameters())
    loaded, _ = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = inputs()
    with torch.inference_mode():
        ref, got = model(*x), loaded(*x)
    assert ((got - ref).norm() / ref.norm()) < 1e-2


def test_tied_round_trip_and_new_head(tmp_path):
    m = replace_head(make_model(tied=True), 5, bias=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert m.head.bias.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(M2ORTError, match="3 values for 5 genes"):
        replace_head(timm.create_model("m2ort_small", num_classes=2, device="meta"), 5, bias=[0.0] * 3)
    path = save_checkpoint(m, make_card(5, tied_kv=True), tmp_path / "tied.safetensors")
    loaded, card = load_checkpoint(path)
    assert card.tied_kv and loaded.tied_kv and loaded.num_genes == 5
    x = inputs(1)
    with torch.inference_mode():
        assert torch.equal(loaded(*x), m(*x))


# -- atomic writes --------------------------------------------------------------------------
def test_atomic_write_leaves_no_temp_files(model, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, make_card(), path)
    save_checkpoint(model, make_card(notes="second"), path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert read_card(path).notes == "second"


def test_failed_save_keeps_previous_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, make_card(notes="good"), path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, make_card(notes="bad"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_refuses_to_overwrite_bundled(model, tmp_path, monkeypatch):
    bundled = tmp_path / "bundled.safetensors"
    bundled.write_bytes(b"precious")
    monkeypatch.setattr(weights, "BUNDLED_PATH", bundled)
    with pytest.raises(M2ORTError, match="bundled"):
        save_checkpoint(model, make_card(), tmp_path / "." / "bundled.safetensors")
    assert bundled.read_bytes() == b"precious"


def test_save_checks_card_against_model(model, tmp_path):
    with pytest.raises(M2ORTError, match="head has 12 genes but the card lists 3"):
        save_checkpoint(model, make_card(3), tmp_path / "x.safetensors")
    with pytest.raises(M2ORTError, match="tied_kv"):
        save_checkpoint(model, make_card(tied_kv=True), tmp_path / "x.safetensors")
    with pytest.raises(M2ORTError, match="m2ort_base"):
        save_checkpoint(model, make_card(variant="m2ort_base"), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# -- load errors ----------------------------------------------------------------------------
def write_raw(path, tensors, card: ModelCard | None):
    meta = {"napari_m2ort.card": card.to_json()} if card else None
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def test_wrong_gene_count(tmp_path):
    meta = timm.create_model("m2ort_small", num_classes=300, device="meta")
    state = {k: torch.zeros(v.shape) for k, v in meta.state_dict().items()}
    path = write_raw(tmp_path / "w.safetensors", state, make_card(250))
    with pytest.raises(M2ORTError, match="head has 300 genes but the card lists 250"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys(model, tmp_path):
    state = dict(model.state_dict())
    del state["blocks.3.mlp.fc1.bias"]
    state["extra.thing"] = torch.zeros(2)
    path = write_raw(tmp_path / "k.safetensors", state, make_card())
    with pytest.raises(M2ORTError, match=r"missing keys: blocks\.3\.mlp\.fc1\.bias.*unexpected keys: extra\.thing"):
        load_checkpoint(path)


def test_tied_flag_mismatch(model, tmp_path):
    path = write_raw(tmp_path / "t.safetensors", model.state_dict(), make_card(tied_kv=True))
    with pytest.raises(M2ORTError, match="tied_kv=true but the file has separate value"):
        load_checkpoint(path)


def test_wrong_variant_shapes(model, tmp_path):
    path = write_raw(tmp_path / "v.safetensors", model.state_dict(), make_card(variant="m2ort_base"))
    with pytest.raises(M2ORTError, match="shapes differ for m2ort_base"):
        load_checkpoint(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors" * 10)
    with pytest.raises(M2ORTError, match="not a safetensors file"):
        load_checkpoint(path)
    with pytest.raises(M2ORTError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_no_card(model, tmp_path):
    path = write_raw(tmp_path / "bare.safetensors", model.state_dict(), None)
    with pytest.raises(M2ORTError, match="no napari-m2ort model card"):
        load_checkpoint(path)


def test_corrupted_data_detected(saved, tmp_path):
    raw = bytearray(saved.read_bytes())
    raw[-1000] ^= 0xFF  # flip bits inside a weight
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(M2ORTError, match="corrupted"):
        load_checkpoint(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(M2ORTError, match="safetensors|damaged"):
        load_checkpoint(truncated)


def test_load_bundled_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "BUNDLED_PATH", tmp_path / "absent.safetensors")
    with pytest.raises(M2ORTError, match="bundled model weights are not installed"):
        load_bundled()


def test_load_bundled_present(model, tmp_path, monkeypatch):
    path = save_checkpoint(model, make_card(), tmp_path / "b.safetensors")
    monkeypatch.setattr(weights, "BUNDLED_PATH", path)
    loaded, card = load_bundled()
    assert card.variant == "m2ort_small" and loaded.num_genes == N_GENES


def test_real_bundled_model_if_installed():
    """The shipped checkpoint loads strictly, has a coherent card and survives bf16."""
    if not weights.BUNDLED_PATH.is_file():
        pytest.skip("bundled weights not installed")
    model, card = load_bundled()
    assert card.variant in ("m2ort_small", "m2ort_base", "m2ort_large")
    assert model.num_genes == len(card.genes) and card.fov_um == pytest.approx(card.patch_px * card.mpp)
    assert card.target_mean is None or len(card.target_mean) == len(card.genes)
    x = inputs(1)
    with torch.inference_mode():
        ref = model(*x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(*x)
    assert torch.isfinite(ref).all() and ((low - ref).norm() / ref.norm()) < 1e-2
