"""Benchmark of the `slice_gemm` family: Y = X[:, I] @ W[J][:, I]^T + bias[J], 75% kept.

    python benchmarks/bench_slice_gemm.py                  # GPU: W 4096 x 11008, bf16
    python benchmarks/bench_slice_gemm.py --json out.json  # CPU: W 2048 x 5504, fp32
    python benchmarks/bench_slice_gemm.py --backends triton --shape 64 96 --prefill 32 --decode 1

Slices (--modes): in-ch keeps 75% of the input channels (in_block 1, a pruned down_proj),
in-head 75% of the input blocks of 128 (heads, an o_proj), out 75% of the output rows (an
up/gate_proj). Prefill: T = --prefill tokens; decode: T = each of --decode.

Flops 2*T*|I|*|J|; bytes = the slice's minimum traffic: X[:, I] and W[J][:, I] read once, Y
written once, bias and indices. Same-run baselines: "dense" = F.linear on the slice
materialised beforehand (what a physically pruned layer runs: cuBLAS on GPU, BLAS on CPU;
the speed to reach); "gather" = index_select of X and W, then F.linear, timed (what to beat).
The Triton launcher is timed with check_indices=False (its range check is a device sync).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from device_peaks import DTYPES, device_string, peak_tbs, peak_tflops

MODES = ("in-ch", "in-head", "out")


def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, metavar=("D_OUT", "D_IN"),
                   default=[4096, 11008] if gpu else [2048, 5504], help="full weight shape")
    p.add_argument("--prefill", type=int, default=2048 if gpu else 256, help="prefill tokens (0: skip)")
    p.add_argument("--decode", type=int, nargs="*", default=[1, 4, 16], help="decode token counts")
    p.add_argument("--keep", type=float, default=0.75, help="kept fraction of the sliced dimension")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--backends", nargs="+", choices=["cpp", "triton", "cuda"],
                   help="default: every backend that can run here (no Triton interpreter on CPU)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="write the rows to this file")
    return p.parse_args()


def make_problem(mode, T, d_out, d_in, keep, dtype, device, seed=0):
    """(X, W, bias, in_idx, out_idx, in_block) for one slice mode; indices sorted, as kept
    heads/channels come out of a pruning plan."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d_in, generator=g).to(device, dtype)
    W = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(device, dtype)
    bias = torch.randn(d_out, generator=g).to(device, dtype)
    in_block = 128 if mode == "in-head" else 1
    n = d_out if mode == "out" else d_in // in_block
    kept = torch.randperm(n, generator=g)[:round(n * keep)].sort().values.to(device)
    if mode == "out":
        return X, W, bias, None, kept, 1
    return X, W, bias, kept, None, in_block


def kept_cols(in_idx, in_block, d_in, device):
    if in_idx is None:
        return torch.arange(d_in, device=device)
    return (in_idx[:, None] * in_block + torch.arange(in_block, device=device)).reshape(-1)


def baselines(X, W, bias, in_idx, out_idx, in_block):
    """name -> fn() for the two same-run baselines (see the module docstring)."""
    cols = kept_cols(in_idx, in_block, X.shape[1], X.device)
    rows = torch.arange(W.shape[0], device=X.device) if out_idx is None else out_idx
    Xs, Ws, bs = X[:, cols].contiguous(), W[rows][:, cols].contiguous(), bias[rows].contiguous()
    return {"dense": lambda: F.linear(Xs, Ws, bs),
            "gather": lambda: F.linear(X.index_select(1, cols), W.index_select(0, rows).index_select(1, cols),
                                       bias.index_select(0, rows))}


