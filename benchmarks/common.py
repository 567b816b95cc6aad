"""What the kernel benchmarks share: one timer, one table of datasheet peaks, backend
discovery, one markdown table and JSON writer, and an optional competing CPU load.

bench_hessian.py, bench_obs.py and bench_slice_gemm.py keep only their problems (shapes,
flop and byte counts, baselines, the kernels to compare) as `Case`s; `measure` times every
case the same way, so their numbers compare. Benchmarks run as scripts, so this folder is on
sys.path (tests: helpers.load_benchmark puts it there). Nothing here imports slimops or
triton at import time: TRITON_INTERPRET must be set before triton's first import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNEL_BACKENDS = ("cpp", "triton", "cuda")

# ---- the device: a string and its dense datasheet peaks --------------------------------------
# "H100 PCIe" must be matched before "H100", hence the order. The H200 has the H100 SXM's compute.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H100": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},
    "H200": {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67},
}
HBM_TBS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8}


def device_string(device: str = DEVICE) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # OpenMP's default spin-waiting stalls multi-threaded kernels on a loaded machine (seen
    # here: a batched LAPACK call 2 s instead of 10 ms); OMP_WAIT_POLICY=PASSIVE avoids it,
    # so every CPU row records it, and the load average beside it.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cpus), "
        f"{torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load {load:.2f}"
    )


def _lookup(table: dict, device: str):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((value for model, value in table.items() if model in name), None)


def peak_tflops(dtype: str, device: str = DEVICE) -> float | None:
    """Dense peak for dtype; fp32 matmuls count at the TF32 peak when TF32 is allowed."""
    peaks = _lookup(PEAK_TFLOPS, device)
    if peaks is None:
        return None
    tf32 = dtype == "fp32" and torch.get_float32_matmul_precision() != "highest"
    return peaks["tf32" if tf32 else dtype]


def peak_tbs(device: str = DEVICE) -> float | None:
    return _lookup(HBM_TBS, device)


# ---- one timer ----------------------------------------------------------------------------------


def median_seconds(
    fn: Callable[[], object],
    repeats: int = 5,
    restore: Callable[[], object] | None = None,
    device: str = DEVICE,
) -> float:
    """Median seconds of one call of fn(); restore() runs untimed before every timed call
    (in-place ops whose inputs must be put back).

    GPU: triton's do_bench, which clears the L2 cache before each call (a 75% slice of
    4096 x 11008 bf16 is 68 MB, close to H100's 50 MB L2); at least `repeats` calls, more
    when they fit in its 100 ms.
    CPU: torch.utils.benchmark.Timer on torch's thread count (its default is one thread),
    `repeats` samples of one call each (each after Timer's two warm-up calls).
    """
    call = _RestoringCall(fn, restore or (lambda: None))
    if device == "cuda":
        from triton.testing import do_bench  # here, not at import: see the module docstring

        times = []
        while len(times) < repeats:  # a 60 ms SYRK fits once in do_bench's 100 ms: ask for more
            rep = 100 if not times else 2 * (repeats - len(times)) * max(times)
            times += do_bench(call, warmup=25, rep=rep, grad_to_none=[call], return_mode="all")
        return statistics.median(times) / 1e3
    timer = Timer(
        stmt="call()",
        setup="call.reset()",
        num_threads=torch.get_num_threads(),
        globals={"call": call},
    )
    return statistics.median(timer.timeit(1).median for _ in range(repeats))


class _RestoringCall:
    """fn() with restore() untimed before each timed call, and inline before any other call
    that follows a call (warm-ups: an in-place op must never see its own output).
    Timed calls come right after reset(): Timer runs it as its setup; do_bench's one
    per-call hook is `x.grad = None` for x in grad_to_none, run before it clears L2 and
    records the start event, so this object is that x and setting its grad resets."""

    def __init__(self, fn, restore):
        self.fn, self.restore, self.fresh = fn, restore, False

    def reset(self):
        self.restore()
        self.fresh = True

    grad = property(lambda self: None, lambda self, _: self.reset())

    def __call__(self):
        if not self.fresh:
            self.restore()
        self.fresh = False
        self.fn()


# ---- which kernels run here -----------------------------------------------------------------


def kernel_backends(
    op: str, requested: Iterable[str] | None = None, device: str = DEVICE
) -> list[str]:
    """The requested kernel backends ("cpp", "triton", "cuda") that can run slimops::<op> here,
    in order; other names (baselines) are dropped. Default: all but the Triton interpreter on
    CPU (minutes at these shapes)."""
    requested = list(requested or ["cpp", "cuda"] + (["triton"] if device == "cuda" else []))
    if "triton" in requested and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from slimops import ops

    # has_kernel(op, "cpu") is also true for the Python reference fallback: "cpp" means C++.
    runs = {
        "cpp": device == "cpu"
        and ops.has_kernel(op, "cpu")
        and ops.backends()["cpu"].startswith("C++"),
        "triton": ops.has_kernel(op, "triton"),
        "cuda": device == "cuda" and ops.has_kernel(op, "cuda"),
    }
    return [name for name in requested if runs.get(name, False)]


# ---- problems, timing, rows ---------------------------------------------------------------------


@dataclass
class Case:
    """One problem. `keys` name it in the table; flops and nbytes are its contract's counts
    (None: not counted); baselines and kernels map names to fn(); every row gets the ratio
    baseline time / its time for each baseline. restore() puts in-place inputs back, untimed."""

    keys: dict
    flops: float | None
    nbytes: float | None
    dtype: str  # which datasheet peak applies
    baselines: dict[str, Callable[[], object]]
    kernels: dict[str, Callable[[], object]]
    restore: Callable[[], object] | None = None


def _pct(value, peak):
    return None if value is None or peak is None else 100 * value / peak


def rates(case: Case, seconds: float, device: str = DEVICE) -> dict:
    """ms, TFLOP/s, GB/s and their % of the device's peaks (None off the peak table)."""
    tflops = None if case.flops is None else case.flops / seconds / 1e12
    gbs = None if case.nbytes is None else case.nbytes / seconds / 1e9
    hbm = peak_tbs(device)
    return {
        "ms": seconds * 1e3,
        "tflops": tflops,
        "pct_peak_flops": _pct(tflops, peak_tflops(case.dtype, device)),
        "gbs": gbs,
        "pct_peak_bw": _pct(gbs, None if hbm is None else hbm * 1e3),
    }


def time_case(case: Case, repeats: int, device: str = DEVICE) -> list[dict]:
    """One row per baseline and kernel; the baselines are timed first, in the same run."""
    fns = case.baselines | case.kernels
    seconds = {name: median_seconds(fn, repeats, case.restore, device) for name, fn in fns.items()}
    return [
        case.keys
        | {"backend": name}
        | rates(case, t, device)
        | {f"vs_{b}": seconds[b] / t for b in case.baselines}
        | {"flops": case.flops, "bytes": case.nbytes}
        for name, t in seconds.items()
    ]


def measure(
    cases: Iterable[Case], args: argparse.Namespace, device: str = DEVICE
) -> tuple[list[dict], dict]:
    """(rows of every case, the run's record for the report), timed under --competing-load."""
    rows = []
    with competing_load(args.competing_load, args.competing_kind) as pids:
        load = f"{len(pids)} {args.competing_kind}" if pids else "none"
        for case in cases:  # a generator: each problem's tensors exist only while it runs
            rows += [row | {"load": load} for row in time_case(case, args.repeats, device)]
    from slimops import ops

    meta = {
        "device": device_string(device),
        "torch": torch.__version__,
        "slimops_backends": ops.backends(),
        "competing_load": {"processes": len(pids), "kind": args.competing_kind, "pids": pids},
        "args": vars(args),
    }
    return rows, meta


def run(
    op: str, args: argparse.Namespace, cases: Callable[..., Iterable[Case]], notes: list[str]
) -> list[dict]:
    """A kernel benchmark's main: time cases(args, the kernel backends that run slimops::<op>
    here), print the report and write its JSON; returns the rows."""
    rows, meta = measure(cases(args, kernel_backends(op, args.backends)), args)
    report(rows, meta, notes, args.json)
    return rows


# ---- one table printer and JSON writer ----------------------------------------------------------

COLUMNS = {
    "backend": ("backend", "{}"),
    "ms": ("median ms", "{:.4g}"),
    "tflops": ("TFLOP/s", "{:.4g}"),
    "pct_peak_flops": ("% peak flops", "{:.1f}"),
    "gbs": ("GB/s", "{:.4g}"),
    "pct_peak_bw": ("% peak HBM", "{:.1f}"),
    "load": ("competing load", "{}"),
}


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format); None prints "n/a"; formatted numbers align right."""

    def cell(value, fmt):
        return "n/a" if value is None else fmt.format(value)

    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "".join("---|" if fmt == "{}" else "---:|" for _, _, fmt in columns),
    ]
    lines += [
        "| " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def table_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Every key of the rows in order but the raw counts (JSON only); vs_<b> are ratios."""

    def column(key):
        ratio = key.startswith("vs_")
        return COLUMNS.get(key, (key.replace("_", " "), "{:.2f}x" if ratio else "{}"))

    return [(key, *column(key)) for key in rows[0] if key not in ("flops", "bytes")]


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def report(rows: list[dict], meta: dict, notes: list[str], json_path: str | None = None) -> None:
    """Print the device, the load, the notes (what flops, bytes and the baselines are) and the
    table; write all of it as JSON when json_path is given."""
    load = meta["competing_load"]
    print(f"device: {meta['device']}")
    print(
        f"competing load: {load['processes']} {load['kind']} process(es) during every timed call"
        if load["processes"]
        else "competing load: none"
    )
    print("\n".join(notes) + "\n")
    print(markdown_table(rows, table_columns(rows)) if rows else "(nothing to time)")
    if json_path:
        write_json(json_path, meta | {"notes": notes, "rows": rows})


