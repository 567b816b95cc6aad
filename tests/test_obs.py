"""The `obs` family's GPU backends against kernels/obs/reference.py and fp64 brute force.

Triton launchers (kernels/obs/triton.py) run everywhere: on a GPU natively, otherwise under
TRITON_INTERPRET=1 on tiny shapes (odd widths: s = 1, 3, 37; d not a multiple of the tiles;
B = 1; s > 128, the torch fallback). The CUDA kernels (csrc/obs/cuda/obs.cu) run only where
a GPU and a CUDA build of slimops._C exist, on the real shapes (GQA groups of 1/2/4/8 heads of
64, d = 11008). The CPU C++ kernels are covered by tests/test_ops.py.
"""

import pytest
import torch

from helpers import (
    DEVICE,
    OBS_BAD_INPUTS,
    OPCHECK_UTILS,
    assert_rel_close,
    check_obs_ieee,
    errors_fp64,
    needs_cuda_op,
    spd,
    triton_kernels,
)
from slimops import ops  # noqa: F401  (registers the ops, with or without the extension)
from slimops.kernels.obs import reference as obs_ref

obs_triton, needs_triton = triton_kernels("obs")  # interpreted on CPU (conftest)


def problem(r, d, gen):
    """(H fp64, W fp32, Hinv fp32 exactly symmetric) on DEVICE."""
    H = spd(d, gen)
    Hinv = torch.linalg.inv(H).float()
    Hinv = (Hinv + Hinv.T) / 2  # the solver's Hinv comes from cholesky_inverse: symmetric
    return H.to(DEVICE), torch.randn(r, d, generator=gen).to(DEVICE), Hinv.to(DEVICE)


def kept(d, removed):
    keep = torch.ones(d, dtype=torch.bool, device=removed.device)
    keep[removed] = False
    return keep.nonzero().squeeze(1)


# --- Triton: batched Cholesky and scoring ---------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "d,s,B", [(5, 1, 5), (9, 3, 3), (80, 37, 2), (64, 64, 1), (130, 128, 1), (150, 150, 1)]
)
def test_triton_block_cholesky_inverse(d, s, B):
    gen = torch.Generator().manual_seed(d + s)
    _, _, Hinv = problem(1, d, gen)
    groups = torch.stack([torch.randperm(d, generator=gen)[:s] for _ in range(B)]).to(DEVICE)
    linv, info = obs_triton.block_cholesky_inverse(Hinv, groups)
    blocks = Hinv.double()[groups.unsqueeze(2), groups.unsqueeze(1)]
    assert info.dtype == torch.int32 and (info == 0).all()
    assert_rel_close(linv, torch.linalg.inv(torch.linalg.cholesky(blocks)), 1e-5)


