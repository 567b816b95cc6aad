"""Benchmark of the `obs` family: batched block scoring and the rank-s OBS update.

    python benchmarks/bench_obs.py                        # GPU: scoring + update at d=11008
    python benchmarks/bench_obs.py --d 2816 --r 1024      # CPU (the defaults there): cpp vs torch
    python benchmarks/bench_obs.py --backends triton      # CPU: the Triton interpreter (slow)

scoring: obs_group_errors on 32 blocks of 128 and 256 blocks of 64 (heads tiling Hinv, so
d = B*s), with one row of W (r = 1) so the batched factorisation dominates, against the torch
baseline on the same batch: gather the blocks, torch.linalg.cholesky, torch.cholesky_inverse,
error = sum((W_S Ainv) * W_S).
update: obs_group_update at d, s=64 (W r x d, and r = 0: the Hinv downdate alone) against
the paper-like torch reference kernels/obs/reference.py:group_update (cholesky,
cholesky_solve, two GEMMs, index zeroing). Bytes: the contract's traffic, read + write of
Hinv and W, d^2*4*2 + r*d*4*2, for every backend (the fused downdates read only Hinv's
lower half, so their true traffic is lower). Inputs are restored before each timed call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from device_peaks import device_string, peak_tbs

SCORING = [(32, 128), (256, 64)]  # (blocks, s)


def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=11008 if gpu else 2816, help="update: Hinv is d x d")
    p.add_argument("--r", type=int, default=4096 if gpu else 1024, help="update: W is r x d")
    p.add_argument("--s", type=int, default=64, help="update: columns removed")
    p.add_argument("--backends", nargs="+", choices=["torch", "cpp", "triton", "cuda"],
                   help="default: every backend that can run here (no Triton interpreter on CPU)")
    p.add_argument("--repeats", type=int, default=20 if gpu else 5)
    p.add_argument("--json", help="write the rows to this file")
    return p.parse_args()


def backend_ops(names, device):
    """name -> (errors_fn, update_fn) for each requested backend that can run on this device."""
    fns = {}
    if "triton" in names:
        if device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton
        from slimops.kernels.obs import triton as obs_triton
        fns["triton"] = (obs_triton.obs_group_errors, obs_triton.obs_group_update)
    from slimops import ops
    both = (torch.ops.slimops.obs_group_errors, torch.ops.slimops.obs_group_update)
    if "cpp" in names and device == "cpu" and ops.backends()["cpu"].startswith("C++"):
        fns["cpp"] = both
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("slimops::obs_group_errors", "CUDA")
    if "cuda" in names and device == "cuda" and has_cuda:  # whatever serves the op's CUDA key
        fns["cuda"] = both
    return fns


def baseline_errors(W, Hinv, groups):
    blocks = Hinv[groups.unsqueeze(2), groups.unsqueeze(1)]
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
    Ws = W[:, groups].permute(1, 0, 2)                                   # (B, r, s)
    return ((Ws @ Ainv) * Ws).sum((1, 2))


def baseline_update(W, Hinv, idx):
    from slimops.kernels.obs import reference as obs_ref
    obs_ref.group_update(W, Hinv, idx)


def median_seconds(fn, args, restore, repeats):
    """Median time of fn(*args); restore() runs untimed before each call (and the warm-up)."""
    times = []
    for i in range(repeats + 1):  # the first call warms up: compilation, allocator, lazy init
        restore()
        if args[0].is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scoring_problem(B, s, device, gen):
    """Hinv with random SPD diagonal blocks (only the blocks are read), groups = the heads."""
    d = B * s
    X = torch.randn(B, s, 2 * s, generator=gen)
    blocks = X @ X.transpose(1, 2) / (2 * s) + 0.1 * torch.eye(s)
    Hinv = torch.zeros(d, d)
    for b in range(B):
        Hinv[b * s:(b + 1) * s, b * s:(b + 1) * s] = blocks[b]
    groups = torch.arange(d).view(B, s)
    return torch.randn(1, d, generator=gen).to(device), Hinv.to(device), groups.to(device)


def update_problem(r, d, s, device, gen):
    A = torch.randn(d, d, generator=gen).to(device) / d ** 0.5
    H = A @ A.T + torch.eye(d, device=device)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # symmetric, as the solver's
    idx = torch.randperm(d, generator=gen)[:s]
    return torch.randn(r, d, generator=gen).to(device), Hinv, idx.to(device)


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.backends or ["torch", "cpp", "cuda"] + (["triton"] if device == "cuda" else [])
    fns = backend_ops(names, device)
    gen = torch.Generator().manual_seed(0)
    hbm = peak_tbs(device)
    rows = []

    def add(case, name, t, t_base, nbytes=None):
        gbs = None if nbytes is None else nbytes / t / 1e9
        rows.append({"case": case, "backend": name, "ms": t * 1e3, "GB/s": gbs,
                     "pct_hbm": None if gbs is None or hbm is None else 100 * gbs / (hbm * 1e3),
                     "speedup_vs_baseline": t_base / t})

    for B, s in SCORING:
        W, Hinv, groups = scoring_problem(B, s, device, gen)
        case = f"scoring {B}x{s} (d={B * s}, r=1)"
        t_base = median_seconds(baseline_errors, (W, Hinv, groups), lambda: None, args.repeats)
        if "torch" in names:
            add(case, "torch", t_base, t_base)
        for name, (errors, _) in fns.items():
            add(case, name, median_seconds(errors, (W, Hinv, groups), lambda: None, args.repeats), t_base)
        del W, Hinv, groups

    W0, Hinv0, idx = update_problem(args.r, args.d, args.s, device, gen)
    for r in (args.r, 0):
        W, Hinv = W0[:r].clone(), Hinv0.clone()

        def restore():
            W.copy_(W0[:r])
            Hinv.copy_(Hinv0)
        case = f"update d={args.d} s={args.s} r={r}"
        nbytes = (args.d * args.d + r * args.d) * 4 * 2
        t_base = median_seconds(baseline_update, (W, Hinv, idx), restore, args.repeats)
        if "torch" in names:
            add(case, "torch", t_base, t_base, nbytes)
        for name, (_, update) in fns.items():
            add(case, name, median_seconds(update, (W, Hinv, idx), restore, args.repeats), t_base, nbytes)
    return rows, device_string(device)


def print_table(rows, device):
    print(f"device: {device}")
    print("baseline (scoring): gather Hinv[S_b,S_b]; torch.linalg.cholesky + torch.cholesky_inverse; "
          "err = sum((W_S Ainv) * W_S)")
    print("baseline (update): kernels/obs/reference.py group_update (torch cholesky + cholesky_solve + 2 GEMMs)")
    print("bytes (update): read+write of Hinv and W, (d^2 + r*d)*4*2\n")
    print("| case | backend | median ms | GB/s | % HBM peak | vs baseline |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gbs = "-" if r["GB/s"] is None else f"{r['GB/s']:.1f}"
        pct = "n/a" if r["pct_hbm"] is None else f"{r['pct_hbm']:.1f}"
        print(f"| {r['case']} | {r['backend']} | {r['ms']:.3f} | {gbs} | {pct} | {r['speedup_vs_baseline']:.2f}x |")


def main():
    args = parse_args()
    rows, device = run(args)
    print_table(rows, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
