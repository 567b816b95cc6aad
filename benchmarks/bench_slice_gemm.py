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
from functools import partial

import torch
import torch.nn.functional as F

from common import DEVICE, DTYPES, Case, add_shared_args, run

MODES = ("in-ch", "in-head", "out")


def parse_args(argv=None):
    gpu = DEVICE == "cuda"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape",
        type=int,
        nargs=2,
        metavar=("D_OUT", "D_IN"),
        default=[4096, 11008] if gpu else [2048, 5504],
        help="full weight shape",
    )
    p.add_argument(
        "--prefill", type=int, default=2048 if gpu else 256, help="prefill tokens (0: skip)"
    )
    p.add_argument("--decode", type=int, nargs="*", default=[1, 4, 16], help="decode token counts")
    p.add_argument("--keep", type=float, default=0.75, help="kept fraction of the sliced dimension")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    add_shared_args(p, repeats=7)
    return p.parse_args(argv)


def make_problem(mode, T, d_out, d_in, keep, dtype, seed=0):
    """(X, W, bias, in_idx, out_idx, in_block) for one slice mode; indices sorted, as kept
    heads/channels come out of a pruning plan."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d_in, generator=g).to(DEVICE, dtype)
    W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(DEVICE, dtype)
    bias = torch.randn(d_out, generator=g).to(DEVICE, dtype)
    in_block = 128 if mode == "in-head" else 1
    n = d_out if mode == "out" else d_in // in_block
    kept = torch.randperm(n, generator=g)[: round(n * keep)].sort().values.to(DEVICE)
    if mode == "out":
        return X, W, bias, None, kept, 1
    return X, W, bias, kept, None, in_block


def baselines(X, W, bias, in_idx, out_idx, in_block):
    """name -> fn() for the two same-run baselines (see the module docstring)."""
    cols = torch.arange(X.shape[1], device=X.device)
    if in_idx is not None:
        cols = (in_idx[:, None] * in_block + torch.arange(in_block, device=X.device)).reshape(-1)
    rows = torch.arange(W.shape[0], device=X.device) if out_idx is None else out_idx
    Xs, Ws, bs = X[:, cols].contiguous(), W[rows][:, cols].contiguous(), bias[rows].contiguous()

    def gather():
        return F.linear(
            X.index_select(1, cols),
            W.index_select(0, rows).index_select(1, cols),
            bias.index_select(0, rows),
        )

    return {"dense": partial(F.linear, Xs, Ws, bs), "gather": gather}


def kernels(names):
    """name -> fn(X, W, bias, in_idx, out_idx, in_block) for the kernel backends that run here."""
    fns = {name: torch.ops.slimops.slice_gemm for name in names if name != "triton"}  # C++ / CUDA
    if "triton" in names:
        from slimops.kernels.slice_gemm import triton as sg_triton

        fns["triton"] = partial(sg_triton.slice_gemm, check_indices=False)
    return fns


def traffic(X, W, in_idx, out_idx, in_block):
    """(flops, bytes) of the slice GEMM, at the minimum traffic."""
    T, d_in = X.shape
    n_in = d_in if in_idx is None else in_idx.numel() * in_block
    n_out = W.shape[0] if out_idx is None else out_idx.numel()
    s = X.element_size()
    n_idx = (0 if in_idx is None else in_idx.numel()) + (0 if out_idx is None else n_out)
    return 2 * T * n_in * n_out, s * (T * n_in + n_out * n_in + T * n_out + n_out) + 8 * n_idx


def cases(args, names):
    fns = kernels(names)
    phases = ([("prefill", args.prefill)] if args.prefill else []) + [
        ("decode", t) for t in args.decode
    ]
    for mode in args.modes:
        for phase, T in phases:
            prob = make_problem(mode, T, *args.shape, args.keep, DTYPES[args.dtype])
            flops, nbytes = traffic(prob[0], prob[1], *prob[3:])
            yield Case(
                keys={"mode": mode, "phase": phase, "T": T, "dtype": args.dtype},
                flops=flops,
                nbytes=nbytes,
                dtype=args.dtype,
                baselines=baselines(*prob),
                kernels={name: partial(fn, *prob) for name, fn in fns.items()},
            )


def main(argv=None):
    args = parse_args(argv)
    return run(
        "slice_gemm",
        args,
        cases,
        [
            f"W {args.shape[0]} x {args.shape[1]} {args.dtype}, {args.keep:.0%} kept; "
            "flops 2*T*|I|*|J|; "
            "bytes: X[:, I], W[J][:, I], Y, bias and indices once",
            "baselines: dense = F.linear on the pre-sliced weight (the speed to reach), "
            "gather = index_select + F.linear (what to beat); vs: same-run time ratio, >1: faster",
        ],
    )


if __name__ == "__main__":
    main()