def backend_fns(names, device):
    """name -> fn(X, W, bias, in_idx, out_idx, in_block) for the backends that run here."""
    fns = {}
    if "triton" in names and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (ops.backends)
    from slimops import ops
    if "cpp" in names and device == "cpu" and ops.backends()["cpu"].startswith("C++"):
        fns["cpp"] = torch.ops.slimops.slice_gemm
    if "triton" in names:
        from slimops.kernels.slice_gemm import triton as sg_triton
        fns["triton"] = lambda *a: sg_triton.slice_gemm(*a, check_indices=False)
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("slimops::slice_gemm", "CUDA")
    if "cuda" in names and device == "cuda" and has_cuda:
        fns["cuda"] = torch.ops.slimops.slice_gemm
    return fns


def seconds(fn, device, repeats):
    """Median seconds per call. GPU: triton's do_bench, which clears L2 before every call
    (a 75% slice of 4096 x 11008 bf16 is 68 MB, close to H100's 50 MB L2); CPU: wall clock."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def traffic(X, W, in_idx, out_idx, in_block):
    """(flops, bytes) of the slice GEMM, at the minimum traffic."""
    T, d_in = X.shape
    n_in = d_in if in_idx is None else in_idx.numel() * in_block
    n_out = W.shape[0] if out_idx is None else out_idx.numel()
    s = X.element_size()
    n_idx = (0 if in_idx is None else in_idx.numel()) + (0 if out_idx is None else n_out)
    return 2 * T * n_in * n_out, s * (T * n_in + n_out * n_in + T * n_out + n_out) + 8 * n_idx


def device_info(device, dtype):
    """(device string, peak TFLOP/s or None, peak TB/s or None)."""
    return device_string(device), peak_tflops(device, dtype), peak_tbs(device)


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.backends or ["cpp", "cuda"] + (["triton"] if device == "cuda" else [])
    fns = backend_fns(names, device)
    dev, peak_tf, peak_bw = device_info(device, args.dtype)
    Ts = ([("prefill", args.prefill)] if args.prefill else []) + [("decode", t) for t in args.decode]
    rows = []
    for mode in args.modes:
        for phase, T in Ts:
            prob = make_problem(mode, T, *args.shape, args.keep, DTYPES[args.dtype], device)
            flops, nbytes = traffic(prob[0], prob[1], prob[3], prob[4], prob[5])
            base = {k: seconds(f, device, args.repeats) for k, f in baselines(*prob).items()}
            timed = dict(base) | {k: seconds(lambda f=f: f(*prob), device, args.repeats) for k, f in fns.items()}
            for name, t in timed.items():
                tf, gbs = flops / t / 1e12, nbytes / t / 1e9
                rows.append({"mode": mode, "phase": phase, "T": T, "backend": name, "dtype": args.dtype,
                             "ms": t * 1e3, "tflops": tf, "gbs": gbs,
                             "pct_peak_flops": None if peak_tf is None else 100 * tf / peak_tf,
                             "pct_peak_bw": None if peak_bw is None else 100 * gbs / (peak_bw * 1e3),
                             "vs_dense": base["dense"] / t, "vs_gather": base["gather"] / t})
            del prob
    return rows, dev


def fmt_pct(v):
    return "n/a" if v is None else f"{v:.1f}"


def print_table(rows, dev, args):
    print(f"device: {dev}")
    print(f"W {args.shape[0]} x {args.shape[1]} {args.dtype}, {args.keep:.0%} kept; flops 2*T*|I|*|J|; "
          "vs dense / vs gather: same-run time ratio (>1: faster than that baseline)\n")
    print("| mode | phase | T | backend | ms | TFLOP/s | GB/s | % peak flops | % peak HBM | vs dense | vs gather |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['phase']} | {r['T']} | {r['backend']} | {r['ms']:.3f} | {r['tflops']:.3g} "
              f"| {r['gbs']:.1f} | {fmt_pct(r['pct_peak_flops'])} | {fmt_pct(r['pct_peak_bw'])} "
              f"| {r['vs_dense']:.2f}x | {r['vs_gather']:.2f}x |")


def main():
    args = parse_args()
    rows, dev = run(args)
    print_table(rows, dev, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