@needs_triton
@pytest.mark.parametrize(
    "r,d,s", [(5, 48, 8), (3, 37, 1), (1, 3, 3), (7, 111, 37), (2, 64, 64), (3, 150, 150)]
)
def test_triton_errors_match_brute_force(r, d, s):
    gen = torch.Generator().manual_seed(r * 100 + d)
    _, W, Hinv = problem(r, d, gen)
    groups = torch.randperm(d, generator=gen)[: (d // s) * s].view(-1, s).to(DEVICE)
    err = obs_triton.obs_group_errors(W, Hinv, groups)
    assert err.shape == (groups.shape[0],) and err.dtype == torch.float32
    assert_rel_close(err, errors_fp64(W, Hinv, groups), 1e-4)
    L, _ = obs_ref.block_cholesky(Hinv[groups.unsqueeze(-1), groups.unsqueeze(-2)])
    assert_rel_close(err, obs_ref.group_errors(W[:, groups].permute(1, 0, 2), L), 1e-5)


@needs_triton
def test_triton_errors_strided_inputs_and_edges():
    gen = torch.Generator().manual_seed(1)
    _, W, Hinv = problem(70, 40, gen)
    groups = torch.arange(40, device=DEVICE).view(4, 10)
    Wt = W.t().contiguous().t()  # same values, column-major strides
    err = obs_triton.obs_group_errors(Wt, Hinv.t(), groups)
    assert_rel_close(err, errors_fp64(W, Hinv, groups), 1e-4)
    assert obs_triton.obs_group_errors(W, Hinv, groups[:0]).shape == (0,)
    assert (obs_triton.obs_group_errors(W[:0], Hinv, groups) == 0).all()  # r = 0


@needs_triton
@pytest.mark.parametrize("s", [4, 130])  # in registers; torch fallback above 128
def test_triton_errors_inf_for_non_pd_block(s):
    gen = torch.Generator().manual_seed(3)
    _, W, Hinv = problem(3, 3 * s, gen)
    Hinv[s : 2 * s, s : 2 * s] = -torch.eye(
        s, device=DEVICE
    )  # group 1's block is negative definite
    err = obs_triton.obs_group_errors(W, Hinv, torch.arange(3 * s, device=DEVICE).view(3, s))
    assert torch.isinf(err[1]) and err[1] > 0
    assert torch.isfinite(err[[0, 2]]).all()


# --- Triton: the update ---------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("r,d,s", [(6, 40, 8), (4, 37, 5), (3, 9, 1), (5, 150, 37), (2, 70, 64)])
def test_triton_update_matches_reference_and_schur(r, d, s):
    gen = torch.Generator().manual_seed(r * 100 + d)
    H, W, Hinv = problem(r, d, gen)
    idx = torch.randperm(d, generator=gen)[:s].to(DEVICE)
    W64, Hinv64 = W.double(), Hinv.double()
    obs_ref.group_update(W64, Hinv64, idx)
    info = obs_triton.obs_group_update(W, Hinv, idx)
    assert info.shape == () and info.dtype == torch.int32 and int(info) == 0
    assert_rel_close(W, W64, 1e-4)
    assert_rel_close(Hinv, Hinv64, 1e-4)
    assert (W[:, idx] == 0).all() and (Hinv[idx] == 0).all() and (Hinv[:, idx] == 0).all()
    assert torch.equal(Hinv, Hinv.T)  # exactly: the downdate mirrors its lower triangle
    R = kept(d, idx)
    assert_rel_close(Hinv[R][:, R], torch.linalg.inv(H[R][:, R]), 1e-4)  # Schur complement


@needs_triton
def test_triton_chained_updates_stay_symmetric_and_schur():
    gen = torch.Generator().manual_seed(7)
    d, s = 100, 7
    H, W, Hinv = problem(5, d, gen)
    W64, Hinv64 = W.double(), Hinv.double()
    order = torch.randperm(d, generator=gen).to(DEVICE)
    for step in range(5):
        idx = order[step * s : (step + 1) * s]
        assert int(obs_triton.obs_group_update(W, Hinv, idx)) == 0
        obs_ref.group_update(W64, Hinv64, idx)
        assert torch.equal(Hinv, Hinv.T)
        R = kept(d, order[: (step + 1) * s])
        assert_rel_close(Hinv[R][:, R], torch.linalg.inv(H[R][:, R]), 1e-4)
    assert_rel_close(W, W64, 1e-4)


@needs_triton
@pytest.mark.parametrize("s", [3, 130])
def test_triton_update_non_pd_leaves_inputs_unchanged(s):
    gen = torch.Generator().manual_seed(4)
    _, W, Hinv = problem(4, s + 10, gen)
    Hinv[2 : 2 + s, 2 : 2 + s] = 0.0  # singular block: not positive definite
    W0, Hinv0 = W.clone(), Hinv.clone()
    info = obs_triton.obs_group_update(W, Hinv, torch.arange(2, 2 + s, device=DEVICE))
    assert info.shape == () and int(info) > 0
    assert torch.equal(W, W0) and torch.equal(Hinv, Hinv0)


@needs_triton
def test_triton_update_edges():
    gen = torch.Generator().manual_seed(6)
    H, W, Hinv = problem(3, 20, gen)
    W0, Hinv0 = W.clone(), Hinv.clone()
    assert (
        int(obs_triton.obs_group_update(W, Hinv, torch.zeros(0, dtype=torch.long, device=DEVICE)))
        == 0
    )
    assert torch.equal(W, W0) and torch.equal(Hinv, Hinv0)
    idx = torch.tensor([3, 11], device=DEVICE)
    assert int(obs_triton.obs_group_update(W[:0], Hinv, idx)) == 0  # r = 0: Hinv only
    assert_rel_close(
        Hinv[kept(20, idx)][:, kept(20, idx)],
        torch.linalg.inv(H[kept(20, idx)][:, kept(20, idx)]),
        1e-4,
    )


@needs_triton
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_triton_ieee_whatever_the_matmul_precision(precision):
    check_obs_ieee(obs_triton.obs_group_errors, obs_triton.obs_group_update, precision, DEVICE)


@needs_triton
def test_triton_unchecked_indices_same_result():
    gen = torch.Generator().manual_seed(9)
    _, W, Hinv = problem(5, 40, gen)
    groups = torch.arange(40, device=DEVICE).view(5, 8)
    assert torch.equal(
        obs_triton.obs_group_errors(W, Hinv, groups, check_indices=False),
        obs_triton.obs_group_errors(W, Hinv, groups),
    )
    W2, Hinv2 = W.clone(), Hinv.clone()
    assert int(obs_triton.obs_group_update(W, Hinv, groups[1], check_indices=False)) == 0
    assert int(obs_triton.obs_group_update(W2, Hinv2, groups[1])) == 0
    assert torch.equal(W, W2) and torch.equal(Hinv, Hinv2)


@needs_triton
@pytest.mark.parametrize("fn,args,match", OBS_BAD_INPUTS)
def test_triton_bad_input(fn, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(obs_triton, fn)(*args(DEVICE))


# --- CUDA (csrc/obs/cuda/obs.cu), and Triton, on the real shapes ------------------------------


def _gpu_backends():
    fns = [("cuda", torch.ops.slimops.obs_group_errors, torch.ops.slimops.obs_group_update)]
    if obs_triton is not None:
        fns.append(("triton", obs_triton.obs_group_errors, obs_triton.obs_group_update))
    return fns


@needs_cuda_op("obs_group_errors")
@pytest.mark.parametrize("heads_per_group", [1, 2, 4, 8])  # GQA: s = 64 .. 512 (> 128: fallback)
def test_cuda_errors_gqa_groups(heads_per_group):
    gen = torch.Generator().manual_seed(heads_per_group)
    d, r = 32 * 64, 256
    Hinv = torch.linalg.inv(spd(d, gen, device="cuda")).float()
    W = torch.randn(r, d, generator=gen).cuda()
    groups = torch.arange(d, device="cuda").view(-1, heads_per_group * 64)
    expected = errors_fp64(W, Hinv, groups)
    for name, errors, _ in _gpu_backends():
        assert_rel_close(errors(W, Hinv, groups), expected, 1e-4, name)


@needs_cuda_op("obs_group_errors")
def test_cuda_update_d11008():
    gen = torch.Generator().manual_seed(11)
    d, s, r = 11008, 64, 256
    A = torch.randn(d, d, generator=gen).cuda().double() / d**0.5
    H = A @ A.T + torch.eye(d, device="cuda", dtype=torch.float64)
    Hinv0 = torch.linalg.inv(H).float()
    Hinv0 = (Hinv0 + Hinv0.T) / 2
    W0 = torch.randn(r, d, generator=gen).cuda()
    idx = torch.randperm(d, generator=gen)[:s].cuda()
    W64, Hinv64 = W0.double(), Hinv0.double()
    obs_ref.group_update(W64, Hinv64, idx)
    for name, _, update in _gpu_backends():
        W, Hinv = W0.clone(), Hinv0.clone()
        assert int(update(W, Hinv, idx)) == 0, name
        assert_rel_close(W, W64, 1e-4, name)
        assert_rel_close(Hinv, Hinv64, 1e-4, name)
        assert torch.equal(Hinv, Hinv.T), name
        assert (W[:, idx] == 0).all() and (Hinv[idx] == 0).all() and (Hinv[:, idx] == 0).all()


@needs_cuda_op("obs_group_errors")
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_cuda_ieee_whatever_the_matmul_precision(precision):
    check_obs_ieee(
        torch.ops.slimops.obs_group_errors, torch.ops.slimops.obs_group_update, precision, "cuda"
    )


@needs_cuda_op("obs_group_errors")
@pytest.mark.parametrize("fn,args,match", OBS_BAD_INPUTS)
def test_cuda_op_bad_input(fn, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.slimops, fn)(*args("cuda"))


@needs_cuda_op("obs_group_errors")
def test_cuda_non_pd_and_opcheck():
    gen = torch.Generator().manual_seed(5)
    Hinv = torch.linalg.inv(spd(10, gen)).float().cuda()
    W = torch.randn(3, 10, generator=gen).cuda()
    groups = torch.arange(10, device="cuda").view(5, 2)
    bad = Hinv.clone()
    bad[2:5, 2:5] = 0.0
    W0 = W.clone()
    assert (
        int(
            torch.ops.slimops.obs_group_update(
                W, bad.clone(), torch.tensor([2, 3, 4], device="cuda")
            )
        )
        > 0
    )
    assert torch.equal(W, W0)
    assert torch.isinf(torch.ops.slimops.obs_group_errors(W, bad, groups)[1])
    torch.library.opcheck(
        torch.ops.slimops.obs_group_errors.default, (W, Hinv, groups), test_utils=OPCHECK_UTILS
    )
    torch.library.opcheck(
        torch.ops.slimops.obs_group_update.default,
        (W.clone(), Hinv.clone(), torch.tensor([1, 5], device="cuda")),
        test_utils=OPCHECK_UTILS,
    )
