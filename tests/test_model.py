"""M2ORT architecture: exact sizes, timm registration, attention maths, token alignment."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import napari_m2ort  # noqa: F401  (registers the variants with timm)
from napari_m2ort.errors import M2ORTError
from napari_m2ort.model import _cpu_ops
from napari_m2ort.model import m2ort as m2ort_mod
from napari_m2ort.model.m2ort import ITMM, M2ORT, VARIANTS, flops_per_spot

SPEC_PARAMS = {"m2ort_small": 7_620_874, "m2ort_base": 17_137_946, "m2ort_large": 55_485_754}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kw) -> M2ORT:
    """Smallest valid geometry (D divisible by 12, heads * 64 = D) for fast checks."""
    return M2ORT(**{"num_classes": 7, "embed_dim": 192, "depth": 2, "num_heads": 3, "mlp_dim": 128, **kw})


def inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(b, 3, s, s, generator=g) for s in (224, 112, 56))


@pytest.fixture(scope="module")
def small() -> M2ORT:
    torch.manual_seed(0)
    return timm.create_model("m2ort_small", num_classes=250).eval()


# -- sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_parameter_counts_match_spec(name):
    model = timm.create_model(name, num_classes=250, device="meta")  # no memory, no init cost
    assert n_params(model) == SPEC_PARAMS[name]


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_tied_kv_drops_value_projections(name):
    cfg = VARIANTS[name]
    tied = timm.create_model(name, num_classes=250, tied_kv=True, device="meta")
    assert n_params(tied) == SPEC_PARAMS[name] - cfg["depth"] * (cfg["embed_dim"] // 3) * cfg["embed_dim"]
    assert all(blk.attn.v is None for blk in tied.blocks)


def test_flops_per_spot_small(small):
    # 1.44 G MACs (linear) + 0.27 G MACs (attention) per spot -> 3.42 GFLOP.
    assert flops_per_spot(small) == 3_424_838_400


def test_executed_flops_skip_the_last_blocks_other_tokens(small):
    # The last block runs only keys and values for the 196 non-CLS tokens.
    assert m2ort_mod.executed_flops_per_spot(small) == 2_989_059_840


@pytest.mark.parametrize("tied", [False, True])
def test_cls_only_last_block_equals_full_forward(tied):
    """forward() computes the last block for CLS alone; outputs and gradients must be
    those of the full token stack."""
    torch.manual_seed(0)
    model = timm.create_model("m2ort_small", num_classes=7, tied_kv=tied)
    x = inputs(2)
    with torch.inference_mode():
        model.eval()
        torch.testing.assert_close(model.forward_cls(*x), model.forward_features(*x)[:, :1], rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model.forward_head(model.forward_features(*x))
            fast = model(*x)
        torch.testing.assert_close(fast, full, rtol=2e-2, atol=2e-2)
    model.train()
    grads = []
    for fn in (lambda: model(*x), lambda: model.forward_head(model.forward_features(*x))):
        model.zero_grad()
        fn().square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_attributes(small):
    assert (small.num_genes, small.embed_dim, small.depth, small.num_heads) == (250, 576, 6, 9)
    assert small.pretrained_cfg["architecture"] == "m2ort_small"
    assert small.pos_embed.shape == (1, 197, 576) and small.cls_token.shape == (1, 1, 576)


# -- timm -----------------------------------------------------------------------------------
def test_registered_with_timm():
    for name in SPEC_PARAMS:
        assert timm.is_model(name)
    m = timm.create_model("m2ort_small", num_classes=3, tied_kv=True, drop_rate=0.1, device="meta")
    assert m.num_genes == 3 and m.tied_kv and m.head_drop.p == 0.1


def test_pretrained_true_is_a_clear_error():
    with pytest.raises(M2ORTError, match="no downloadable weights"):
        timm.create_model("m2ort_small", pretrained=True)


def test_registering_again_is_quiet():
    """A second import/reload of the module re-registers its own names without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (m2ort_mod.m2ort_small, m2ort_mod.m2ort_base, m2ort_mod.m2ort_large):
            m2ort_mod._register(fn)
    m = timm.create_model("m2ort_small", num_classes=2, device="meta")
    assert isinstance(m, M2ORT)


# -- forward --------------------------------------------------------------------------------
def test_output_shapes_and_features(small):
    x = inputs(1)
    with torch.inference_mode():
        y = small(*x)
        feats = small.forward_features(*x)
        pre = small.forward_head(feats, pre_logits=True)
        assert torch.equal(small.forward_head(small.forward_cls(*x)), y)
        torch.testing.assert_close(small.forward_head(feats), y, rtol=1e-4, atol=1e-5)
    assert y.shape == (1, 250) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert feats.shape == (1, 197, 576) and pre.shape == (1, 576)


def test_deterministic(small):
    x = inputs(1)
    with torch.inference_mode():
        assert torch.equal(small(*x), small(*x))
    torch.manual_seed(1)
    a = tiny().eval()
    torch.manual_seed(1)
    b = tiny().eval()
    assert torch.equal(a(*x), b(*x))


def test_batch_independent():
    model = tiny().eval()
    x = inputs(3)
    with torch.inference_mode():
        full = model(*x)
        one = model(*(t[1:2] for t in x))
    torch.testing.assert_close(full[1:2], one, rtol=1e-5, atol=1e-6)


def test_wrong_input_shapes_are_named():
    model = tiny().eval()
    l1, l2, l3 = inputs(1)
    with pytest.raises(ValueError, match="level2 must be"):
        model(l1, l3, l2)
    with pytest.raises(ValueError, match="batch sizes"):
        model(l1, l2, torch.cat([l3, l3]))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.3, drop_path_rate=0.3)
    x = inputs(2)
    model.train()
    assert not torch.equal(model(*x), model(*x))
    model.eval()
    assert torch.equal(model(*x), model(*x))


