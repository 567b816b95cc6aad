"""`slimops train`: Sheared-LLaMA end to end. Learned masks to a target shape (pruning
stage, methods/sheared.py), slicing, then continued pretraining, both stages on domain data
with dynamic batch loading (domains.py) and the one training loop (trainer.py).

Reference losses for dynamic batch loading: the user's (`name=loss,...`), or by default the
source model's own per-domain validation losses, measured before pruning. The paper fits
scaling laws through larger models of the same family, which users rarely have (a
reviewers' concern); the source model is always at hand, and "lag behind the model we
started from" is what continued pretraining tries to close.

Resume: each stage keeps its state in OUT.progress/<stage>/; the pruned (sliced) model is
saved there between the stages, so a run killed in continued pretraining does not prune again.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import distributed
from .domains import Domain, Mixture
from .methods.sheared.method import ShearedConfig, shear
from .models import get_adapter
from .readers import read_json
from .slicing import apply_plan
from .trainer import LMObjective, TrainConfig, domain_losses, train


@dataclass
class MixtureOptions:
    dynamic: bool = True  # dynamic batch loading (False: the initial weights throughout)
    init: str = "uniform"  # uniform | tokens (each domain's share of the train tokens)
    reference: str | torch.Tensor = "source"  # "source" (the model's own), name=loss,...
    clip: bool = True  # clip the excess loss at 0 (the paper; the official code does not)
    smoothing: float = 1e-4


def parse_reference(text: str, names: list[str]) -> torch.Tensor:
    given = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            given[name] = float(value) if sep else None
        except ValueError:
            given[name] = None
        if given[name] is None:
            raise ValueError(f"--ref-losses item {item!r} is not name=float")
    if sorted(given) != sorted(names):
        raise ValueError(f"--ref-losses names {sorted(given)} differ from the domains {names}")
    return torch.tensor([given[n] for n in names], dtype=torch.float64)


def make_mixture(model, domains: list[Domain], opts: MixtureOptions, batch_size: int, device):
    """The domain mixture, with reference losses measured on `model` when asked."""
    reference = None
    if opts.dynamic:
        if isinstance(opts.reference, torch.Tensor):  # measured already (benchmarks)
            reference = opts.reference.double()
        elif opts.reference == "source":
            probe = LMObjective(model).to(device).eval()
            reference = domain_losses(probe, domains, batch_size, device)
        else:
            reference = parse_reference(opts.reference, [d.name for d in domains])
    return Mixture.make(
        domains,
        opts.init,
        reference=reference,
        dynamic=opts.dynamic,
        smoothing=opts.smoothing,
        clip=opts.clip,
    )


def shear_and_train(
    model,
    domains: list[Domain],
    shear_cfg: ShearedConfig | None,
    cpt: TrainConfig,
    mixture_opts: MixtureOptions | None = None,
    device: str = "cpu",
    progress_dir=None,
    tokenizer=None,
) -> tuple[torch.nn.Module, object, dict]:
    """Prune `model` to shear_cfg's target (skipped when shear_cfg is None: continued
    pretraining only), slice it, then train it cpt.steps steps. Returns (model, plan, log).
    With progress_dir, each stage is resumable and the sliced model is kept between the
    stages (with `tokenizer`, saved beside it)."""
    mixture_opts = mixture_opts or MixtureOptions()
    progress = Path(progress_dir) if progress_dir is not None else None
    local = max(1, cpt.batch_size // distributed.world()[1])
    mixture = make_mixture(model, domains, mixture_opts, local, device)
    log = {"domains": [d.name for d in domains], "reference_losses": _list(mixture.reference)}
    plan = None
    pruned_dir = progress / "pruned" if progress is not None else None
    if shear_cfg is not None and pruned_dir is not None and (pruned_dir / "config.json").is_file():
        model, plan, state = load_stage(pruned_dir)
        mixture.load_state_dict(state)
        log["shear"] = "resumed from " + str(pruned_dir)
    elif shear_cfg is not None:
        prune_cfg = replace(cpt, steps=shear_cfg.prune_steps, lr=shear_cfg.weight_lr)
        stage = progress / "shear" if progress is not None else None
        tic = time.perf_counter()
        model, plan, log["shear"] = shear(model, domains, mixture, shear_cfg, prune_cfg, stage)
        apply_plan(model, plan)
        log["shear_wall_s"] = time.perf_counter() - tic
        if pruned_dir is not None:
            save_stage(model, pruned_dir, plan, mixture.state_dict(), tokenizer)
    mixture.history = []  # the continued-pretraining log starts afresh
    stage = progress / "cpt" if progress is not None else None
    tic = time.perf_counter()
    objective, log["cpt"] = train(LMObjective(model), domains, mixture, cpt, device, stage, "train")
    log["cpt_wall_s"] = time.perf_counter() - tic
    return objective.model, plan, log


MIXTURE_STATE = "mixture.json"


def save_stage(model, folder: Path, plan, mixture_state: dict, tokenizer=None) -> None:
    """The sliced model between the stages, with the plan and the domain weights (rank 0)."""
    from .checkpoint import save_pruned

    if distributed.is_main():
        extra = {MIXTURE_STATE: json.dumps(mixture_state).encode()}
        save_pruned(model, folder, tokenizer, plan, overwrite=True, extra_files=extra)
    distributed.barrier()


def load_stage(folder: Path):
    from .checkpoint import PLAN_FILE
    from .checkpoint import load as load_checkpoint
    from .plan import PruningPlan

    model, _ = load_checkpoint(folder)
    plan = PruningPlan.from_json((folder / PLAN_FILE).read_text())
    return model, plan, read_json(folder / MIXTURE_STATE)


def _list(t):
    return None if t is None else t.tolist()


def say(text: str) -> None:
    if distributed.is_main():
        print(text, file=sys.stderr, flush=True)


def clear_progress(progress_dir) -> None:
    if progress_dir is not None and distributed.is_main():
        shutil.rmtree(progress_dir, ignore_errors=True)


def summary(log: dict, model) -> str:
    """Lines for the end of `slimops train`: stage times, final per-domain losses, weights."""
    adapter = get_adapter(model)
    lines = [f"decoder params {adapter.decoder_params():,}, whole model {adapter.total_params():,}"]
    if isinstance(log.get("shear"), dict):
        lines.append(f"pruning stage {log['shear_wall_s']:.1f} s")
    last = log["cpt"]["mixture"][-1]
    lines.append(f"continued pretraining {log['cpt_wall_s']:.1f} s")
    for name, loss, w in zip(log["domains"], last["losses"], last["weights"]):
        lines.append(f"  {name:>14}: validation loss {loss:.4f}, weight {w:.3f}")
    return "\n".join(lines)
