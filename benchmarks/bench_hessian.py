"""Benchmark of the `hessian` family: H += X^T X (fp32 accumulator) for one Hessian (G = 1).

    python benchmarks/bench_hessian.py                      # GPU: T=262144, d=4096 11008, bf16
    python benchmarks/bench_hessian.py --T 8192 --d 1024    # CPU: cpp vs torch
    python benchmarks/bench_hessian.py --backends triton    # CPU: the Triton interpreter (slow)

Flops are counted as SYRK flops, T*d^2 (half the 2*T*d^2 of the dense GEMM, which is all a
SYRK needs), for every backend including the torch baseline, so TFLOP/s compare directly.
Baseline "torch": CPU: H.addmm_(X.float().T, X.float()) (the upcast is timed); GPU bf16/fp16:
H.add_(torch.mm(X.T, X, out_dtype=float32)) (16-bit tensor-core GEMM, fp32 out); GPU fp32:
H.addmm_(X.T, X) under torch's float32 matmul precision.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from device_peaks import DTYPES, device_string, peak_tflops

def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=262144 if gpu else 8192, help="rows (calibration tokens)")
    p.add_argument("--d", type=int, nargs="+", default=[4096, 11008] if gpu else [1024, 2816])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backends", nargs="+", choices=["torch", "cpp", "triton", "cuda"],
                   help="default: every backend that can run here (no Triton interpreter on CPU)")
    p.add_argument("--repeats", type=int, default=10 if gpu else 3)
    p.add_argument("--json", help="write the rows to this file")
    return p.parse_args()


def baseline_fn(device):
    """The plain-torch baseline and a one-line statement of exactly what it runs."""
    if device == "cpu":
        return (lambda H, X: H[0].addmm_(X.float().T, X.float()),
                "H.addmm_(X.float().T, X.float()) (fp32 BLAS, upcast timed)")

    def gpu(H, X):
        if X.dtype == torch.float32:
            H[0].addmm_(X.T, X)
        else:
            H[0].add_(torch.mm(X.T, X, out_dtype=torch.float32))
    return gpu, ("H.add_(torch.mm(X.T, X, out_dtype=float32)) for 16-bit X (cuBLAS), "
                 f"H.addmm_(X.T, X) for fp32 X (float32 matmul precision '{torch.get_float32_matmul_precision()}')")


def backend_fns(names, device):
    """name -> fn(H, X) for each requested backend that can run on this device."""
    fns = {}
    if "triton" in names:
        if device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton
        from slimops.kernels.hessian import triton as hessian_triton
        fns["triton"] = lambda H, X: hessian_triton.hessian_accumulate(H, X)
    from slimops import ops
    if ops.backends()["cpu"].startswith("C++") and "cpp" in names and device == "cpu":
        fns["cpp"] = lambda H, X: torch.ops.slimops.hessian_accumulate(H, X, None, 1.0)
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("slimops::hessian_accumulate", "CUDA")
    if "cuda" in names and device == "cuda" and has_cuda:  # whatever serves the op's CUDA key
        fns["cuda"] = lambda H, X: torch.ops.slimops.hessian_accumulate(H, X, None, 1.0)
    return fns


def median_seconds(fn, H, X, repeats):
    fn(H, X)  # warm-up: autotuning, allocator, lazy init
    times = []
    for _ in range(repeats):
        if X.is_cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(H, X)
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(H, X)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.backends or ["torch", "cpp", "cuda"] + (["triton"] if device == "cuda" else [])
    base, base_desc = baseline_fn(device)
    fns = ({"torch": base} if "torch" in names else {}) | backend_fns(names, device)
    peak = peak_tflops(device, args.dtype)
    rows = []
    for d in args.d:
        X = torch.randn(args.T, d, device=device).to(DTYPES[args.dtype])
        H = torch.zeros(1, d, d, device=device)
        t_base = median_seconds(base, H, X, args.repeats)  # same-run baseline for the ratio
        for name, fn in fns.items():
            t = t_base if name == "torch" else median_seconds(fn, H, X, args.repeats)
            tflops = args.T * d * d / t / 1e12
            rows.append({"backend": name, "dtype": args.dtype, "T": args.T, "d": d, "ms": t * 1e3,
                         "tflops": tflops, "pct_peak": None if peak is None else 100 * tflops / peak,
                         "speedup_vs_torch": t_base / t})
        del X, H
    return rows, device_string(device), base_desc


def print_table(rows, device, base_desc):
    print(f"device: {device}")
    print("flops: SYRK T*d^2 for every backend (the baseline's GEMM does 2*T*d^2)")
    print(f"baseline torch: {base_desc}\n")
    print("| backend | dtype | T | d | median ms | TFLOP/s | % peak | vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = "n/a" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}"
        print(f"| {r['backend']} | {r['dtype']} | {r['T']} | {r['d']} | {r['ms']:.2f} | {r['tflops']:.4g} "
              f"| {pct} | {r['speedup_vs_torch']:.2f}x |")


def main():
    args = parse_args()
    rows, device, base_desc = run(args)
    print_table(rows, device, base_desc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "baseline": base_desc, "flops": "T*d^2", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
