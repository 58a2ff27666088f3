"""CPU inference kernels for M2ORT, and the switch that turns them off.

The model calls ``linear`` and ``attention`` where a plain ``nn.Linear`` and
``F.scaled_dot_product_attention`` would do. Wherever autograd is on, on GPUs, under
float16 or inside ``torch.compile`` they are exactly those calls; only CPU inference
(float32, or bf16 autocast) takes a faster route, measured in
benchmarks/results/model_cpu.md. Like timm's ``layers/config.py``, the kernel switch lives
here, in one place: ``USE_ONEDNN = False`` forces plain ``F.linear`` everywhere (benchmarks,
debugging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["USE_ONEDNN", "attention", "autocast_on", "linear", "onednn_available", "probe_onednn"]

USE_ONEDNN = True
_onednn_ok: dict[torch.dtype, bool] = {}  # probed once per dtype, on first use


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)`` (then exact GELU, or plus ``residual``); on CPU inference one fused call.

    PyTorch runs CPU ``nn.Linear`` as ``addmm``: the bias is first copied into the output
    in a separate pass, GELU is another pass, and float32 goes to MKL, which on the AMD
    EPYC we measured was ~20 % slower than oneDNN on the same GEMMs. oneDNN (the library
    behind PyTorch's bf16 matmuls and torch.compile's CPU linears) fuses bias and GELU
    into the GEMM, and the residual add too. Under CPU bf16 autocast the same call runs on
    bf16 copies of input and weights, exactly what autocast would do, minus the extra
    passes (the residual is added outside, so the residual stream stays float32).

    Used only where autograd is off, on CPU, for float32 (no autocast) or bf16 autocast,
    outside torch.compile, and after a one-time self-check against ``F.linear``; anything
    else (training, GPUs, float16) takes the ordinary path.
    """
    w = layer.weight
    if (
        USE_ONEDNN
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and not _compiling()  # the ops have no fake-tensor kernels; inductor fuses anyway
    ):
        b = layer.bias
        if not autocast_on("cpu"):
            if x.dtype == w.dtype == torch.float32 and onednn_available(torch.float32):
                if _fusable(residual, x, w) and not gelu:
                    return onednn_linear(x, w, b, gelu, residual)
                return _plus(onednn_linear(x, w, b, gelu), residual)
        elif _cpu_autocast_dtype() == torch.bfloat16 and onednn_available(torch.bfloat16):
            bf = torch.bfloat16
            y = onednn_linear(x.to(bf), w.to(bf), None if b is None else b.to(bf), gelu)
            return _plus(y, residual)
    y = F.linear(x, w, layer.bias)
    return _plus(F.gelu(y) if gelu else y, residual)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; CPU bf16 inference runs two batched GEMMs instead.

    For 197 tokens and head dim 64, PyTorch's CPU flash-attention kernel is slower in bf16
    than in float32 (measured 48 vs 34 ms at batch 16, one thread), while plain batched
    bf16 matmuls take 30 ms. Softmax accumulates in float32 either way.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled():
        w = torch.matmul(q * scale, k.transpose(-2, -1))  # scale = 1/8: exact in bf16
        return torch.matmul(w.softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _cpu_autocast_dtype() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cpu")
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


def _fusable(residual: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        residual is not None
        and residual.dtype == torch.float32
        and residual.is_contiguous()
        and residual.shape == (*x.shape[:-1], w.shape[0])
    )


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return torch._dynamo.is_compiling()


def _plus(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return y if residual is None else residual + y


def onednn_linear(x, w, b, gelu: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's fused linear (+ GELU, or + residual): an op internal to PyTorch."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether ``onednn_linear`` may be used for ``dtype`` (probed once, then cached)."""
    if dtype not in _onednn_ok:
        _onednn_ok[dtype] = probe_onednn(dtype)
    return _onednn_ok[dtype]


def probe_onednn(dtype: torch.dtype) -> bool:
    """The op is internal to PyTorch: check it exists and agrees with F.linear."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, 24, generator=g)[..., 8:16].to(dtype)  # strided, as in ITMM
        w, b = torch.randn(6, 8, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # may run under autocast
            ref = F.linear(x.float(), w.float(), b.float())
            ok = torch.allclose(onednn_linear(x, w, b, True).float(), F.gelu(ref), atol=tol)
            ok = ok and torch.allclose(onednn_linear(x, w, None, False).float(), ref - b.float(), atol=tol)
            if dtype == torch.float32:
                res = torch.randn(2, 5, 6, generator=g)
                ok = ok and torch.allclose(onednn_linear(x, w, b, False, res), ref + res, atol=tol)
        return bool(ok)
    except Exception:  # missing op, unsupported CPU or dtype, changed signature
        return False
