"""Optional ``torch.compile`` for prediction: one compiled forward per model, reused.

On the 2-core AVX512-BF16 CPU we measure on, eager bf16 autocast runs M2ORT-S at about
1.45x the float32 rate: the linears already run at the bf16 GEMM peak, and the rest of
the time goes to unfused passes (layer norms and their casts, softmax, residual adds).
Inductor fuses those and, with frozen weights, pre-packs them for oneDNN: about 1.8x
float32 eager (benchmarks/results/model_cpu.md). The price is a one-time compile of
17-39 s on that CPU (11-14 s once inductor's on-disk cache is warm), so compiling pays
off only on large jobs (roughly 3,000-8,000 spots and up there);
it is on for CPU bf16 jobs of 10,000+ spots (``compile="auto"``, the CLI's default),
and otherwise switched on with ``predict(..., compile=True)``, the CLI's ``--compile on``
or the widget's checkbox.

Three things keep it safe to switch on:

- every batch is padded to the one batch size the model was compiled for, so a short last
  batch never triggers a recompile and each spot's result does not depend on how many
  spots shared its batch;
- frozen weights are constants of the compiled code, so the cache entry remembers the
  parameters' storage and version counters and compiles again after fine-tuning or
  loading new weights, instead of predicting with stale ones;
- if compiling fails (no C++ compiler, an unsupported device or torch build), one warning
  says why and prediction goes on eagerly, with the same results eager always gives.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from .cpu_chunks import pad_rows, run_eager

__all__ = ["compiled_forward", "is_compiled", "needs_compiling", "clear_cache", "decide", "AUTO_MIN_SPOTS"]

# ``compile="auto"`` compiles CPU bf16 jobs of at least this many spots: the compile
# (17-39 s) is won back after ~3,000-8,000 spots at the measured 57.7 -> 79.5 spots/s.
AUTO_MIN_SPOTS = 10_000

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The cache lives on the model (a plain attribute, not a submodule): it goes when the
# model goes, and a model object is never compiled twice for the same settings.
_ATTR = "_napari_m2ort_compiled"
_lock = threading.Lock()


def compiled_forward(model: torch.nn.Module, device: torch.device, amp: torch.dtype | None, batch_size: int) -> Forward:
    """A forward for (B <= batch_size) inputs; ``is_compiled`` says whether it still is.

    Call it under ``torch.inference_mode()`` and the same autocast state every time (that
    is what it was compiled for; another state compiles again). The model must already be
    on ``device`` and in eval mode.
    """
    if device.type not in ("cpu", "cuda"):
        warnings.warn(
            f"torch.compile is not used on {device.type}: only CPU and CUDA are supported; predicting without it.",
            stacklevel=3,
        )
        return model
    key = _key(device, amp, batch_size)
    state = _weights_state(model)
    with _lock:
        per_model = model.__dict__.setdefault(_ATTR, {})
        entry = per_model.get(key)
        if entry is None or entry["state"] != state:
            if any(e["state"] != state for e in per_model.values()):
                # Weights changed: dynamo would reuse code compiled with the old frozen
                # weights (its guards check which tensors, not their values). Start over.
                per_model.clear()
                torch._dynamo.reset()
            entry = per_model[key] = {"state": state, "fn": _Padded(model, batch_size)}
    return entry["fn"]


def is_compiled(fn: Forward) -> bool:
    """True for a compiled forward that has not fallen back to eager."""
    return isinstance(fn, _Padded) and not fn.failed


def needs_compiling(model: torch.nn.Module, device: torch.device, amp: torch.dtype | None, batch_size: int) -> bool:
    """Whether the next compiled forward for these settings starts with a compile (to tell
    the user why the first batch waits)."""
    entry = model.__dict__.get(_ATTR, {}).get(_key(device, amp, batch_size))
    return entry is None or not entry["fn"].ran or entry["state"] != _weights_state(model)


def _key(device: torch.device, amp: torch.dtype | None, batch_size: int) -> tuple:
    return device.type, str(amp), int(batch_size)


def decide(mode, device: torch.device, amp: torch.dtype | None, n_spots: int) -> tuple[bool, str | None]:
    """Whether to compile, and a warning to show when an explicit request is declined.

    ``mode``: True/"on", False/"off", or "auto" (CPU bf16 jobs of ``AUTO_MIN_SPOTS`` or
    more spots: the one case measured to pay; GPUs are left eager until measured there).
    """
    m = {True: "on", False: "off", None: "off"}.get(mode, str(mode).lower())
    if m not in ("on", "off", "auto"):
        raise ValueError(f"compile must be on, off or auto, got {mode!r}")
    if m == "off":
        return False, None
    cpu_fp32 = device.type == "cpu" and amp is None
    if m == "auto":
        return device.type == "cpu" and amp == torch.bfloat16 and n_spots >= AUTO_MIN_SPOTS, None
    if cpu_fp32:
        return False, (
            "torch.compile is skipped for float32 on CPU: there the eager path (oneDNN "
            "linears, fused attention) is as fast or faster (compiled measured 0.85-1.00x). "
            "It pays with bf16 (--precision bf16, or auto on an AVX512-BF16 CPU)."
        )
    return True, None


def clear_cache(model: torch.nn.Module) -> None:
    """Forget ``model``'s compiled forwards (they are rebuilt on next use)."""
    with _lock:
        model.__dict__.pop(_ATTR, None)


def _weights_state(model: torch.nn.Module) -> tuple:
    """Changes whenever any parameter or buffer is replaced or modified in place."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


class _Padded:
    """Compiled forward at one static batch size; falls back to eager after a failure."""

    def __init__(self, model: torch.nn.Module, batch_size: int):
        self.model = model
        self.batch_size = batch_size
        self.failed = False
        self.ran = False  # compiled code exists once a call has gone through
        self._compiled = torch.compile(model, dynamic=False)

    def __call__(self, l1: torch.Tensor, l2: torch.Tensor, l3: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return run_eager(self.model, l1, l2, l3)
        n = l1.shape[0]
        if n > self.batch_size:
            raise ValueError(f"compiled for batches of up to {self.batch_size} spots, got {n}")
        padded = [pad_rows(x, self.batch_size) for x in (l1, l2, l3)]
        try:
            # Freezing is read whenever dynamo compiles: on the first call, and again after
            # a reset. Scoped to the call, so other compiled code is left as it was.
            with torch._inductor.config.patch(freezing=True):
                out = self._compiled(*padded)
        except Exception as exc:  # compiler missing, unsupported op, inductor bug
            self.failed = True
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {_first_line(exc)}); "
                "predicting without it. Install a C++ compiler (Debian: apt-get install g++) "
                "to use compilation on CPU.",
                stacklevel=3,
            )
            return run_eager(self.model, l1, l2, l3)
        self.ran = True
        return out[:n]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
