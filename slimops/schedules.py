"""Per-layer pruning ratios.

SlimGPT's Incremental Pruning Ratio: layer-wise pruning accumulates error from early layers
into later ones, so early layers keep more. The paper's log schedule is

    ratio_i = r_min + (r_max - r_min) * ln(1 + i) / ln(L),     i = 0 .. L-1

We fix r_min = 0 (the first layer is kept whole) and solve r_max so the mean equals the
target; if that r_max would exceed `cap`, r_max = cap and r_min rises instead. Since dense
layers have equal parameter counts, the mean ratio is the share of decoder parameters removed.
"""

from __future__ import annotations

import math

SCHEDULES = ("log", "linear", "uniform")
# Computed from the model and the calibration data by the method itself (slimgpt: OBS error
# curves, methods/allocation.py), not from a formula here.
DATA_SCHEDULES = ("obs",)


def _shape(kind: str, num_layers: int) -> list[float]:
    """The schedule's profile f_i in [0, 1]."""
    if num_layers == 1:
        return [1.0]
    if kind == "log":
        return [math.log(1 + i) / math.log(num_layers) for i in range(num_layers)]
    if kind == "linear":
        return [i / (num_layers - 1) for i in range(num_layers)]
    if kind in DATA_SCHEDULES:
        raise ValueError(
            f"schedule {kind!r} is computed from the data by slimgpt; other "
            f"methods take one of {SCHEDULES} or a list"
        )
    raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES} or give a list")


def layer_ratios(
    schedule: str | list[float], target: float, num_layers: int, cap: float = 0.9
) -> list[float]:
    """Per-layer ratios whose mean is `target` (uniform, linear, log) or the explicit list."""
    if not isinstance(schedule, str):
        ratios = [float(r) for r in schedule]
        if len(ratios) != num_layers:
            raise ValueError(
                f"explicit schedule has {len(ratios)} ratios, model has {num_layers} layers"
            )
        if any(not 0.0 <= r < 1.0 for r in ratios):
            raise ValueError("every per-layer ratio must lie in [0, 1)")
        return ratios
    if not 0.0 <= target < 1.0:
        raise ValueError(f"ratio {target} is outside [0, 1)")
    if schedule == "uniform" or target == 0.0:
        return [target] * num_layers
    f = _shape(schedule, num_layers)
    mean_f = sum(f) / num_layers
    r_min, r_max = 0.0, target / mean_f
    if r_max > cap:  # keep the profile, lift the floor instead
        r_max = cap
        r_min = (target - cap * mean_f) / (1.0 - mean_f)
    return [r_min + (r_max - r_min) * fi for fi in f]


def parse_schedule(text: str) -> str | list[float]:
    """CLI form: a schedule name, or comma-separated per-layer ratios ("0,0.1,0.2,...")."""
    if text in SCHEDULES + DATA_SCHEDULES:
        return text
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--schedule must be one of {SCHEDULES + DATA_SCHEDULES} or comma-separated per-layer "
            f"ratios, got {text!r}"
        ) from None
