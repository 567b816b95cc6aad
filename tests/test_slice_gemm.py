"""`slice_gemm` family backends against kernels/slice_gemm/reference.py: the C++ CPU op
(torch.ops.slimops.slice_gemm), the Triton kernel (under TRITON_INTERPRET=1 on CPU, compiled
on GPU) and the CUDA op.

Cases hit each K path of the kernels: no in_idx (contiguous), heads (in_block 16: one head,
some heads out of order, all heads; in_block 48: three K tiles per head), channels (in_block
1, odd counts), in_block 24 (no power-of-two tile of 16 fits: gathered per column); out_idx
None / an odd unsorted subset; bias None / present; T = 1, 3, 37 (decode and a partial tile).
"""

import pytest
import torch

from helpers import (
    DEVICE,
    OPCHECK_UTILS,
    assert_rel_close,
    needs_cuda,
    needs_cuda_op,
    raised,
    triton_kernels,
)
from slimops import ops  # noqa: F401  (registers the op: C++ kernel or the reference)
from slimops.kernels.slice_gemm import checks as slice_checks
from slimops.kernels.slice_gemm import reference as ref

sg_triton, needs_triton = triton_kernels("slice_gemm")  # interpreted on CPU (conftest)

D_IN, D_OUT = 96, 45

# name -> (in_block, kept blocks as a function of the generator); None: all columns.
IN_MODES = {
    "all": (1, None),
    "one_head": (16, lambda g: torch.tensor([4])),
    "some_heads": (16, lambda g: torch.tensor([5, 0, 3])),
    "all_heads": (16, lambda g: torch.randperm(D_IN // 16, generator=g)),
    "head48": (48, lambda g: torch.tensor([1])),
    "channels": (1, lambda g: torch.randperm(D_IN, generator=g)[:59]),
    "block24": (24, lambda g: torch.tensor([3, 1])),
}


def make_case(T, in_mode, out_subset, with_bias, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, D_IN, generator=g)
    W = torch.randn(D_OUT, D_IN, generator=g)
    bias = torch.randn(D_OUT, generator=g) if with_bias else None
    in_block, pick = IN_MODES[in_mode]
    in_idx = None if pick is None else pick(g)
    out_idx = torch.randperm(D_OUT, generator=g)[:29] if out_subset else None

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    def move(t):
        return None if t is None else t.to(device)

    return cast(X), cast(W), cast(bias), move(in_idx), move(out_idx), in_block


# Where each backend's cases live: Triton runs on the GPU when there is one (compiled Triton
# cannot read CPU tensors), else on the CPU under the interpreter.
DEVICE_OF = {"cpu": "cpu", "triton": DEVICE, "cuda": "cuda"}


def run(backend, *args):
    if backend == "triton":
        return sg_triton.slice_gemm(*args)
    return torch.ops.slimops.slice_gemm(*args)


def assert_same_close(actual, expected, tol):
    """Same dtype as the reference (the op rounds to X's dtype once), then close."""
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert_rel_close(actual, expected, tol)


BACKENDS = ["cpu", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("in_mode", sorted(IN_MODES))
@pytest.mark.parametrize("out_subset", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_fp32(backend, T, in_mode, out_subset, with_bias):
    args = make_case(T, in_mode, out_subset, with_bias, device=DEVICE_OF[backend])
    assert_same_close(run(backend, *args), ref.slice_gemm(*args), 1e-5)


# bf16: both sides accumulate in fp32 and round once; a different summation order may flip
# that rounding by one bf16 ulp (2^-8 relative).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("in_mode", ["all", "some_heads", "channels", "block24"])
def test_matches_reference_bf16(backend, T, in_mode):
    args = make_case(T, in_mode, True, True, dtype=torch.bfloat16, device=DEVICE_OF[backend])
    assert_same_close(run(backend, *args), ref.slice_gemm(*args), 8e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_slices(backend):
    X, W, bias, _, out_idx, _ = make_case(3, "all", True, True, device=DEVICE_OF[backend])
    none_kept = torch.empty(0, dtype=torch.int64, device=X.device)
    Y = run(backend, X, W, bias, none_kept, out_idx, 16)  # no input kept: Y = bias[J]
    assert torch.equal(Y, bias[out_idx].expand(3, -1))
    assert run(backend, X, W, bias, None, none_kept, 1).shape == (3, 0)
    assert run(backend, X[:0], W, bias, None, out_idx, 1).shape == (0, 29)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "in_idx",
    [[0, 1, 2, 3, 4, 9, 10, 11, 12, 13], [13, 12, 11, 10, 9, 4, 3, 2, 1, 0], [3, 4, 5, 6, 7, 8]],
)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)])
def test_wide_runs(backend, in_idx, T, dtype, tol):
    """Runs of consecutive kept heads >= 128 columns wide: the CPU kernel's per-run GEMM path,
    out of order too (the sum does not depend on the order of kept columns)."""
    g, dev = torch.Generator().manual_seed(1), DEVICE_OF[backend]
    X, W, bias = (
        torch.randn(T, 512, generator=g),
        torch.randn(33, 512, generator=g),
        torch.randn(33, generator=g),
    )
    args = (
        X.to(dev, dtype),
        W.to(dev, dtype),
        bias.to(dev, dtype),
        torch.tensor(in_idx, device=dev),
        torch.tensor([32, 0, 7, 8], device=dev),
        32,
    )
    assert_same_close(run(backend, *args), ref.slice_gemm(*args), tol)


def test_ops_wrapper_dispatches_on_cpu():
    args = make_case(5, "some_heads", True, True)
    assert_same_close(ops.slice_gemm(*args), ref.slice_gemm(*args), 1e-5)


def strided_case(device):
    """Every argument a strided view made ON `device` (.to() of a view copies it contiguous):
    X a column slice, W column-major, bias and both index lists every other element."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(37, D_IN + 5, generator=g).to(device)[:, 5:]
    W = torch.randn(D_IN, D_OUT, generator=g).to(device).T
    bias = torch.randn(2 * D_OUT, generator=g).to(device)[::2]
    in_idx = torch.tensor([5, 9, 0, 3, 2, 7, 1, 4], device=device)[::2]  # heads 5, 0, 2, 1
    out_idx = torch.randperm(D_OUT, generator=g).to(device)[:58:2]
    return X, W, bias, in_idx, out_idx, 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    args = strided_case(DEVICE_OF[backend])
    assert not args[2].is_contiguous() and not args[4].is_contiguous()
    assert_same_close(run(backend, *args), ref.slice_gemm(*args), 1e-5)


def _on(dev, X, W, bias=None, in_idx=None, out_idx=None, in_block=1):
    return tuple(t if t is None else t.to(dev) for t in (X, W, bias, in_idx, out_idx)) + (in_block,)


# make(dev) -> the op's arguments on dev, and the error it must raise
_X, _W, _IDX = torch.randn(3, 96), torch.randn(45, 96), torch.tensor([0, 2])
BAD_INPUTS = [
    (lambda dev: _on(dev, _X[0], _W), "X must have shape"),
    (lambda dev: _on(dev, _X, _W[:, :64]), "X has width 96"),
    (lambda dev: _on(dev, _X, _W.double()), "same dtype"),
    (lambda dev: _on(dev, _X.int(), _W.int()), "float32, bfloat16 or float16"),
    (lambda dev: _on(dev, _X, _W, in_block=0), "in_block must be >= 1"),
    (lambda dev: _on(dev, _X, _W, None, _IDX, None, 40), "not a multiple of in_block=40"),
    (
        lambda dev: _on(dev, _X, _W, None, torch.tensor([6]), None, 16),
        r"in_idx must lie in \[0, 6\)",
    ),
    (
        lambda dev: _on(dev, _X, _W, None, torch.tensor([-1]), None, 16),
        r"in_idx must lie in \[0, 6\)",
    ),
    (lambda dev: _on(dev, _X, _W, None, _IDX.int(), None, 16), "in_idx must be int64"),
    (lambda dev: _on(dev, _X, _W, None, _IDX[None], None, 16), "in_idx must be a 1-D tensor"),
    (
        lambda dev: _on(dev, _X, _W, None, None, torch.tensor([45])),
        r"out_idx must lie in \[0, 45\)",
    ),
    (lambda dev: _on(dev, _X, _W, torch.randn(44)), r"bias must have shape \(d_out,\)"),
    (lambda dev: _on(dev, _X, _W, torch.randn(45).double()), "bias must have X's dtype"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,match", BAD_INPUTS)
def test_bad_input(backend, make, match):
    with pytest.raises(RuntimeError, match=match):
        run(backend, *make(DEVICE_OF[backend]))


@pytest.mark.parametrize("make,match", BAD_INPUTS)
def test_python_checks_raise_the_cpp_messages(make, match):
    args = make("cpu")
    assert raised(slice_checks.check_inputs, *args) == raised(torch.ops.slimops.slice_gemm, *args)


@pytest.mark.parametrize(
    "in_mode,out_subset,with_bias",
    [("all", False, False), ("some_heads", True, True), ("channels", True, False)],
)
def test_opcheck(in_mode, out_subset, with_bias):
    args = make_case(7, in_mode, out_subset, with_bias)
    torch.library.opcheck(torch.ops.slimops.slice_gemm.default, args, test_utils=OPCHECK_UTILS)


# --- GPU: real shapes (skipped without a GPU) ------------------------------------------


def _llama_case(kind, T, dtype=torch.bfloat16):
    """75% kept slices of LLaMA-7B-shaped weights on the GPU: down_proj (4096 x 11008) with
    75% of its input channels, up_proj (11008 x 4096) with 75% of its rows, o_proj (4096 x
    4096) with 24 of 32 heads of 128."""
    g = torch.Generator().manual_seed(T)
    d_out, d_in, in_block = {
        "down": (4096, 11008, 1),
        "up": (11008, 4096, 1),
        "o": (4096, 4096, 128),
    }[kind]
    X = (torch.randn(T, d_in, generator=g) / d_in**0.5).to("cuda", dtype)
    W = torch.randn(d_out, d_in, generator=g).to("cuda", dtype)
    bias = torch.randn(d_out, generator=g).to("cuda", dtype)
    n_blocks = d_in // in_block
    in_idx = torch.randperm(n_blocks, generator=g)[: n_blocks * 3 // 4].sort().values.cuda()
    out_idx = torch.randperm(d_out, generator=g)[: d_out * 3 // 4].cuda() if kind == "up" else None
    if kind == "up":
        in_idx = None
    return X, W, bias, in_idx, out_idx, in_block


GPU_BACKENDS = [
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=needs_cuda_op("slice_gemm")),
]


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["down", "up", "o"])
@pytest.mark.parametrize("T", [1, 16, 2048])
def test_gpu_llama_shapes(backend, kind, T):
    args = _llama_case(kind, T)
    assert_same_close(run(backend, *args), ref.slice_gemm(*args), 8e-3)


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("in_mode", sorted(IN_MODES))
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 8e-3)]
)
def test_gpu_small_cases(backend, in_mode, dtype, tol):
    for T in (1, 37):
        args = make_case(T, in_mode, True, True, dtype=dtype, device="cuda")
        assert_same_close(run(backend, *args), ref.slice_gemm(*args), tol)


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strided_inputs(backend):
    args = strided_case("cuda")
    assert_same_close(run(backend, *args), ref.slice_gemm(*args), 1e-5)


@needs_cuda_op("slice_gemm")
def test_gpu_bad_input_checked_on_host():
    X, W = torch.randn(3, 96, device="cuda"), torch.randn(45, 96, device="cuda")
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.slimops.slice_gemm(X, W.half(), None, None, None, 1)
    with pytest.raises(RuntimeError, match="must be on X's device"):
        torch.ops.slimops.slice_gemm(X, W, None, torch.tensor([0]), None, 16)
