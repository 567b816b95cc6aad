"""slimops operators (slimops.ops) against their references, checked in float64 maths.

Runs against whatever backend is installed: the C++ extension, or (SLIMOPS_NO_EXT=1) the
Python registration of kernels/*/reference.py. Shapes are chosen to hit the kernels' edges:
d=1, widths that are not multiples of the 256-column tile (300, 513), T=4099 (one row past
a 4096-row chunk), groups with no rows.
"""

import re

import pytest
import torch

from helpers import (
    HESSIAN_BAD_INPUTS,
    OBS_BAD_INPUTS,
    OPCHECK_UTILS,
    ROOT,
    assert_rel_close,
    check_obs_ieee,
    errors_fp64,
    hessian_fp64,
    make_hessian_case,
    needs_cpp_ext,
    raised,
    spd,
)
from slimops import ops
from slimops.kernels.hessian import checks as hessian_checks
from slimops.kernels.hessian import reference as hessian_ref
from slimops.kernels.obs import checks as obs_checks
from slimops.kernels.obs import reference as obs_ref

# --- hessian_accumulate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,d,G,empty_group",
    [
        (1, 1, 1, None),
        (50, 37, 1, None),
        (4099, 37, 1, None),
        (600, 300, 1, None),
        (700, 513, 3, 1),
        (257, 64, 4, 0),
        (9000, 37, 2, None),  # last: groups span 2 chunks
    ],
)
def test_hessian_matches_fp64(T, d, G, empty_group):
    H, X, ids = make_hessian_case(T, d, G, empty_group)
    expected = hessian_fp64(H, X, ids, 0.5)
    ops.hessian_accumulate(H, X, ids, scale=0.5)
    assert_rel_close(H, expected, 1e-5)
    if empty_group is not None:  # untouched group keeps its start value exactly
        assert torch.equal(H[empty_group].double(), expected[empty_group])


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_hessian_low_precision_input(dtype, tol):
    # The reference upcasts X exactly, so the only error is the fp32 accumulation.
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(4099, 300, generator=gen).to(dtype)
    ids = torch.randint(0, 3, (4099,), generator=gen)
    H = torch.zeros(3, 300, 300)
    ops.hessian_accumulate(H, X, ids)
    assert_rel_close(H, hessian_fp64(torch.zeros(3, 300, 300), X, ids, 1.0), tol)


def test_hessian_matches_reference_and_flattens():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(2, 40, 37, generator=gen)  # (batch, seq, d): the wrapper flattens
    ids = torch.randint(0, 2, (2, 40), generator=gen)
    H, H_ref = torch.zeros(2, 37, 37), torch.zeros(2, 37, 37)
    ops.hessian_accumulate(H, X, ids)
    hessian_ref.hessian_accumulate(H_ref, X.reshape(-1, 37), ids.reshape(-1))
    assert_rel_close(H, H_ref, 1e-5)
    # one group given as ids of zeros == no ids; a non-contiguous X view is fine
    H1, H2 = torch.zeros(1, 37, 37), torch.zeros(1, 37, 37)
    Xt = torch.randn(37, 90, generator=gen).T
    ops.hessian_accumulate(H1, Xt, torch.zeros(90, dtype=torch.long))
    ops.hessian_accumulate(H2, Xt.contiguous())
    assert_rel_close(H1, H2, 1e-6)


@needs_cpp_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hessian_update_is_exactly_symmetric(dtype):
    # d=600: several row panels and a partial last one; only lower parts are computed, then
    # mirrored, so a symmetric H stays symmetric bit for bit, group by group, call by call.
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(300, 600, generator=gen).to(dtype)
    ids = torch.randint(0, 2, (300,), generator=gen)
    H = torch.zeros(2, 600, 600)
    ops.hessian_accumulate(H, X, ids, scale=0.3)
    ops.hessian_accumulate(H, X[:100].T.contiguous().T, ids[:100])  # column-major X too
    assert torch.equal(H, H.mT)
    assert_rel_close(
        H,
        hessian_fp64(hessian_fp64(torch.zeros(2, 600, 600), X, ids, 0.3), X[:100], ids[:100], 1.0),
        1e-5,
    )


