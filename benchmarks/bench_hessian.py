"""Benchmark of the `hessian` family: H += X^T X (fp32 accumulator) for one Hessian (G = 1).

    python benchmarks/bench_hessian.py                      # GPU: T=262144, d=4096 11008, bf16
    python benchmarks/bench_hessian.py --T 8192 --d 1024    # CPU: cpp vs torch
    python benchmarks/bench_hessian.py --competing-load 2   # the same, with 2 busy cores
    python benchmarks/bench_hessian.py --backends triton    # CPU: the Triton interpreter (slow)

Flops are counted as SYRK flops, T*d^2 (half the 2*T*d^2 of the dense GEMM, which is all a
SYRK needs), for every backend including the torch baseline, so TFLOP/s compare directly.
Bytes: X read once and H read and written once, T*d*elem + 2*d^2*4.
Baseline "torch": CPU: H.addmm_(X.float().T, X.float()) (the upcast is timed); GPU bf16/fp16:
H.add_(torch.mm(X.T, X, out_dtype=float32)) (16-bit tensor-core GEMM, fp32 out); GPU fp32:
H.addmm_(X.T, X) under torch's float32 matmul precision.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from common import DEVICE, DTYPES, Case, add_shared_args, run


def parse_args(argv=None):
    gpu = DEVICE == "cuda"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--T", type=int, default=262144 if gpu else 8192, help="rows (calibration tokens)"
    )
    p.add_argument("--d", type=int, nargs="+", default=[4096, 11008] if gpu else [1024, 2816])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    add_shared_args(p, repeats=10 if gpu else 3, baselines=["torch"])
    return p.parse_args(argv)


def baseline(device):
    """The plain-torch baseline fn(H, X) and a one-line statement of exactly what it runs."""
    if device == "cpu":
        return (
            lambda H, X: H[0].addmm_(X.float().T, X.float()),
            "H.addmm_(X.float().T, X.float()) (fp32 BLAS, upcast timed)",
        )

    def gpu(H, X):
        if X.dtype == torch.float32:
            H[0].addmm_(X.T, X)
        else:
            H[0].add_(torch.mm(X.T, X, out_dtype=torch.float32))

    return gpu, (
        "H.add_(torch.mm(X.T, X, out_dtype=float32)) for 16-bit X (cuBLAS), H.addmm_(X.T, X) for "
        f"fp32 X (float32 matmul precision '{torch.get_float32_matmul_precision()}')"
    )


def kernels(names):
    """name -> fn(H, X) for the kernel backends that run here (see common.kernel_backends)."""

    def op(H, X):  # whatever serves the op's dispatch key: the C++ CPU or the CUDA kernel
        torch.ops.slimops.hessian_accumulate(H, X, None, 1.0)

    fns = {name: op for name in names if name != "triton"}
    if "triton" in names:
        from slimops.kernels.hessian import triton as hessian_triton

        fns["triton"] = hessian_triton.hessian_accumulate
    return fns


def cases(args, names):
    torch_fn, kernel_fns = baseline(DEVICE)[0], kernels(names)
    for d in args.d:
        X = torch.randn(args.T, d, device=DEVICE).to(DTYPES[args.dtype])
        H = torch.zeros(1, d, d, device=DEVICE)
        yield Case(
            keys={"dtype": args.dtype, "T": args.T, "d": d},
            flops=args.T * d * d,
            nbytes=X.numel() * X.element_size() + 2 * H.numel() * 4,
            dtype=args.dtype,
            baselines={"torch": partial(torch_fn, H, X)},
            kernels={name: partial(fn, H, X) for name, fn in kernel_fns.items()},
        )


def main(argv=None):
    args = parse_args(argv)
    return run(
        "hessian_accumulate",
        args,
        cases,
        [
            "flops: SYRK T*d^2 for every backend (the baseline's GEMM does 2*T*d^2); "
            "bytes: T*d*elem + 2*d^2*4",
            f"baseline torch: {baseline(DEVICE)[1]}",
        ],
    )


if __name__ == "__main__":
    main()
