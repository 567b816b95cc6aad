"""Backend dispatch: CPU tensors use the C++ kernels, SLIMOPS_BACKEND forces a backend with
clear errors, and backends() says what is available and why not."""

import pytest
import torch

from slimops import ops


def test_cpu_tensors_use_cpu_backend(monkeypatch):
    monkeypatch.delenv("SLIMOPS_BACKEND", raising=False)
    assert ops.backend_for("hessian_accumulate", torch.device("cpu")) == "cpu"


def test_forced_triton_routes_to_the_triton_launcher(monkeypatch):
    calls = []
    monkeypatch.setenv("SLIMOPS_BACKEND", "triton")
    monkeypatch.setattr(ops, "_triton_kernel", lambda op: lambda *a, **kw: calls.append((op, kw)))
    ops.hessian_accumulate(torch.zeros(1, 4, 4), torch.ones(3, 4))
    # a caller that validated its indices once per plan skips the per-call check (a device sync)
    ops.slice_gemm(
        torch.ones(3, 4), torch.ones(2, 4), out_idx=torch.tensor([1]), check_indices=False
    )
    assert calls == [
        ("hessian_accumulate", {"check_indices": True}),
        ("slice_gemm", {"check_indices": False}),
    ]


def test_bad_forced_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SLIMOPS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="choose one of cpu, triton, cuda"):
        ops.hessian_accumulate(torch.zeros(1, 4, 4), torch.ones(3, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_forced_cuda_without_cuda_says_why(monkeypatch):
    monkeypatch.setenv("SLIMOPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernel"):
        ops.obs_group_errors(torch.ones(2, 4), torch.eye(4), torch.tensor([[0, 1]]))


def test_backends_report():
    report = ops.backends()
    assert set(report) == {"cpu", "triton", "cuda"}
    if not torch.cuda.is_available():
        assert report["cuda"].startswith("not available")


def test_slice_gemm_wrapper_matches_reference():
    from slimops.kernels.slice_gemm.reference import slice_gemm

    X, W, b = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)
    heads, rows = torch.tensor([0, 2]), torch.tensor([1, 3, 6])
    torch.testing.assert_close(
        ops.slice_gemm(X, W, b, heads, rows, 4), slice_gemm(X, W, b, heads, rows, 4)
    )
