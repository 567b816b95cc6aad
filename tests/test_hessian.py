"""`hessian` family backends against float64 maths: the Triton SYRK (under TRITON_INTERPRET=1
on CPU, compiled on GPU) and the CUDA kernel behind torch.ops.slimops.hessian_accumulate.

Shapes hit the kernels' edges: d=1, d=37 (not a multiple of any tile), T=1, T not a multiple
of the row block, groups with no rows, a d=11008 column slice of a wider X (GPU only).
"""

import pytest
import torch

from helpers import (
    DEVICE,
    HESSIAN_BAD_INPUTS,
    OPCHECK_UTILS,
    assert_rel_close,
    hessian_fp64,
    make_hessian_case,
    needs_cuda,
    needs_cuda_op,
    triton_kernels,
)
from slimops import ops  # noqa: F401  (registers the ops: C++ kernels or the reference)

hessian_triton, needs_triton = triton_kernels("hessian")  # interpreted on CPU (conftest)


def make_case(T, d, G, empty_group=None, dtype=torch.float32, device=DEVICE, seed=0):
    return make_hessian_case(T, d, G, empty_group, dtype, device, seed)


# bf16/fp16 products are exact in fp32, so on CPU every case is held to the fp32 accumulation
# error. GPU tensor cores align the addends of each k=16 step by truncation (Fasi et al. 2021,
# "Numerical behavior of NVIDIA tensor cores"): a biased ~2^-23 per step, (T/16) steps.
LOW_PRECISION_GPU_TOL = 1e-4
CASES = [  # T, d, G, empty_group, dtype
    (1, 1, 1, None, torch.float32),
    (50, 37, 1, None, torch.float32),
    (1, 37, 3, 2, torch.float32),
    (77, 64, 3, 1, torch.float32),
    (129, 33, 3, 0, torch.bfloat16),
    (70, 37, 1, None, torch.float16),
]


def run_and_check(accumulate, T, d, G, empty_group, dtype):
    H, X, ids = make_case(T, d, G, empty_group, dtype)
    tol = LOW_PRECISION_GPU_TOL if X.is_cuda and dtype != torch.float32 else 1e-5
    expected = hessian_fp64(H, X, ids, 0.5)
    accumulate(H, X, ids, 0.5)
    assert_rel_close(H, expected, tol)
    if empty_group is not None:  # an empty group keeps its start value bit for bit
        assert torch.equal(H[empty_group].double(), expected[empty_group])


# --- Triton (interpreter on CPU) ---------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("T,d,G,empty_group,dtype", CASES)
def test_triton_matches_fp64(T, d, G, empty_group, dtype):
    run_and_check(hessian_triton.hessian_accumulate, T, d, G, empty_group, dtype)


@needs_triton
def test_triton_streams_and_is_symmetric():
    H, X, ids = make_case(150, 40, 2, dtype=torch.bfloat16)
    H.zero_()
    hessian_triton.hessian_accumulate(H, X[:90], ids[:90])  # twice == once on the concatenation
    hessian_triton.hessian_accumulate(H, X[90:], ids[90:])
    H_once = torch.zeros_like(H)
    hessian_triton.hessian_accumulate(H_once, X, ids)
    assert_rel_close(H, H_once, 1e-6)
    # lower == upper exactly: only the lower half of each tile is computed, then mirrored
    assert torch.equal(H, H.mT) and torch.equal(H_once, H_once.mT)


@needs_triton
def test_triton_strided_x_and_ids_of_zeros():
    gen = torch.Generator().manual_seed(3)
    Xt = torch.randn(37, 60, generator=gen).to(DEVICE).T  # (60, 37) view, stride (1, 60)
    H1, H2 = torch.zeros(1, 37, 37, device=DEVICE), torch.zeros(1, 37, 37, device=DEVICE)
    hessian_triton.hessian_accumulate(H1, Xt, torch.zeros(60, dtype=torch.long, device=DEVICE))
    hessian_triton.hessian_accumulate(H2, Xt.contiguous())
    assert_rel_close(H1, hessian_fp64(torch.zeros_like(H1), Xt, None, 1.0), 1e-5)
    assert_rel_close(H1, H2, 1e-6)


