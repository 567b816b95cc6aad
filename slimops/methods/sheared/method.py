"""Sheared-LLaMA (Xia et al. 2023): learn hard-concrete masks and the weights together toward
an exact target architecture, then slice to it.

Pruning stage, as the paper and its official code (`l0_module.py`):
  loss = CE(model under sampled gates) + sum_f lambda_1 (s_f - t_f) + lambda_2 (s_f - t_f)^2
with s_f the expected kept share of each gate family (hidden, layers, query heads, KV
groups, FFN channels; masks.py) and t_f its target, ramped in linearly from the
source shape over the first `target_warmup` share of the steps (official: 640 of 3200).
One AdamW (betas 0.9, 0.95, no weight decay) trains the weights (lr 1e-4), the log_alphas
(lr 1.0) and, by gradient ascent, the lambdas (lr 1.0): the official values. The large mask
and lambda rates are what lets the masks move within a short run; the weights keep the
small fine-tuning rate. Optional `distill` adds KL(dense teacher || pruned) per token (the
paper trains on CE only; CoFi-style distillation is an addition, measured in docs/results.md).

At the end each family keeps its top-scoring units (sigmoid(0.8 log_alpha / beta)), exactly
the target shape, GQA-valid; kept gate values are folded into the weights and the model is
sliced (hidden dimension included) to a uniform, stock-loadable shape. Continued
pretraining with dynamic batch loading is `slimops train` (slimops/train.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ...domains import Domain, Mixture
from ...models import get_adapter
from ...plan import PruningPlan
from ...readers import read_json
from ...trainer import TrainConfig, sequence_losses, token_loss, train
from ..common import PruneConfig
from .masks import (
    Geometry,
    Shape,
    ShearedMasks,
    fold_gates,
    gated,
    plan_from_gates,
)

_CONFIG_KEYS = {  # Shape field (= --target key) -> HF config key
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "ffn": "intermediate_size",
}


@dataclass
class ShearedConfig(PruneConfig):
    schedule: str | list | None = None  # the target shape sets every width
    target: str = field(
        default="",
        metadata={
            "help": "target shape hidden=H,layers=L,heads=N,kv_heads=K,ffn=F (keys left out "
            "keep the source's) or a config.json; empty: the shape --ratio gives by scaling "
            "hidden, heads and FFN alike (layers and KV groups kept)"
        },
    )
    prune_steps: int = field(default=200, metadata={"help": "steps of mask learning"})
    weight_lr: float = field(default=1e-4, metadata={"help": "peak lr of the weights"})
    mask_lr: float = field(default=1.0, metadata={"help": "lr of the mask log_alphas"})
    lambda_lr: float = field(default=1.0, metadata={"help": "lr of the Lagrange multipliers"})
    target_warmup: float = field(
        default=0.2, metadata={"help": "share of the steps over which the target is ramped in"}
    )
    droprate_init: float = field(default=0.01, metadata={"help": "initial P(gate = 0)"})
    init: str = field(
        default="droprate",
        metadata={
            "help": "droprate (every gate starts at droprate_init) | saliency (head, KV group "
            "and FFN gates start ranked by second-order saliency, search's Phi)"
        },
    )
    distill: float = field(
        default=0.0, metadata={"help": "weight of a KL term to the dense model (0: CE only)"}
    )
    # --init saliency: the first N train windows of every domain feed the saliency pass, whose
    # Hessians get percdamp (search's and slimgpt's dampening, 1% of the mean diagonal)
    saliency_windows: int = 8
    percdamp: float = 0.01
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.prune_steps < 1:
            raise ValueError(f"prune_steps {self.prune_steps} must be >= 1")
        if not 0.0 <= self.target_warmup <= 1.0 or self.distill < 0:
            raise ValueError("target_warmup must be in [0, 1] and distill >= 0")
        if self.init not in ("droprate", "saliency"):
            raise ValueError(f"init must be droprate or saliency, got {self.init!r}")
        if self.saliency_windows < 1 or self.percdamp < 0:
            raise ValueError("saliency_windows must be >= 1 and percdamp >= 0")


# ---- target shapes ----------------------------------------------------------------------
def parse_target(text: str, source: Shape) -> Shape:
    """`hidden=...,layers=...` (missing keys keep the source's) or a config.json path."""
    if text.endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--target {text}: no such file")
        cfg = read_json(path)
        given = {field: cfg[key] for field, key in _CONFIG_KEYS.items() if key in cfg}
    else:
        given = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in _CONFIG_KEYS or not value.strip().isdigit():
                raise ValueError(
                    f"--target item {item!r} is not KEY=INT, KEY one of {', '.join(_CONFIG_KEYS)}"
                )
            given[key.strip()] = int(value)
    shape = replace(source, **given)
    shape.check_within(source)
    return shape


def source_shape(config) -> Shape:
    """The dense shape a HF config describes (no weights needed: checks before loading)."""
    widths = {field: getattr(config, key, None) for field, key in _CONFIG_KEYS.items()}
    widths["kv_heads"] = widths["kv_heads"] or widths["heads"]  # MHA configs may omit it
    return Shape(**widths)


def shape_for_ratio(ratio: float, geometry: Geometry) -> Shape:
    """The named shape rule: scale hidden, query heads and FFN width by one factor (layers and
    KV groups kept, heads a multiple of the KV groups, hidden a multiple of the heads), the
    factor chosen so the decoder parameters come closest to (1 - ratio) of the source's.
    Sheared-LLaMA's 7B -> 2.7B target has this form (x0.625 on hidden, heads and FFN)."""
    src = geometry.shape
    want = (1.0 - ratio) * geometry.size(src)
    best = None
    for i in range(1, 401):
        f = i / 400
        kv = src.kv_heads
        heads = min(src.heads, max(kv, kv * round(src.heads * f / kv)))
        hidden = min(src.hidden, max(heads, heads * round(src.hidden * f / heads)))
        shape = Shape(hidden, src.layers, heads, kv, max(1, round(src.ffn * f)))
        gap = abs(geometry.size(shape) - want)
        if best is None or gap < best[0]:
            best = (gap, shape)
    return best[1]


def resolve_target(cfg: ShearedConfig, geometry: Geometry, config=None) -> Shape:
    """The target shape; with the model's `config`, also checked against the family's
    config validators (the pruned model must save as a stock checkpoint)."""
    shape = parse_target(cfg.target, geometry.shape) if cfg.target else None
    shape = shape or shape_for_ratio(cfg.ratio, geometry)
    if config is not None:
        check_config_accepts(config, shape)
    return shape


def check_config_accepts(config, shape: Shape) -> None:
    """ValueError when the family's config class refuses the target (LlamaConfig: hidden
    must be a multiple of the query heads, even with an explicit head_dim)."""
    values = {key: getattr(shape, field) for field, key in _CONFIG_KEYS.items()}
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):  # per-layer lists shrink with the layers (Qwen2/3)
        values["layer_types"] = types[: shape.layers]
    try:
        type(config).from_dict({**config.to_dict(), **values})
    except Exception as err:  # noqa: BLE001  (strict-dataclass validators raise several types)
        cause = getattr(err, "__cause__", None) or err
        raise ValueError(
            f"target {vars(shape)}: {type(config).__name__} refuses it ({cause})"
        ) from None


