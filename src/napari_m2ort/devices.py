"""Device and precision choice, in one place for inference and training."""

from __future__ import annotations

import torch

from .errors import M2ORTError


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.insert(0, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.insert(0, "mps")
    return devices


def resolve_device(device: str = "auto") -> torch.device:
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    base = name.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise M2ORTError(f"Unknown device {device!r}: use auto, cuda, mps or cpu.")
    if base != "cpu" and base not in available_devices():
        raise M2ORTError(
            f"Device {device!r} was asked for but is not available on this machine "
            f"(available: {', '.join(available_devices())}); use --device auto or cpu."
        )
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    ``auto`` is bf16 on CUDA and fp16 on MPS. On CPU it is bf16 only where the CPU has
    native bf16 dot products (AVX512-BF16 or AMX): there bf16 autocast measured 1.2–1.4×
    the fp32 rate with relative error 7e-3 (benchmarks/results/model_cpu.md); elsewhere
    it would be emulated and slower, so fp32. The choice depends on the CPU's flags alone,
    so results stay deterministic from run to run on one machine.
    """
    p = (precision or "auto").lower()
    if p == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    table = {
        "fp32": None,
        "float32": None,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if p not in table:
        raise M2ORTError(f"Unknown precision {precision!r}: use auto, fp32, bf16 or fp16.")
    return table[p]


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False  # not Linux: stay with fp32
    return "avx512_bf16" in flags or "amx_bf16" in flags
