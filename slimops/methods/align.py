"""Hardware-aligned widths for SlimGPT (`--align N`).

A width-pruned model is only faster when its shapes stay efficient. With align = N > 1:
  * attention loses whole KV groups only (each with its query heads), so every layer keeps
    full groups and the GQA ratio of the dense model;
  * each layer's kept FFN width is a multiple of N (>= N); a dense width that is not a
    multiple of N stays allowed (the layer is then left whole);
  * what rounding owes or over-removes is carried to the next layers (slimgpt's
    `_Budget.carry`), and per-layer ratios are capped at what an aligned layer can remove
    (whole groups, FFN >= N) with the excess spread over the other layers, so the decoder
    total lands within half an FFN step (N channels) of the target.

`SlimGPTConfig.whole_kv_groups=False` keeps the FFN rule and the redistribution but prunes
heads as unaligned SlimGPT does (valid GQA, equal query heads per kept group): on CPU that
is all of the speed and none of the accuracy cost (numbers below).

`default_align(device)` is what the CLI uses when the user gives no --align; the Python
API (`SlimGPTConfig.align=None`) means no alignment, so existing plans do not change.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("slimops")

# CPU: off. bench_align.py (benchmarks/RESULTS.md, "Alignment on CPU"): odd FFN widths
# cost nothing at batch-1 decode and 2-13% at long prefills, and whole-KV-group pruning costs
# ~2% perplexity; FFN-only alignment to 8 (whole_kv_groups=False) is free in accuracy.
CPU_DEFAULT = 1
# CUDA: 64, reasoned, NOT MEASURED (benchmarks/RESULTS.md): 16-byte row strides for TMA,
# no partial 64..256-wide wgmma tiles in gate/up's N or masked K tail in down, and whole KV
# groups keep the GQA ratio fused attention kernels are tuned for.
CUDA_DEFAULT = 64


def default_align(device: str | torch.device = "cpu") -> int:
    """The --align used when the user gives none: 1 (off) on CPU, 64 on CUDA (see above)."""
    kind = torch.device(device).type
    return CUDA_DEFAULT if kind == "cuda" else CPU_DEFAULT


def check_align(align) -> int | None:
    """None or 1 -> None (no alignment); an integer > 1 -> itself; anything else: error."""
    if align is None:
        return None
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(
            f"--align {align!r}: give a positive integer N (FFN widths become "
            "multiples of N; 1 turns alignment off)"
        )
    return None if align == 1 else align


def kept_widths(ffn: int, n: int) -> list[int]:
    """The FFN widths an aligned layer may keep: multiples of n in [n, ffn], plus ffn."""
    widths = list(range(n, ffn + 1, n))
    if ffn % n:
        widths.append(ffn)
    return widths


def aligned_removal(ffn: int, want: float, n: int) -> int:
    """Channels to remove so the kept width is the allowed width nearest to ffn - want
    (ties keep more). Because the carry puts every earlier layer's rounding into `want`,
    at the last layer this is the choice that minimises the total error."""
    desired = ffn - want
    kept = min(kept_widths(ffn, n), key=lambda k: (abs(k - desired), -k))
    return ffn - kept


def layer_capacity(
    nh: int, nkv: int, ffn: int, costs: dict, n: int, whole_groups: bool = True
) -> int:
    """The most parameters one aligned layer can lose: all KV groups but one (and, without
    whole groups, all but one query head of it), and the FFN down to its smallest allowed
    width."""
    group = (nh // nkv) * costs["head"] + costs["kv_head"]
    attn = (nkv - 1) * group + (0 if whole_groups else (nh // nkv - 1) * costs["head"])
    return attn + (ffn - min(kept_widths(ffn, n))) * costs["channel"]


def fit_ratios(ratios: list[float], caps: list[float], sizes: list[int]) -> list[float]:
    """Clip per-layer ratios to the layers' aligned capacity and spread the clipped
    parameters over the layers with headroom, in proportion to that headroom."""
    excess = sum(s * max(0.0, r - c) for r, c, s in zip(ratios, caps, sizes))
    if excess <= 0:
        return list(ratios)
    clipped = [min(r, c) for r, c in zip(ratios, caps)]
    room = sum(s * (c - r) for r, c, s in zip(clipped, caps, sizes))
    if excess > room + 1e-9 * sum(sizes):
        total = sum(s * c for c, s in zip(caps, sizes)) / sum(sizes)
        raise ValueError(
            f"with --align the decoder can lose at most {total:.1%} of its "
            "parameters (one KV group and N FFN channels kept per layer); lower "
            "--ratio or --align"
        )
    share = excess / room
    return [r + (c - r) * share for r, c in zip(clipped, caps)]


def aligned_ratios(
    adapter, ratios: list[float], n: int, whole_groups: bool = True
) -> tuple[list[float], dict]:
    """Per-layer ratios an aligned prune can meet, and facts for the plan's info."""
    layers = adapter.layers()
    sizes = [adapter.layer_params(layer) for layer in layers]
    caps, steps = [], []
    for layer, size in zip(layers, sizes):
        nh, nkv, ffn = adapter.layer_shape(layer)
        costs = adapter.unit_costs(layer)
        caps.append(layer_capacity(nh, nkv, ffn, costs, n, whole_groups) / size)
        steps.append(n * costs["channel"])
    fitted = fit_ratios(ratios, caps, sizes)
    bound = max(steps) / 2 / sum(sizes)  # last layer's rounding: half an FFN step
    if bound > 0.01:
        log.warning(
            "--align %d: one FFN step is %d parameters, so the total ratio can miss "
            "the target by up to %.2f points; a smaller N is more precise",
            n,
            max(steps),
            100 * bound,
        )
    return fitted, {
        "align": n,
        "whole_kv_groups": whole_groups,
        "align_caps": caps,
        "align_error_bound": bound,
    }
