"""The user-level flow: load -> calibrate -> method -> slice -> report (-> save).

Every stage takes and returns plain objects, so the CLI, the demo, benchmarks and tests
all call the same functions.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from . import distributed
from .evaluation import search_report
from .loading import DTYPES, load_model, load_tokenizer, resolve_model_path  # noqa: F401 (API)
from .memory import reset_peak_rss, status_kb
from .methods import METHODS, check_streams, get_method, make_config
from .models import get_adapter
from .plan import PruningPlan
from .slicing import apply_plan


@dataclass
class PruneReport:
    method: str
    target_ratio: float
    decoder_params_before: int
    decoder_params_after: int
    total_params_before: int
    total_params_after: int
    wall_seconds: float
    peak_memory_mb: float
    layer_shapes: list
    info: dict = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.decoder_params_after / self.decoder_params_before

    @property
    def total_ratio(self) -> float:
        return 1.0 - self.total_params_after / self.total_params_before

    def table(self) -> str:
        rows = ["| layer | query heads | KV heads | FFN width |", "|---:|---:|---:|---:|"]
        rows += [
            f"| {i} | {s['num_attention_heads']} | {s['num_key_value_heads']} | "
            f"{s['intermediate_size']} |"
            for i, s in enumerate(self.layer_shapes)
        ]
        return "\n".join(rows)

    def summary(self) -> str:
        return "\n".join(
            [
                self.table(),
                "",
                f"decoder params: {self.decoder_params_before:,} -> {self.decoder_params_after:,} "
                f"(removed {self.achieved_ratio:.2%}, target {self.target_ratio:.2%})",
                f"whole model:    {self.total_params_before:,} -> {self.total_params_after:,} "
                f"(removed {self.total_ratio:.2%}; embeddings and lm_head are not pruned)",
                f"wall time {self.wall_seconds:.1f} s, peak memory {self.peak_memory_mb:.0f} MB",
                *search_report.summary_lines(self.info),
            ]
        )


def prune_model(
    model,
    tokens: torch.Tensor,
    method: str = "slimgpt",
    ratio: float = 0.2,
    schedule=None,
    device: str = "cpu",
    progress=None,
    source=None,
    **options,
) -> tuple[PruningPlan, PruneReport]:
    """Prune `model` in place to the method's plan and slice it; returns plan and report.

    method: a name in slimops.methods.METHODS. schedule=None is the method's default (log for
    slimgpt, its Incremental Pruning Ratio; uniform for the baselines; flap sets widths
    itself). options: the method config's fields (batch_size, percdamp, align, ...).
    Under torchrun (slimops.distributed) each rank calibrates on its share of `tokens`.
    progress (slimops.progress.Progress): resume a killed run, save progress per layer.
    source: where the layer-by-layer driver gets each layer from and puts it back
    (sequential.InMemoryLayers by default; streaming.ShardSource reads it from safetensors
    shards and writes it out sliced, `--stream`); with a source the layers are already
    sliced when the method returns."""
    cfg = make_config(method, ratio, schedule, device, **options)  # bad options fail here
    chosen = get_method(method)
    if source is not None:
        check_streams(method, cfg)
    if chosen.trains:  # training splits each step's batch over the ranks itself
        split = f"world size {distributed.world()[1]}: every rank draws the same batches"
    else:
        tokens, split = distributed.shard(tokens)
        if distributed.world()[1] > 1:
            print(split, file=sys.stderr, flush=True)
    adapter = get_adapter(model)
    before = (adapter.decoder_params(), adapter.total_params())
    reset_peak_memory(device)
    start = time.perf_counter()
    if progress is not None and not chosen.resumable:
        resumable = [n for n, m in METHODS.items() if m.resumable]
        raise ValueError(f"--resume is implemented for {', '.join(resumable)} only, not {method}")
    extra = {k: v for k, v in {"progress": progress, "source": source}.items() if v is not None}
    plan = chosen.prune(model, tokens, cfg, adapter, **extra)
    if source is None:  # a layer source slices each layer as it goes back
        apply_plan(model, plan)
    wall = time.perf_counter() - start
    report = PruneReport(
        method,
        ratio,
        before[0],
        adapter.decoder_params(),
        before[1],
        adapter.total_params(),
        wall,
        peak_memory_mb(device),
        plan.shapes(),
        {**plan.info, "calibration_split": split},
    )
    return plan, report


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window, so several prunes in one process each report their
    own peak: CUDA's allocator stats, or the process's peak RSS (slimops.memory)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()  # where impossible the peak is the process's so far


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak_kb = status_kb("VmHWM")
    if peak_kb is not None:
        return peak_kb / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