@pytest.mark.parametrize("make,match", HESSIAN_BAD_INPUTS)
def test_hessian_bad_input(make, match):
    H, X, ids = make("cpu")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.slimops.hessian_accumulate(H, X, ids, 1.0)


# --- obs_group_errors --------------------------------------------------------------------


@pytest.mark.parametrize("r,d,s", [(5, 48, 8), (3, 37, 1), (1, 1, 1), (7, 64, 16)])
def test_obs_errors_match_brute_force(r, d, s):
    gen = torch.Generator().manual_seed(r * 100 + d)
    Hinv = torch.linalg.inv(spd(d, gen)).float()
    W = torch.randn(r, d, generator=gen)
    groups = torch.randperm(d, generator=gen)[: (d // s) * s].view(-1, s)
    err = ops.obs_group_errors(W, Hinv, groups)
    assert err.shape == (groups.shape[0],) and err.dtype == torch.float32
    assert_rel_close(err, errors_fp64(W, Hinv, groups), 1e-4)
    # the reference's pieces agree as well
    L, info = obs_ref.block_cholesky(Hinv[groups.unsqueeze(-1), groups.unsqueeze(-2)])
    assert_rel_close(err, obs_ref.group_errors(W[:, groups].permute(1, 0, 2), L), 1e-5)


def test_obs_errors_inf_for_non_pd_block():
    gen = torch.Generator().manual_seed(3)
    Hinv = torch.linalg.inv(spd(12, gen)).float()
    Hinv[4:8, 4:8] = -torch.eye(4)  # group 1's block is negative definite
    W = torch.randn(3, 12, generator=gen)
    groups = torch.arange(12).view(3, 4)
    err = ops.obs_group_errors(W, Hinv, groups)
    assert torch.isinf(err[1]) and err[1] > 0
    assert torch.isfinite(err[[0, 2]]).all()
    assert ops.obs_group_errors(W, Hinv, groups[:0]).shape == (0,)


# --- obs_group_update --------------------------------------------------------------------


@pytest.mark.parametrize("r,d,s", [(6, 40, 8), (4, 37, 5), (3, 9, 1)])
def test_obs_update_matches_reference_and_schur(r, d, s):
    gen = torch.Generator().manual_seed(r * 100 + d)
    H = spd(d, gen)
    W = torch.randn(r, d, generator=gen)
    Hinv = torch.linalg.inv(H).float()
    idx = torch.randperm(d, generator=gen)[:s]
    W64, Hinv64 = W.double(), Hinv.double()
    obs_ref.group_update(W64, Hinv64, idx)  # reference, in float64

    assert ops.obs_group_update(W, Hinv, idx) == 0
    assert_rel_close(W, W64, 1e-4)
    assert_rel_close(Hinv, Hinv64, 1e-4)
    assert (W[:, idx] == 0).all() and (Hinv[idx] == 0).all() and (Hinv[:, idx] == 0).all()
    # Schur complement: the downdated Hinv on the kept columns is inv(H[R, R]).
    keep = torch.ones(d, dtype=torch.bool)
    keep[idx] = False
    R = keep.nonzero().squeeze(1)
    assert_rel_close(Hinv[R][:, R], torch.linalg.inv(H[R][:, R]), 1e-4)

    # A second removal composes: Hinv on the rest is inv(H) of the rest.
    if d - s > s:
        idx2 = R[:s]
        assert ops.obs_group_update(W, Hinv, idx2) == 0
        keep[idx2] = False
        R2 = keep.nonzero().squeeze(1)
        assert_rel_close(Hinv[R2][:, R2], torch.linalg.inv(H[R2][:, R2]), 1e-4)


def test_obs_update_non_pd_leaves_inputs_unchanged():
    gen = torch.Generator().manual_seed(4)
    Hinv = torch.linalg.inv(spd(10, gen)).float()
    Hinv[2:5, 2:5] = 0.0  # singular block: not positive definite
    W = torch.randn(4, 10, generator=gen)
    W0, Hinv0 = W.clone(), Hinv.clone()
    info = ops.obs_group_update(W, Hinv, torch.tensor([2, 3, 4]))
    assert isinstance(info, int) and info > 0
    assert torch.equal(W, W0) and torch.equal(Hinv, Hinv0)


@pytest.mark.parametrize("op,args,match", OBS_BAD_INPUTS)
def test_obs_bad_input(op, args, match):
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.slimops, op)(*args("cpu"))


@needs_cpp_ext
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_obs_ieee_whatever_the_matmul_precision(precision):
    check_obs_ieee(
        torch.ops.slimops.obs_group_errors, torch.ops.slimops.obs_group_update, precision, "cpu"
    )


# --- one contract: the Python checks are the C++ checks ---------------------------------------


@pytest.mark.parametrize("make,match", HESSIAN_BAD_INPUTS)
def test_hessian_python_checks_raise_the_cpp_messages(make, match):
    H, X, ids = make("cpu")
    assert raised(hessian_checks.check_inputs, H, X, ids) == raised(
        torch.ops.slimops.hessian_accumulate, H, X, ids, 1.0
    )


@pytest.mark.parametrize("op,args,match", OBS_BAD_INPUTS)
def test_obs_python_checks_raise_the_cpp_messages(op, args, match):
    check = {
        "obs_group_errors": obs_checks.check_errors_inputs,
        "obs_group_update": obs_checks.check_update_inputs,
    }[op]
    tensors = args("cpu")
    assert raised(check, *tensors) == raised(getattr(torch.ops.slimops, op), *tensors)


# --- registration ------------------------------------------------------------------------


def cpp_schemas() -> dict[str, str]:
    """name -> schema of every m.def in csrc/ops.cpp's TORCH_LIBRARY block (adjacent string
    literals joined, as the C++ compiler does)."""
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    block = text[text.index("TORCH_LIBRARY(slimops, m)") :]
    block = block[: block.index("\n}")]
    defs = [
        "".join(re.findall(r'"([^"]*)"', d))
        for d in re.findall(r'm\.def\(((?:\s*"[^"]*")+)', block)
    ]
    return {d[: d.index("(")]: d[d.index("(") :] for d in defs}


def test_schemas_match_csrc_ops_cpp():
    cpp = cpp_schemas()
    assert "_build_info" in cpp and "slice_gemm" in cpp  # the parser sees every def
    assert {name: schema for name, schema in cpp.items() if not name.startswith("_")} == ops.SCHEMAS


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(20, 6, generator=gen)
    ids = torch.randint(0, 2, (20,), generator=gen)
    torch.library.opcheck(
        torch.ops.slimops.hessian_accumulate.default,
        (torch.zeros(1, 6, 6), X, None, 1.0),
        test_utils=OPCHECK_UTILS,
    )
    torch.library.opcheck(
        torch.ops.slimops.hessian_accumulate.default,
        (torch.zeros(2, 6, 6), X.half(), ids, 0.5),
        test_utils=OPCHECK_UTILS,
    )
    Hinv = torch.linalg.inv(spd(8, gen)).float()
    W = torch.randn(3, 8, generator=gen)
    torch.library.opcheck(
        torch.ops.slimops.obs_group_errors.default,
        (W, Hinv, torch.arange(8).view(4, 2)),
        test_utils=OPCHECK_UTILS,
    )
    torch.library.opcheck(
        torch.ops.slimops.obs_group_update.default,
        (W.clone(), Hinv.clone(), torch.tensor([1, 5])),
        test_utils=OPCHECK_UTILS,
    )


def test_backends_report():
    report = ops.backends()
    assert set(report) == {"cpu", "triton", "cuda"}
    assert report["cpu"].startswith(("C++ extension", "python reference"))
    if torch.version.cuda is None:
        assert report["cuda"] == "not available: torch has no CUDA"
