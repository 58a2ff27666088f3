"""M2ORT forward throughput against the machine's own matmul FLOP rate.

Prints a markdown table. The FLOP rate of a large square matmul is the ceiling a
GEMM-bound model can reach on this device; the model's achieved rate is
``flops_per_spot × spots/s`` (3.42 GFLOP per spot for M2ORT-S, linear layers plus
attention products), so the ratio says how much of the machine the implementation uses.

Rows: float32 eager as shipped (fused SDPA; on CPU, oneDNN linears with fused bias, GELU
and residual add), the same with plain ``F.linear`` (MKL) on CPU, the same with explicit
softmax attention, and bf16 autocast as shipped (on CPU: oneDNN bf16 linears and batched
bf16 attention) with its relative error against float32; then the opt-in
``torch.compile`` path (``napari_m2ort.compiled``: inductor, frozen weights, static batch)
in fp32 and bf16, with the one-time compile time (``--no-compile`` skips these rows).

    python benchmarks/bench_model.py                       # CPU, batch 64
    python benchmarks/bench_model.py --threads 2 --out benchmarks/results/model_cpu.md
    python benchmarks/bench_model.py --device cuda         # batch sweep 64..4096, fp32 + bf16

Timings are the best of ``--repeats`` rounds after a warm-up round; every round times
each row (matmuls included) once, interleaved, so load from other processes on a shared
machine hits all rows alike and the best run is the least disturbed one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch

import napari_m2ort  # noqa: F401  (registers the models with timm)
from napari_m2ort.compiled import compiled_forward, is_compiled
from napari_m2ort.model import _cpu_ops
from napari_m2ort.model import m2ort as arch

GEMM_N = 4096
SHIPPED_FP32 = "fp32 (shipped: fused SDPA; CPU: oneDNN linears; CLS-only last block)"
FULL_LAST = "fp32, all tokens through the last block"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_cases(device: str) -> dict[str, tuple]:
    """N x N x N matmuls: fp32 (torch.matmul; on CPU also oneDNN) and bf16 -> (fn, flop)."""
    n = GEMM_N
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    cases = {"fp32": (lambda: a @ b, 2 * n**3)}
    if device == "cpu" and _cpu_ops.onednn_available(torch.float32):
        bt = b.t().contiguous()
        op = torch.ops.mkldnn._linear_pointwise
        cases["fp32 oneDNN"] = (lambda: op(a, bt, None, "none", [], ""), 2 * n**3)
    ab, bb = a.bfloat16(), b.bfloat16()
    cases["bf16"] = (lambda: ab @ bb, 2 * n**3)
    return cases


@contextlib.contextmanager
def explicit_attention():
    """Swap the fused SDPA for matmul -> softmax -> matmul (same weights)."""
    original = arch.ITMM.forward

    def forward(self, x, residual=None, num_queries=None):
        q, k, v = self.qkv(x, num_queries)
        w = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        b, h, n, d = w.shape
        out = self.proj_drop(self.proj(w.transpose(1, 2).reshape(b, n, h * d)))
        return out if residual is None else residual + out

    arch.ITMM.forward = forward
    try:
        yield
    finally:
        arch.ITMM.forward = original


@contextlib.contextmanager
def plain_linear():
    """CPU: ordinary F.linear (MKL addmm) instead of the oneDNN path."""
    saved = _cpu_ops.USE_ONEDNN
    _cpu_ops.USE_ONEDNN = False
    try:
        yield
    finally:
        _cpu_ops.USE_ONEDNN = saved


def make_inputs(batch: int, device: str):
    g = torch.Generator(device=device).manual_seed(1)
    return tuple(torch.rand(batch, 3, s, s, device=device, generator=g) for s in (224, 112, 56))


def model_case(model, x, device: str, explicit=False, plain=False, bf16=False, full_last=False):
    def run():
        with contextlib.ExitStack() as stack:
            if explicit:
                stack.enter_context(explicit_attention())
            if plain:
                stack.enter_context(plain_linear())
            if bf16:
                stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
            if full_last:  # every token through the last block, as a plain ViT would
                return model.forward_head(model.forward_features(*x))
            return model(*x)

    return run


def compiled_case(model, x, device: str, bf16: bool):
    """The shipped opt-in compiled forward; returns (fn, compile seconds, compiled?)."""
    amp = torch.bfloat16 if bf16 else None
    fwd = compiled_forward(model, torch.device(device), amp, x[0].shape[0])

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return fwd(*x)

    with torch.inference_mode():
        t0 = time.perf_counter()
        run()  # compiles
        seconds = time.perf_counter() - t0
    return run, seconds, is_compiled(fwd)


def rel_error(model, x, device, fn=None) -> float:
    """Relative error of ``fn`` (default: bf16 autocast eager) against float32 eager."""
    with torch.inference_mode():
        ref = model(*x).float()
        if fn is None:
            with torch.autocast(device, dtype=torch.bfloat16):
                low = model(*x).float()
        else:
            low = fn().float()
    return ((low - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variant", default="m2ort_small")
    p.add_argument("--batch", type=int, nargs="*", help="batch sizes (CPU default 64; CUDA 64..4096)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    batches = args.batch or ([64] if device == "cpu" else [64, 128, 256, 512, 1024, 2048, 4096])

    torch.manual_seed(0)
    model = timm.create_model(args.variant, num_classes=250).to(device).eval()
    gflop = arch.flops_per_spot(model) / 1e9
    gflop_run = arch.executed_flops_per_spot(model) / 1e9  # the CLS-only last block skips the rest

    mm_cases = matmul_cases(device)
    cases: list[tuple[str, int, object]] = []
    compiled_fns: dict = {}
    inputs = {}
    for batch in batches:
        x = inputs[batch] = make_inputs(batch, device)
        cases.append((SHIPPED_FP32, batch, model_case(model, x, device)))
        cases.append((FULL_LAST, batch, model_case(model, x, device, full_last=True)))
        if device == "cpu":
            cases.append(("fp32, plain F.linear (MKL addmm)", batch,
                          model_case(model, x, device, plain=True)))  # fmt: skip
        cases.append(("fp32, explicit softmax attention", batch, model_case(model, x, device, explicit=True)))
        cases.append(("bf16 autocast (shipped)", batch, model_case(model, x, device, bf16=True)))
        if device == "cuda":
            cases.append(("bf16 autocast, explicit attention", batch,
                          model_case(model, x, device, explicit=True, bf16=True)))  # fmt: skip
        if not args.no_compile:
            for bf16 in (False, True):
                fn, seconds, ok = compiled_case(model, x, device, bf16)
                name = f"{'bf16 autocast' if bf16 else 'fp32'} + torch.compile"
                name += f" (frozen weights; compile {seconds:.0f} s)" if ok else " (FAILED: eager)"
                cases.append((name, batch, fn))
                compiled_fns[(name, batch)] = fn

    # Rounds interleave every case, so a burst of load from other processes hits all of
    # them alike; each case keeps its best time. Round 0 is the warm-up.
    best: dict[str, float] = {}
    with torch.inference_mode():
        for r in range(args.repeats + 1):
            for key, (fn, _) in mm_cases.items():
                t = timed(fn, device)
                if r:
                    best[key] = min(best.get(key, float("inf")), t)
            for name, batch, fn in cases:
                t = timed(fn, device)
                if r:
                    best[f"{name}|{batch}"] = min(best.get(f"{name}|{batch}", float("inf")), t)
    mm = {key: flop / best[key] / 1e9 for key, (_, flop) in mm_cases.items()}
    rows = []
    for name, batch, _ in cases:
        t = best[f"{name}|{batch}"]
        err = None
        if name.startswith("bf16"):
            err = rel_error(model, inputs[batch], device, compiled_fns.get((name, batch)))
        executed = gflop if name == FULL_LAST else gflop_run
        rows.append((name, batch, batch / t, gflop * batch / t, executed * batch / t, name.startswith("bf16"), err))

    fp32_peak = max(v for k, v in mm.items() if k.startswith("fp32"))
    lines = [
        f"## {args.variant} forward throughput, {device}",
        "",
        f"- device: {describe(device)}; torch {torch.__version__}, timm {timm.__version__}, "
        f"threads {torch.get_num_threads()}",
        f"- {gflop:.3f} GFLOP per spot (analytic: linear layers + attention products), the basis of "
        f"the GFLOP/s and ratio columns; {gflop_run:.3f} GFLOP actually executed (the head reads "
        "only the CLS token, so the last block runs the other tokens' keys and values only)",
        "- matmul " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in mm.items()) + f" ({GEMM_N}² x {GEMM_N})",
        f"- best of {args.repeats} rounds; each round times every row once, interleaved; "
        f"load average at the end {load_average()}",
        "",
        "| mode | batch | spots/s | GFLOP/s | / fp32 matmul (best) | / bf16 matmul | executed GFLOP/s "
        "| executed / fp32 matmul (best) | bf16 rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp32_by_batch = {r[1]: r[2] for r in rows if r[0] == SHIPPED_FP32}
    for name, batch, sps, rate, run_rate, bf16, err in rows:
        speed = f" ({sps / fp32_by_batch[batch]:.2f}x fp32)" if bf16 or "compile" in name else ""
        lines.append(
            f"| {name}{speed} | {batch} | {sps:.1f} | {rate:.0f} | {rate / fp32_peak:.2f} | "
            f"{rate / mm['bf16']:.2f} | {run_rate:.0f} | {run_rate / fp32_peak:.2f} | "
            f"{'' if err is None else f'{err:.1e}'} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def load_average() -> str:
    """Other processes on the machine skew CPU numbers; say how busy it was."""
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return "unknown"


def describe(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    raise SystemExit(main())
