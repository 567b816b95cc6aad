"""The one training loop: Sheared-LLaMA's pruning stage and continued pretraining both run it.

An objective is an nn.Module whose forward(ids, step) returns (loss, metrics) for a training
batch and, with step=None, the per-sequence loss of an eval batch (eval goes through forward
so FSDP's hooks gather the weights). It names its AdamW parameter groups (a group may set
`maximize`: the Lagrange multipliers are trained by gradient ascent) and may clamp after a
step. Every group's learning rate follows one schedule: linear warm-up, then cosine to
min_lr_ratio of the peak (the official code's schedule).

Distributed: under torchrun the objective is wrapped in DDP (or FSDP2's fully_shard with
--fsdp, each decoder layer its own unit); every rank draws the same global batch (a pure
function of seed, step and the domain weights, slimops.domains) and trains on its
contiguous share, so gradients average to the single-process ones. Evaluation runs on every
rank over the whole validation set and the per-domain losses are averaged over the ranks:
every rank updates the domain weights identically.

Resume: every save_interval steps rank 0 writes model, optimizer, step, domain weights and
the log to state_dir/train_state.pt (run_state: durable, tied to the settings, which are
checked before anything loads). A killed run restarted with the
same settings continues at the saved step and draws the same batches and the same mask
noise, so it ends where an unbroken run ends.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .domains import Domain, Mixture, draw_batch
from .readers import load_state
from .run_state import RunState, same_on_every_rank

STATE_FILE = "train_state.pt"
# What the progress bar shows; the JSON log keeps every metric of every step.
_SHOWN = ("loss", "tokens_per_s", "ce", "kl", "size_vs_target", "lambda_1")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per step over all ranks
    lr: float = 1e-4  # peak learning rate of the weights
    warmup_steps: int = 0  # learning-rate warm-up
    min_lr_ratio: float = 0.1  # cosine floor, as a share of the peak
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 50  # evaluate (and update dynamic domain weights) every N steps
    save_interval: int = 0  # write resumable state every N steps (0: at every eval)
    seed: int = 0
    fsdp: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.eval_interval < 1:
            raise ValueError("steps must be >= 0, batch_size and eval_interval >= 1")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


class LMObjective(nn.Module):
    """Plain next-token cross-entropy (continued pretraining)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, step: int | None = None):
        logits = self.model(ids).logits
        if step is None:
            return sequence_losses(logits, ids)
        loss = token_loss(logits, ids)
        return loss, {}

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": cfg.lr}]

    def after_step(self, step: int) -> None:
        pass

    def shard_units(self) -> list[nn.Module]:
        from .models import get_adapter

        return list(get_adapter(self.model).layers())


def token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device)
    )


def sequence_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    per_token = nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), ids[:, 1:].to(logits.device), reduction="none"
    )
    return per_token.mean(1)


@torch.no_grad()
def domain_losses(module, domains: list[Domain], batch_size: int, device) -> torch.Tensor:
    """Mean next-token loss of each domain's validation windows (float64, CPU). Every rank
    evaluates every window (FSDP needs the same forwards on all ranks); the ranks' results
    are then averaged, so all ranks hold the very same numbers and draw the same mixture
    even where kernels are not bitwise reproducible across devices."""
    out = []
    for d in domains:
        losses = [module(w.to(device), None) for w in d.valid.split(batch_size)]
        out.append(torch.cat(losses).double().mean().cpu())
    return distributed.all_sum(torch.stack(out)) / distributed.world()[1]


def _wrap(objective: nn.Module, cfg: TrainConfig, device) -> nn.Module:
    if distributed.world()[1] == 1:
        return objective
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in objective.shard_units():
            fully_shard(unit)
        return fully_shard(objective)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=ids)


def _state_dicts(wrapped, optimizer, rank0_only: bool) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, keyed by parameter name; with rank0_only
    gathered to rank 0's CPU alone (the others get empty dicts: saving needs only rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_state_dict(wrapped, optimizer, options=opts)