# ---- the pruning-stage objective ---------------------------------------------------------
class ShearingObjective(nn.Module):
    """CE under sampled gates + the Lagrangian (+ optional distillation); see trainer.py."""

    def __init__(self, model, masks: ShearedMasks, target: Shape, cfg: ShearedConfig, teacher=None):
        super().__init__()
        self.model, self.masks, self.target, self.cfg = model, masks, target, cfg
        object.__setattr__(self, "teacher", teacher)  # frozen, not trained, not in DDP
        self.target_params = masks.geometry.size(target)
        self.ramp_steps = max(1, round(cfg.target_warmup * cfg.prune_steps))

    def forward(self, ids: torch.Tensor, step: int | None = None):
        adapter = get_adapter(self.model)
        if step is None:  # eval: the final masks of the target shape
            with torch.no_grad(), gated(adapter, _to(self.masks.final_gates(self.target), ids)):
                return sequence_losses(self.model(ids).logits, ids)
        noise = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + 1_000_000_007)
        with gated(adapter, self.masks.sample(noise)):
            logits = self.model(ids).logits
        ce = token_loss(logits, ids)
        p = self.masks.keep_probs()
        ramp = min(1.0, (step + 1) / self.ramp_steps)
        lagrangian = self.masks.lagrangian(self.masks.kept_fractions(p), self.target, ramp)
        loss = ce + lagrangian
        metrics = {"ce": _num(ce), "lagrangian": _num(lagrangian)}
        if self.cfg.distill > 0:
            kl = _kl(self.teacher, logits, ids)
            loss = loss + self.cfg.distill * kl
            metrics["kl"] = _num(kl)
        expected = float(self.masks.expected_size(p).detach())
        metrics["size_vs_target"] = round(expected / self.target_params, 4)
        lambdas = {name: lam.detach().tolist() for name, lam in self.masks.lambdas.items()}
        metrics["lambda_1"] = round(sum(v[0] for v in lambdas.values()), 3)  # the bar's summary
        metrics["lambdas"] = {name: [round(x, 4) for x in v] for name, v in lambdas.items()}
        return loss, metrics

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        return [
            {"params": list(self.model.parameters()), "lr": self.cfg.weight_lr},
            {"params": self.masks.mask_parameters(), "lr": self.cfg.mask_lr, "weight_decay": 0.0},
            {
                "params": list(self.masks.lambdas.parameters()),
                "lr": self.cfg.lambda_lr,
                "weight_decay": 0.0,
                "maximize": True,
            },
        ]

    def after_step(self, step: int) -> None:
        self.masks.clamp_()

    def shard_units(self) -> list[nn.Module]:
        return list(get_adapter(self.model).layers())