# ---- arguments and the competing load -----------------------------------------------------------


def _at_least(low: int):
    """argparse type: an integer >= low, or a one-line error before any work."""

    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)

    return parse


def add_shared_args(
    p: argparse.ArgumentParser, repeats: int, baselines: Iterable[str] = ()
) -> None:
    p.add_argument(
        "--backends",
        nargs="+",
        choices=[*baselines, *KERNEL_BACKENDS],
        help="kernels to time (default: every one that runs here, but not the Triton "
        "interpreter on CPU); the baselines always run, for the ratios",
    )
    p.add_argument(
        "--repeats",
        type=_at_least(1),
        default=repeats,
        help="timed calls, median (GPU: at least this many; more if they fit in 100 ms)",
    )
    p.add_argument("--json", metavar="PATH", help="write the rows and the run's settings here")
    p.add_argument(
        "--competing-load",
        type=_at_least(0),
        default=0,
        metavar="N",
        help="run N CPU-bound processes during the timing (killed after), to see the "
        "same-run ratios on a busy machine",
    )
    p.add_argument(
        "--competing-kind",
        choices=sorted(LOADS),
        default="busy",
        help="busy: a pure-Python loop, one core each, like a parallel build; "
        "matmul: one-thread torch GEMMs, which also compete for caches and DRAM",
    )