def _full_model_state(wrapped) -> dict:
    """The whole model on every rank, for the returned copy; the optimizer state stays
    sharded (get_state_dict would also gather every rank's full AdamW moments, 2x the model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))


def _load_state(wrapped, optimizer, model_sd: dict, optim_sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(
        wrapped, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts
    )


def _save(run: RunState, record: dict) -> None:
    if distributed.is_main():
        run.write(STATE_FILE, lambda tmp: torch.save(record, tmp))
    distributed.barrier()


def train(
    objective: nn.Module,
    domains: list[Domain],
    mixture: Mixture,
    cfg: TrainConfig,
    device="cpu",
    state_dir: str | os.PathLike | None = None,
    desc: str = "train",
    stop_after: int | None = None,
) -> tuple[nn.Module, dict]:
    """Train `objective` for cfg.steps steps on batches drawn from `domains` by `mixture`.
    Returns the trained objective (unsharded) and the log. stop_after (tests): stop after
    that step as a killed run would, without the final evaluation."""
    rank, world = distributed.world()
    if cfg.batch_size % world:  # checked here: the config may predate joining the group
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {world}")
    run = None
    if state_dir is not None:  # another run's state is refused before anything is loaded
        run = RunState(state_dir, {"config": asdict(cfg), "world_size": world})
        run.claim()
    shadow = _meta_copy(objective) if cfg.fsdp and world > 1 else None  # in the model's dtypes
    precision = MasterWeights(objective)
    objective.to(device)
    wrapped = _wrap(objective, cfg, device)
    groups = objective.param_groups(cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    log = {"config": asdict(cfg), "world_size": world, "steps": [], "wall_s": 0.0}
    start = _resume(run, wrapped, optimizer, mixture, log)
    local = cfg.batch_size // world
    if distributed.is_main():
        print(
            f"{desc}: world size {world}, {local} of {cfg.batch_size} sequences per rank per step"
            + (f", resuming at step {start}" if start else ""),
            file=sys.stderr,
            flush=True,
        )

    def evaluate() -> torch.Tensor:  # every domain's eval loss, the same on every rank
        with precision.autocast(device):
            return domain_losses(wrapped, domains, local, device)

    if start == 0:  # the stage's starting losses, for the log: the weights do not move on them
        mixture.update(0, evaluate(), move=False)
    bar = tqdm(range(start, cfg.steps), desc=desc, unit="step", disable=not distributed.is_main())
    for step in bar:
        tic = time.perf_counter()
        ids, _ = draw_batch(domains, mixture.weights, cfg.batch_size, cfg.seed, step)
        ids = ids[rank * local : (rank + 1) * local].to(device)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, cfg)
        with precision.autocast(device):
            loss, metrics = wrapped(ids, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            clipped = [
                p for g in optimizer.param_groups if not g.get("maximize") for p in g["params"]
            ]
            torch.nn.utils.clip_grad_norm_(clipped, cfg.grad_clip)
        optimizer.step()
        objective.after_step(step)
        record = _record(step, loss, metrics, ids.numel() * world, time.perf_counter() - tic)
        log["steps"].append(record)
        log["wall_s"] += record["seconds"]
        bar.set_postfix({k: v for k, v in record.items() if k in _SHOWN})
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
            # dynamic batch loading, after every eval_interval steps of training and once at
            # the stage's end (the official callback's schedule: not at step 0, whose losses
            # are those of untrained masks, and once at a stage boundary)
            mixture.update(step + 1, evaluate())
        if run is not None and _due(step, cfg):
            _save_state(run, wrapped, optimizer, mixture, log, step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            return precision.restore(objective), log
    log["mixture"] = mixture.history
    if shadow is not None:  # FSDP: gather the full weights into an unsharded copy
        shadow.to_empty(device=device)
        shadow.load_state_dict(_full_model_state(wrapped))  # cast to the model's dtypes
        _copy_buffers(objective, shadow)
        return shadow, log
    return precision.restore(objective), log


class MasterWeights:
    """Mixed precision with fp32 master weights: parameters stored in bf16 / fp16 are trained
    as fp32 copies (AdamW's update lands in fp32, where a bf16 weight of magnitude 0.02 loses
    every step smaller than ~6e-5, half its ulp, so a small learning rate trained nothing),
    the forwards run under autocast in the stored dtype, and restore() gives the parameters
    back their dtype. No loss scaling: bf16 needs none; fp16 gradients may underflow."""

    def __init__(self, objective: nn.Module):
        low = (torch.bfloat16, torch.float16)
        self.dtypes = {n: p.dtype for n, p in objective.named_parameters() if p.dtype in low}
        self.compute = next(iter(self.dtypes.values()), None)
        with torch.no_grad():
            for n, p in objective.named_parameters():
                if n in self.dtypes:
                    p.data = p.data.float()

    def autocast(self, device):
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.compute)

    def restore(self, objective: nn.Module) -> nn.Module:
        with torch.no_grad():
            for n, p in objective.named_parameters():
                if n in self.dtypes:
                    p.data = p.data.to(self.dtypes[n])
        return objective


def _meta_copy(objective: nn.Module) -> nn.Module:
    """A weightless copy to gather FSDP's shards into at the end. Modules the objective holds
    outside its registry (a frozen teacher) are shared, not copied."""
    outside = {id(v): v for v in vars(objective).values() if isinstance(v, nn.Module)}
    return copy.deepcopy(objective, memo=outside).to("meta")


@torch.no_grad()
def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """`to_empty` leaves every buffer uninitialised and load_state_dict restores only the
    persistent ones: non-persistent buffers (rotary `inv_freq`, ...) come from the trained
    objective, whose buffers FSDP leaves whole on every rank. (Without this, continued
    pretraining after an FSDP pruning stage ran on garbage positions.)"""
    trained = dict(source.named_buffers())
    for name, buf in target.named_buffers():
        buf.copy_(trained[name])


def _due(step: int, cfg: TrainConfig) -> bool:
    every = cfg.save_interval or cfg.eval_interval
    return (step + 1) % every == 0 or step + 1 == cfg.steps


def _record(step, loss, metrics, tokens, seconds) -> dict:
    loss = distributed.all_sum_float(float(loss.detach())) / distributed.world()[1]
    return {
        "step": step,
        "loss": round(loss, 5),
        "tokens_per_s": round(tokens / seconds, 1),
        "seconds": seconds,
        **metrics,
    }


def _save_state(run, wrapped, optimizer, mixture, log, next_step) -> None:
    model_sd, optim_sd = _state_dicts(wrapped, optimizer, rank0_only=True)
    record = {"step": next_step, "model": model_sd, "optim": optim_sd}
    _save(run, record | {"mixture": mixture.state_dict(), "log": json.dumps(log)})


def _resume(run, wrapped, optimizer, mixture, log) -> int:
    """The step to start at, with the saved state loaded (the settings were checked)."""
    if run is None or not same_on_every_rank(run.folder / STATE_FILE):
        return 0
    state = load_state(run.folder / STATE_FILE)
    _load_state(wrapped, optimizer, state["model"], state["optim"])
    mixture.load_state_dict(state["mixture"])
    log.update(json.loads(state["log"]))
    return state["step"]
