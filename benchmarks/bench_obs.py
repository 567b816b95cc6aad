"""Benchmark of the `obs` family: batched block scoring and the rank-s OBS update.

    python benchmarks/bench_obs.py                        # GPU: scoring + update at d=11008
    python benchmarks/bench_obs.py --d 2816 --r 1024      # CPU (the defaults there): cpp vs torch
    python benchmarks/bench_obs.py --backends triton      # CPU: the Triton interpreter (slow)

scoring: obs_group_errors on 32 blocks of 128 and 256 blocks of 64 (heads tiling Hinv, so
d = B*s), with one row of W (r = 1) so the batched factorisation dominates, against the torch
baseline on the same batch: gather the blocks, torch.linalg.cholesky, torch.cholesky_inverse,
error = sum((W_S Ainv) * W_S). Flops B*(s^3/3 + r*s^2): a Cholesky and one triangular solve
per block, the least that scores it; bytes: the blocks, W and the errors, 4*(B*s^2 + r*d + B).
update: obs_group_update at d, s=64 (W r x d, and r = 0: the Hinv downdate alone) against
the paper-like torch reference kernels/obs/reference.py:group_update (cholesky,
cholesky_solve, two GEMMs, index zeroing). Flops 2*d^2*s + 2*r*d*s (the two rank-s
products); bytes: the contract's traffic, read + write of Hinv and W, (d^2 + r*d)*4*2, for
every backend (the fused downdates read only Hinv's lower half, so their true traffic is
lower). Inputs are restored, untimed, before each timed call.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from common import DEVICE, Case, add_shared_args, run

SCORING = [(32, 128), (256, 64)]  # (blocks, s)


def parse_args(argv=None):
    gpu = DEVICE == "cuda"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=11008 if gpu else 2816, help="update: Hinv is d x d")
    p.add_argument("--r", type=int, default=4096 if gpu else 1024, help="update: W is r x d")
    p.add_argument("--s", type=int, default=64, help="update: columns removed")
    p.add_argument(
        "--scoring",
        type=int,
        nargs=2,
        action="append",
        metavar=("B", "S"),
        help="scoring problems, repeatable (default: 32 128 and 256 64)",
    )
    add_shared_args(p, repeats=20 if gpu else 5, baselines=["torch"])
    return p.parse_args(argv)


def kernels(names):
    """name -> (errors_fn, update_fn) for the kernel backends that run here."""
    both = (torch.ops.slimops.obs_group_errors, torch.ops.slimops.obs_group_update)
    fns = {name: both for name in names if name != "triton"}  # the C++ CPU or the CUDA kernels
    if "triton" in names:
        from slimops.kernels.obs import triton as obs_triton

        fns["triton"] = (obs_triton.obs_group_errors, obs_triton.obs_group_update)
    return fns


def baseline_errors(W, Hinv, groups):
    blocks = Hinv[groups.unsqueeze(2), groups.unsqueeze(1)]
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
    Ws = W[:, groups].permute(1, 0, 2)  # (B, r, s)
    return ((Ws @ Ainv) * Ws).sum((1, 2))


def baseline_update(W, Hinv, idx):
    from slimops.kernels.obs import reference as obs_ref

    obs_ref.group_update(W, Hinv, idx)


def scoring_problem(B, s, gen):
    """Hinv with random SPD diagonal blocks (only the blocks are read), groups = the heads."""
    d = B * s
    X = torch.randn(B, s, 2 * s, generator=gen)
    blocks = X @ X.transpose(1, 2) / (2 * s) + 0.1 * torch.eye(s)
    Hinv = torch.zeros(d, d)
    for b in range(B):
        Hinv[b * s : (b + 1) * s, b * s : (b + 1) * s] = blocks[b]
    groups = torch.arange(d).view(B, s)
    return torch.randn(1, d, generator=gen).to(DEVICE), Hinv.to(DEVICE), groups.to(DEVICE)


def update_problem(r, d, s, gen):
    A = torch.randn(d, d, generator=gen).to(DEVICE) / d**0.5
    H = A @ A.T + torch.eye(d, device=DEVICE)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # symmetric, as the solver's
    idx = torch.randperm(d, generator=gen)[:s]
    return torch.randn(r, d, generator=gen).to(DEVICE), Hinv, idx.to(DEVICE)


def cases(args, names):
    fns, gen = kernels(names), torch.Generator().manual_seed(0)
    for B, s in args.scoring or SCORING:
        prob = scoring_problem(B, s, gen)
        r, d = prob[0].shape
        yield Case(
            keys={"case": f"scoring {B}x{s} (d={d}, r={r})"},
            flops=B * (s**3 / 3 + r * s * s),
            nbytes=4 * (B * s * s + r * d + B),
            dtype="fp32",
            baselines={"torch": partial(baseline_errors, *prob)},
            kernels={name: partial(errors, *prob) for name, (errors, _) in fns.items()},
        )

    d, s = args.d, args.s
    W0, Hinv0, idx = update_problem(args.r, d, s, gen)
    for r in (args.r, 0):
        W, Hinv = W0[:r].clone(), Hinv0.clone()
        yield Case(
            keys={"case": f"update d={d} s={s} r={r}"},
            flops=2 * d * d * s + 2 * r * d * s,
            nbytes=(d * d + r * d) * 4 * 2,
            dtype="fp32",
            baselines={"torch": partial(baseline_update, W, Hinv, idx)},
            kernels={name: partial(update, W, Hinv, idx) for name, (_, update) in fns.items()},
            restore=partial(copy_back, (W, Hinv), (W0[:r], Hinv0)),
        )


def copy_back(tensors, originals):
    for t, original in zip(tensors, originals):
        t.copy_(original)


def main(argv=None):
    args = parse_args(argv)
    return run(
        "obs_group_errors",
        args,
        cases,
        [
            "baseline torch (scoring): gather Hinv[S_b,S_b]; "
            "torch.linalg.cholesky + torch.cholesky_inverse; "
            "err = sum((W_S Ainv) * W_S)",
            "baseline torch (update): kernels/obs/reference.py group_update "
            "(cholesky + cholesky_solve + 2 GEMMs)",
            "flops: scoring B*(s^3/3 + r*s^2), update 2*d^2*s + 2*r*d*s; "
            "bytes: scoring 4*(B*s^2 + r*d + B), update read+write of Hinv and W, (d^2 + r*d)*4*2",
        ],
    )


if __name__ == "__main__":
    main()