def _num(t: torch.Tensor) -> float:
    return round(float(t.detach()), 4)


def _to(z: dict, like: torch.Tensor) -> dict:
    return {k: v.to(like.device) for k, v in z.items()}


def _kl(teacher, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = torch.log_softmax(teacher(ids).logits.float(), -1)
    student = torch.log_softmax(logits.float(), -1)
    return nn.functional.kl_div(
        student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
    )


# ---- the stage ---------------------------------------------------------------------------
def check_family(adapter) -> None:
    norms = adapter.hidden_norms(adapter.layers()[0])
    final = adapter.final_norm()
    if (
        not adapter.causal_lm
        or final is None
        or len(norms) != 2
        or not all(hasattr(n, "variance_epsilon") for n in [final, *norms])
    ):
        raise ValueError(
            f"sheared needs a LLaMA-like decoder with RMSNorms (LLaMA, Mistral, Qwen2/3); "
            f"{adapter.family} is not one"
        )


def shear(
    model,
    domains: list[Domain],
    mixture: Mixture,
    cfg: ShearedConfig,
    train_cfg: TrainConfig,
    state_dir=None,
    stop_after: int | None = None,
) -> tuple[nn.Module, PruningPlan | None, dict]:
    """The pruning stage on `domains`: returns (model with final gates folded in, the plan to
    slice it with, the training log). Under FSDP the model returned is a new object. With
    stop_after (tests) the run stops like a killed one and the plan is None."""
    adapter = get_adapter(model)
    check_family(adapter)
    geometry = Geometry.of(adapter)
    target = resolve_target(cfg, geometry, model.config)  # refused shapes fail before training
    masks = ShearedMasks(geometry, cfg.droprate_init, cfg.seed)
    if cfg.init == "saliency":
        saliency_init(
            masks,
            model,
            adapter,
            torch.cat([d.train[: cfg.saliency_windows] for d in domains]),
            cfg,
        )
    teacher = None
    if cfg.distill > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False).to(cfg.device)
    objective = ShearingObjective(model, masks, target, cfg, teacher)
    objective, log = train(
        objective, domains, mixture, train_cfg, cfg.device, state_dir, "shear", stop_after
    )
    if stop_after is not None:
        return objective.model, None, log
    model, masks = objective.model, objective.masks
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # an FSDP gather into a fresh copy can leave them as two tensors
    z = masks.final_gates(target)
    fold_gates(get_adapter(model), _to(z, next(model.parameters())))
    plan = plan_from_gates(z)
    plan.target_ratio = (
        cfg.ratio if not cfg.target else 1 - geometry.size(target) / geometry.size(geometry.shape)
    )
    plan.info = {
        "target_shape": vars(target),
        "target_params": geometry.size(target),
        "prune_steps": train_cfg.steps,
        "final_lambdas": {k: v.tolist() for k, v in masks.lambdas.items()},
        "expected_size_end": float(masks.expected_size(masks.keep_probs()).detach()),
        "prune_wall_s": log["wall_s"],
    }
    return model, plan, log


