"""`slimops train`: the command line of Sheared-LLaMA's two stages (slimops/train.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

TRAIN_LOG, WEIGHTS_PLOT = "slimops_train_log.json", "domain_weights.png"
# ShearedConfig fields that are not --flags of `train` (train has its own batch/seed/device).
_NOT_FLAGS = ("ratio", "schedule", "device", "batch_size", "offload", "seed")


def add_train_parser(sub) -> None:
    from .methods.sheared.method import ShearedConfig

    p = sub.add_parser(
        "train",
        help="Sheared-LLaMA: learn masks to a target shape, slice, continue pretraining "
        "with dynamic batch loading over text domains",
    )
    p.add_argument("model", help="local HF model folder, hub id or .gguf file")
    p.add_argument(
        "--domains",
        required=True,
        help="name=folder,... or one folder whose sub-folders are the domains",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="without --target: share of "
        "decoder parameters to remove (the shape rule of --target's help)",
    )
    group = p.add_argument_group("pruning stage (--prune-steps 0: continued pretraining only)")
    for f in dataclasses.fields(ShearedConfig):
        if f.name not in _NOT_FLAGS:
            kind = type(f.default)
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                type=kind,
                default=f.default,
                help=f"{f.metadata.get('help', '')} (default {f.default or 'none'})",
            )
    g = p.add_argument_group("continued pretraining and data")
    g.add_argument("--steps", type=int, default=100, help="continued-pretraining steps")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per step, all ranks")
    g.add_argument("--seqlen", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-4, help="continued-pretraining peak lr")
    g.add_argument("--warmup-steps", type=int, default=10, help="lr warm-up of each stage")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=50,
        help="evaluate each domain and update the weights every N steps",
    )
    g.add_argument(
        "--save-interval",
        type=int,
        default=0,
        help="resumable state every N steps (0: at every evaluation)",
    )
    g.add_argument(
        "--valid-windows",
        type=int,
        default=8,
        help="held-in validation windows per domain (the end of its train text)",
    )
    g.add_argument("--mixture", choices=["dynamic", "static"], default="dynamic")
    g.add_argument("--init-weights", choices=["uniform", "tokens"], default="uniform")
    g.add_argument(
        "--ref-losses",
        default="source",
        help="reference loss per domain: source (the model's own, measured "
        "before pruning) or name=loss,...",
    )
    g.add_argument(
        "--no-clip",
        action="store_true",
        help="do not clip the excess loss at 0 (the official code's behaviour)",
    )
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP instead of DDP")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run from OUT.progress/ (same settings)",
    )
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", help="also write the training log here")


def _configs(args):
    from .methods.sheared.method import ShearedConfig
    from .train import MixtureOptions
    from .trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(ShearedConfig) if f.name not in _NOT_FLAGS}
    shear_cfg = None  # --prune-steps 0: continued pretraining only
    if args.prune_steps != 0:
        shear_cfg = ShearedConfig(
            ratio=args.ratio,
            device=args.device,
            batch_size=args.batch_size,
            seed=args.seed,
            **{name: getattr(args, name) for name in fields},
        )
    cpt = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        eval_interval=args.eval_interval,
        save_interval=args.save_interval,
        seed=args.seed,
        fsdp=args.fsdp,
    )
    mixture = MixtureOptions(
        args.mixture == "dynamic", args.init_weights, args.ref_losses, clip=not args.no_clip
    )
    return shear_cfg, cpt, mixture


def _check_target(config, shear_cfg) -> None:
    """--target against the model's config, before any weights are read."""
    from .methods.sheared.method import check_config_accepts, parse_target, source_shape

    if shear_cfg is None or not shear_cfg.target:
        return
    check_config_accepts(config, parse_target(shear_cfg.target, source_shape(config)))


def _progress_folder(args) -> Path:
    """OUT.progress/, tied to every setting of this run: a folder a run with other settings
    left is refused, not mixed in (the prune command's --resume does the same)."""
    from .run_state import RunState

    out = Path(args.out)
    folder = out.with_name(out.name + ".progress")
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "json")}
    RunState(folder, settings).claim()
    return folder


def cmd_train(args) -> None:
    from . import distributed, pipeline, train
    from .checkpoint import save_pruned
    from .domains import load_domains
    from .evaluation.training_report import weights_png
    from .loading import model_config

    shear_cfg, cpt, mixture = _configs(args)  # every cheap check first
    _check_target(model_config(args.model), shear_cfg)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (use --overwrite)")
    distributed.init_from_env()
    progress = _progress_folder(args) if args.resume else None  # a stale folder fails here
    tokenizer = pipeline.load_tokenizer(args.model)
    domains = load_domains(args.domains, tokenizer, args.seqlen, args.valid_windows)
    train.say(f"domains: {', '.join(f'{d.name} ({len(d.train)} windows)' for d in domains)}")
    model, _ = pipeline.load_model(args.model, args.dtype)

    model, plan, log = train.shear_and_train(
        model, domains, shear_cfg, cpt, mixture, args.device, progress, tokenizer
    )
    log["argv"] = {k: v for k, v in vars(args).items() if k != "func"}
    if distributed.is_main():
        text = json.dumps(log, indent=1, default=str)
        files = {TRAIN_LOG: text.encode(), WEIGHTS_PLOT: weights_png(log)}
        save_pruned(
            model.to("cpu"),
            out,
            tokenizer,
            plan,
            extra_info={"train": log["argv"]},
            overwrite=args.overwrite,
            extra_files=files,
        )
        if args.json:
            Path(args.json).write_text(text)
        print(train.summary(log, model))
        print(f"saved to {out} (log {TRAIN_LOG}, domain weights {WEIGHTS_PLOT})")
    train.clear_progress(progress)
    distributed.barrier()
