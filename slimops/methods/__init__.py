"""The ONE registry of pruning methods: name -> Method(config class, prune function).

Every method is one package (slimgpt/, search/, sheared/; the four baselines one file each in
baselines/) with a config dataclass (a `common.PruneConfig` whose `schedule`
default is the method's default schedule) and `prune(model, tokens, cfg, adapter=None) ->
PruningPlan`, which prunes the model in place (masked and compensated; slicing.apply_plan
makes it smaller). The pipeline, the CLI (`--method` choices) and the benchmarks read this
table; adding a method is its file plus one line here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from . import search, sheared, slimgpt
from .baselines import flap, magnitude, taylor, wanda_sp


class Method(NamedTuple):
    config: type  # a common.PruneConfig dataclass
    prune: Callable  # prune(model, tokens, cfg, adapter=None) -> PruningPlan
    summary: str  # one line for --help
    resumable: bool = False  # prune also takes progress= (slimops.progress, --resume)
    trains: bool = False  # trains on the calibration windows: every rank needs all of them

    @property
    def default_schedule(self):
        """The config's own default (None: the method sets per-layer widths itself)."""
        return next(f.default for f in dataclasses.fields(self.config) if f.name == "schedule")

    def options(self) -> list[str]:
        """Config fields a caller may set besides ratio, schedule and device."""
        return [
            f.name
            for f in dataclasses.fields(self.config)
            if f.name not in ("ratio", "schedule", "device")
        ]


METHODS: dict[str, Method] = {
    "slimgpt": Method(
        slimgpt.SlimGPTConfig, slimgpt.prune, "SlimGPT: OBS head/channel pruning", resumable=True
    ),
    "magnitude": Method(magnitude.MagnitudeConfig, magnitude.prune, "weight norms (data-free)"),
    "wanda-sp": Method(wanda_sp.WandaSpConfig, wanda_sp.prune, "|W| * ||X|| (FLAP's Wanda-sp)"),
    "flap": Method(flap.FlapConfig, flap.prune, "FLAP: fluctuation, global threshold, bias"),
    "taylor": Method(taylor.TaylorConfig, taylor.prune, "first-order |w * dL/dw| (LLM-Pruner)"),
    "search": Method(search.SearchConfig, search.prune, "Search-LLM: evolution + reformation"),
    "sheared": Method(
        sheared.ShearedConfig, sheared.prune, "Sheared-LLaMA: learned masks", trains=True
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def check_streams(name: str, cfg) -> None:
    """ValueError unless this method and config can take its layers one at a time from a
    layer source (`--stream`: PruneConfig.streams)."""
    if not cfg.streams():
        able = [n for n, m in METHODS.items() if m.config().streams()]
        raise ValueError(
            f"--stream: {name} with schedule {cfg.schedule!r} needs every layer at once; "
            f"--stream supports {', '.join(able)} with a formula schedule (log, linear, "
            "uniform or a list), not schedule obs"
        )


def option_fields() -> dict[str, dataclasses.Field]:
    """Every method option by name (first definition wins): the CLI makes one flag of each,
    so a new method's config fields are flags without touching cli.py."""
    fields: dict[str, dataclasses.Field] = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            if f.name in method.options():
                fields.setdefault(f.name, f)
    return fields


# Options every front end passes whatever the method (the CLI's --percdamp has a default):
# a method without OBS has no damping to set, so it ignores this one instead of failing.
IGNORED_WHERE_ABSENT = ("percdamp",)


def make_config(name: str, ratio: float, schedule=None, device: str = "cpu", **options):
    """The method's config; schedule None keeps the method's default, an option set to None
    is left at the method's default. An option the method does not have is a clear error
    naming the methods that have it (checked here, before any work)."""
    method = get_method(name)
    options = {
        k: v
        for k, v in options.items()
        if v is not None and not (k in IGNORED_WHERE_ABSENT and k not in method.options())
    }
    if options.get("align") == 1 and "align" not in method.options():
        del options["align"]  # --align 1 means "off": fine for any method
    for key in sorted(set(options) - set(method.options())):
        owners = [n for n, m in METHODS.items() if key in m.options()]
        flag = "--" + key.replace("_", "-")
        raise ValueError(
            f"{flag} is implemented for {' and '.join(owners)} only, not {name}"
            if owners
            else f"{flag} is not an option of any method"
        )
    given = {"ratio": ratio, "device": device, **options}
    if schedule is not None:
        given["schedule"] = schedule
    return method.config(**given)