def test_backward_reaches_every_parameter():
    for tied in (False, True):
        model = tiny(tied_kv=tied)
        model(*inputs(2)).square().mean().backward()
        silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert not silent, silent


def test_replace_head_keeps_encoder():
    model = tiny().eval()
    x = inputs(1)
    with torch.inference_mode():
        before = model.forward_features(*x)
    model.reset_classifier(11)
    with torch.inference_mode():
        assert torch.equal(model.forward_features(*x), before)
        assert model(*x).shape == (1, 11)
    assert model.num_genes == 11


# -- attention maths ------------------------------------------------------------------------
def explicit_itmm(attn, x):
    """ITMM from the spec, by hand: per-head loops, softmax(q k^T / 8) v, no shared code."""
    g = x.shape[-1] // 3
    q = x[..., :g] @ attn.q.weight.T
    k = x[..., g : 2 * g] @ attn.k.weight.T
    wv = attn.k.weight if attn.v is None else attn.v.weight
    v = x[..., 2 * g :] @ wv.T
    heads = []
    for h in range(attn.num_heads):
        s = slice(64 * h, 64 * (h + 1))
        w = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / 8.0, dim=-1)
        heads.append(w @ v[..., s])
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def reference_attention(attn: ITMM, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
    """ITMM written out (matmul, softmax, matmul) on the model's own q/k/v projections."""
    q, k, v = attn.qkv(x, num_queries)
    w = (q @ k.transpose(-2, -1)) * attn.scale
    out = w.softmax(dim=-1) @ v
    b, h, n, d = out.shape
    return attn.proj(out.transpose(1, 2).reshape(b, n, h * d))


@pytest.mark.parametrize("tied", [False, True])
def test_sdpa_matches_explicit_attention(tied):
    torch.manual_seed(0)
    model = tiny(tied_kv=tied).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 197, 192)
    with torch.no_grad():
        xn = blk.norm1(x)
        fused = blk.attn(xn)
        torch.testing.assert_close(fused, explicit_itmm(blk.attn, xn), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused, reference_attention(blk.attn, xn), rtol=1e-4, atol=1e-5)


# -- token alignment ------------------------------------------------------------------------
def test_patch_flattening_is_channel_fastest_row_major():
    model = tiny()
    x = torch.arange(3 * 224 * 224, dtype=torch.float32).reshape(1, 3, 224, 224)
    tokens = model.patch_embed.level1.patchify(x)
    assert tokens.shape == (1, 196, 768)
    gy, gx, py, px, c = 3, 5, 7, 2, 1
    assert tokens[0, gy * 14 + gx, (py * 16 + px) * 3 + c] == x[0, c, gy * 16 + py, gx * 16 + px]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_perturbing_one_region_changes_only_its_token(level):
    """Token i of every level covers the same 16x16 full-resolution area."""
    torch.manual_seed(0)
    model = tiny().eval()
    x = list(inputs(1))
    with torch.no_grad():
        base = model.embed(*x)
    p = (16, 8, 4)[level]
    r, c = 5, 9
    x[level] = x[level].clone()
    x[level][:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = torch.rand(1, 3, p, p)
    with torch.no_grad():
        diff = (model.embed(*x) - base).abs().amax(dim=0)  # (196, D)
    g = 192 // 3
    group = slice(level * g, (level + 1) * g)
    token = r * 14 + c
    assert diff[token, group].max() > 1e-3
    diff[token, group] = 0
    assert diff.max() == 0, "another token or another level's channels changed"


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_fast_path_matches_plain_linear(monkeypatch, bf16):
    torch.manual_seed(0)
    model = tiny().eval()
    x = inputs(2)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), ctx:
        fast = model(*x)
        monkeypatch.setattr(_cpu_ops, "USE_ONEDNN", False)
        plain = model(*x)
    if bf16:
        assert ((fast - plain).norm() / plain.norm()) < 1e-2
    else:
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_fast_path_is_taken(monkeypatch, bf16):
    """The oneDNN path must not silently fall back (its probe once failed under autocast)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if not _cpu_ops.probe_onednn(dtype):
        pytest.skip(f"oneDNN {dtype} linear not usable on this machine")
    monkeypatch.setattr(_cpu_ops, "_onednn_ok", {})  # probe again, lazily, inside forward
    calls = []
    real = _cpu_ops.onednn_linear
    monkeypatch.setattr(_cpu_ops, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    model = tiny().eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(*inputs(1))
    assert len(calls) >= 18  # 3 levels x 2 + 2 blocks x 6 linears (+ the probe's own calls)


def test_traces_without_graph_breaks():
    """torch.compile users get one graph: the oneDNN ops (no fake kernels) stay out of it."""
    model = tiny(depth=1).eval()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(*inputs(1))
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]


def test_channels_last_input_same_result():
    """NHWC memory (e.g. a permuted view of uint8 patches) makes patch cutting cheap."""
    model = tiny().eval()
    x = inputs(2)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in x]
    with torch.inference_mode():
        torch.testing.assert_close(model(*cl), model(*x), rtol=1e-5, atol=1e-6)


# -- reduced precision ----------------------------------------------------------------------
def test_bf16_autocast_close_to_fp32(small):
    x = inputs(2)
    with torch.inference_mode():
        ref = small(*x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = small(*x)
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, f"bf16 relative error {rel:.2e}"
    assert low.dtype == torch.float32  # the gene head runs in fp32 under autocast