# The model-shape options: (default, the LlamaConfig field it sets). The defaults, SHAPE, are
# the throughput table of docs/results.md's model.
SHAPE_OPTIONS = {
    "hidden": (1024, "hidden_size"),
    "ffn": (2816, "intermediate_size"),
    "heads": (16, "num_attention_heads"),
    "kv_heads": (4, "num_key_value_heads"),
    "layers": (8, "num_hidden_layers"),
    "vocab": (4096, "vocab_size"),
}
SHAPE = {name: default for name, (default, _) in SHAPE_OPTIONS.items()}


def add_args(p: argparse.ArgumentParser, **defaults) -> None:
    """--name (underscores as dashes) for each keyword, its value the default; a (default,
    help) pair gives a help. The shape options (SHAPE_OPTIONS) are ints whose help is the
    config field they set; any other option takes its default's type (None: a string)."""
    for name, value in defaults.items():
        field = SHAPE_OPTIONS.get(name, (None, None))[1]
        default, text = value if isinstance(value, tuple) else (value, field)
        kind = int if field else type(default)
        kind = None if kind in (str, type(None)) else kind
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)


def build_config(args, **fields):
    """The LlamaConfig of args' shape (the SHAPE_OPTIONS, as add_args names them) with HF's
    std 0.02 init and untied embeddings; fields: any other config field."""
    from transformers import LlamaConfig

    shape = {field: getattr(args, name) for name, (_, field) in SHAPE_OPTIONS.items()}
    head_dim = args.hidden // args.heads
    return LlamaConfig(
        **shape, head_dim=head_dim, initializer_range=0.02, tie_word_embeddings=False, **fields
    )


# (setup, loop body) of each kind of competing process.
LOADS = {
    "busy": ("", "pass"),
    "matmul": ("import torch; torch.set_num_threads(1); a = torch.randn(512, 512)", "a @ a"),
}
# Each child says "ready" once it loops, and leaves the loop by itself when its parent is gone
# (a benchmark killed by SIGKILL cannot clean up).
_CHILD = """import os, sys
{setup}
parent = int(sys.argv[1])
print("ready", flush=True)
while os.getppid() == parent:
    {body}
"""


@contextlib.contextmanager
def competing_load(n: int, kind: str = "busy"):
    """Start n CPU-bound processes, wait until each runs, yield their pids; kill them on exit,
    also on an error or Ctrl-C (their own session: a terminal's Ctrl-C reaches only us)."""
    setup, body = LOADS[kind]
    script = _CHILD.format(setup=setup, body=body)
    procs = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script, str(os.getpid())],
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            )
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                p.wait()
                raise RuntimeError(
                    f"competing load process {p.pid} did not start: {p.stderr.read().strip()}"
                )
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()
            p.stderr.close()
