"""What the kernel benchmarks print about the device: a device string and datasheet peaks.

Shared by bench_hessian.py, bench_obs.py and bench_slice_gemm.py (run as scripts, so this
folder is on sys.path). Peaks are dense datasheet numbers; "H100 PCIe" must be matched
before "H100", hence the order of the tables. The H200 has the H100 SXM's compute.
"""
from __future__ import annotations

import os
import platform

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEAK_TFLOPS = {"H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
               "H100": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},
               "H200": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}}
HBM_TBS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8}


def device_string(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # OpenMP's default spin-waiting stalls multi-threaded kernels on a loaded machine (seen
    # here: a batched LAPACK call 2 s instead of 10 ms); OMP_WAIT_POLICY=PASSIVE avoids it,
    # so every CPU row records it.
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def _lookup(table: dict, device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((value for model, value in table.items() if model in name), None)


def peak_tflops(device, dtype: str) -> float | None:
    """Dense peak for dtype; fp32 matmuls count at the TF32 peak when TF32 is allowed."""
    peaks = _lookup(PEAK_TFLOPS, device)
    if peaks is None:
        return None
    tf32 = dtype == "fp32" and torch.get_float32_matmul_precision() != "highest"
    return peaks["tf32" if tf32 else dtype]


def peak_tbs(device) -> float | None:
    return _lookup(HBM_TBS, device)