SALIENCY_SPREAD = 2.0  # log_alpha range of a family's ranks: all gates start nearly open


@torch.no_grad()
def saliency_init(masks: ShearedMasks, model, adapter, tokens: torch.Tensor, cfg) -> None:
    """Start each layer's head, KV-group and FFN gates ranked by saliency (one dense pass,
    saliency.py): log_alpha = start - SPREAD * (1 - rank quantile), so the least salient unit
    starts at start - 2 (P(z != 0) still ~0.985) and the Lagrangian, which pushes every gate
    of a family alike, closes the least salient first. Hidden and layer gates keep the
    droprate start (no per-dimension saliency here). Replaces the start's tie-breaking
    noise, which is as large as the gap between neighbouring ranks."""
    from ..saliency import dense_pass

    stats, _ = dense_pass(
        model,
        adapter,
        tokens,
        cfg.percdamp,
        tokens.shape[1],
        "sheared: saliency",
        device=cfg.device,
    )
    start = math.log(1 - cfg.droprate_init) - math.log(cfg.droprate_init)
    for i, st in enumerate(stats):
        for family, scores in (
            ("head", st.space.head_scores),
            ("kv", st.space.kv_scores),
            ("ffn", st.space.channel_scores),
        ):
            log_alpha = masks.gates[family].log_alpha
            ranks = torch.tensor(scores).argsort().argsort().float()
            quantile = ranks / max(1, len(scores) - 1)
            log_alpha[i] = start - SALIENCY_SPREAD * (1 - quantile).to(log_alpha)


def calibration_domain(tokens: torch.Tensor) -> list[Domain]:
    """The calibration windows as one domain; the last eighth (at least one window) held
    in for the start and end evaluations."""
    held = max(1, len(tokens) // 8)
    if len(tokens) < 2:
        raise ValueError("sheared needs at least 2 calibration samples (one is held in)")
    return [Domain("calibration", tokens[:-held], tokens[-held:])]


def prune(model, tokens: torch.Tensor, cfg: ShearedConfig, adapter=None) -> PruningPlan:
    """`slimops prune --method sheared`: the pruning stage trained on the calibration
    windows (one domain; `slimops train` adds domains and continued pretraining)."""
    domains = calibration_domain(tokens)
    train_cfg = TrainConfig(
        steps=cfg.prune_steps,
        batch_size=cfg.batch_size,
        lr=cfg.weight_lr,
        warmup_steps=max(1, cfg.prune_steps // 10),
        eval_interval=cfg.prune_steps,
        seed=cfg.seed,
    )
    out, plan, _ = shear(model, domains, Mixture.make(domains), cfg, train_cfg)
    assert out is model  # no FSDP here: the caller's model was trained in place
    return plan
