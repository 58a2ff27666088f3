"""How an eager model is called on CPU: always in chunks of the same number of rows.

oneDNN builds its kernels per input shape, and a shape's first forward costs 0.1-0.7 s
more (measured on the 2-core machine, bf16). Run in chunks of ``CPU_CHUNK`` rows, the
last one padded, the model sees one shape per process: the first Predict pays for it
once, or never after ``inference.warm_up_model``. 16 rows run as fast per spot as 64
there, and every path (predict, evaluate, validation, a compiled forward that fell back
to eager) computes each spot in the same shape, so values do not depend on the batch
size a caller picked.
"""

from __future__ import annotations

import torch

CPU_CHUNK = 16


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` padded to ``rows`` by repeating its last row, with ``x``'s memory layout
    (kernels, and compiled code, are specialised to strides too)."""
    n = x.shape[0]
    if n == rows:
        return x
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
    out[:n] = x
    out[n:] = x[-1:]
    return out


def run_eager(model, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor) -> torch.Tensor:
    """``model(l1, l2, l3)``; on CPU in chunks of ``CPU_CHUNK`` rows (last one padded)."""
    n = l1.shape[0]
    if l1.device.type != "cpu" or n == CPU_CHUNK or n == 0:
        return model(l1, l2, l3)
    outs = []
    for i in range(0, n, CPU_CHUNK):
        parts = [x[i : i + CPU_CHUNK] for x in (l1, l2, l3)]
        k = parts[0].shape[0]
        outs.append(model(*(pad_rows(p, CPU_CHUNK) for p in parts))[:k])
    return torch.cat(outs, dim=0)