@needs_triton
@pytest.mark.parametrize("G", [1, 3])
def test_triton_autotunes_on_a_scratch_h(monkeypatch, G):
    """Autotune trials add into whatever H they are given: they run on a (1, d, d) scratch, and
    the caller's H is written once, by the chosen config (no copy of H per trial)."""
    monkeypatch.setattr(hessian_triton, "_autotunes", lambda: True)  # one config here: force it
    monkeypatch.setattr(hessian_triton, "_TUNED", set())
    shapes, launch = [], hessian_triton._launch
    monkeypatch.setattr(
        hessian_triton, "_launch", lambda H, *a: (shapes.append(tuple(H.shape)), launch(H, *a))
    )
    run_and_check(hessian_triton.hessian_accumulate, 70, 37, G, None, torch.float32)
    run_and_check(
        hessian_triton.hessian_accumulate, 70, 37, G, None, torch.float32
    )  # tuned: H only
    assert shapes == [(1, 37, 37), (G, 37, 37), (G, 37, 37)]


@needs_triton
@pytest.mark.parametrize("make,match", HESSIAN_BAD_INPUTS)
def test_triton_bad_input(make, match):
    H, X, ids = make(DEVICE)
    with pytest.raises(RuntimeError, match=match):
        hessian_triton.hessian_accumulate(H, X, ids)


@needs_triton
@needs_cuda
def test_triton_cuda_large_and_no_fp32_copy():
    run_and_check(hessian_triton.hessian_accumulate, 5000, 300, 3, 1, torch.bfloat16)
    H, X, _ = make_case(8192, 256, 1, dtype=torch.bfloat16)
    hessian_triton.hessian_accumulate(H, X)  # autotunes once for this key (on a scratch H)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hessian_triton.hessian_accumulate(H, X)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < X.numel() * 4 // 4  # no fp32 copy of X


@needs_triton
@needs_cuda
def test_triton_cuda_autotune_trials_leave_h_alone():
    # First call for d=520 (no other test uses it): every config is timed several times,
    # each trial adding into its H. Only the chosen config's one launch may reach the caller's.
    H, X, ids = make_case(4096, 520, 64, dtype=torch.bfloat16)
    expected = hessian_fp64(H, X, ids, 1.0)
    hessian_triton.hessian_accumulate(H, X, ids)
    assert_rel_close(H, expected, LOW_PRECISION_GPU_TOL)


# --- CUDA kernel (torch.ops.slimops on cuda tensors) -------------------------------------------


def cuda_op(H, X, ids, scale):
    torch.ops.slimops.hessian_accumulate(H, X, ids, scale)


@needs_cuda_op("hessian_accumulate")
@pytest.mark.parametrize(
    "T,d,G,empty_group,dtype",
    CASES
    + [
        (4099, 300, 3, 1, torch.float32),
        (4099, 300, 3, 1, torch.bfloat16),
        (257, 65, 4, 0, torch.float16),
    ],
)
def test_cuda_op_matches_fp64(T, d, G, empty_group, dtype):
    run_and_check(cuda_op, T, d, G, empty_group, dtype)


@needs_cuda_op("hessian_accumulate")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_op_d11008_slice(dtype):
    # LLaMA-7B FFN width, as a column slice of a wider X (row stride 11013, not 11008).
    gen = torch.Generator(device="cuda").manual_seed(4)
    X = torch.randn(333, 11013, generator=gen, device="cuda").to(dtype)[:, 5:]
    H = torch.zeros(1, 11008, 11008, device="cuda")
    cuda_op(H, X, None, 1.0)
    expected = X.double().T @ X.double()
    assert_rel_close(H[0], expected, LOW_PRECISION_GPU_TOL if dtype != torch.float32 else 1e-5)
    assert torch.equal(H, H.mT)
    if hessian_triton is not None:
        H.zero_()
        hessian_triton.hessian_accumulate(H, X)
        assert_rel_close(H[0], expected, LOW_PRECISION_GPU_TOL if dtype != torch.float32 else 1e-5)


@needs_cuda_op("hessian_accumulate")
@pytest.mark.parametrize("make,match", HESSIAN_BAD_INPUTS)
def test_cuda_op_bad_input(make, match):
    H, X, ids = make("cuda")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.slimops.hessian_accumulate(H, X, ids, 1.0)


@needs_cuda_op("hessian_accumulate")
def test_cuda_opcheck():
    H, X, ids = make_case(100, 37, 3, 1, torch.bfloat16)
    torch.library.opcheck(
        torch.ops.slimops.hessian_accumulate, (H, X, ids, 0.5), test_utils=OPCHECK_UTILS
    )
    H, X, _ = make_case(64, 40, 1)
    torch.library.opcheck(
        torch.ops.slimops.hessian_accumulate, (H, X, None, 1.0), test_utils=OPCHECK_UTILS
    )
