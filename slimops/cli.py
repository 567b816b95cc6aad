"""`slimops prune | eval | bench | export | demo | train` (examples: docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .cli_export import add_export_parser, cmd_export
from .cli_train import add_train_parser, cmd_train
from .methods import METHODS

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    OSError,
    FloatingPointError,
    ImportError,
)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a HF causal LM and save the smaller checkpoint")
    p.add_argument("model", help="local HF model folder, hub id or .gguf file")
    p.add_argument(
        "--gguf-file",
        help="the GGUF file inside the MODEL folder (same as giving MODEL/NAME); its weights "
        "are de-quantised to --dtype",
    )
    p.add_argument(
        "--method",
        default="slimgpt",
        choices=list(METHODS),
        help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()),
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=0.2,
        help="share of decoder-layer parameters to remove, in (0, 1)",
    )
    p.add_argument(
        "--schedule",
        default=None,
        help="per-layer ratios: log | linear | uniform | obs (slimgpt: from OBS error curves) "
        "| comma-separated list (default: log for slimgpt, uniform for the baselines; flap "
        "and search choose their own)",
    )
    p.add_argument(
        "--calib",
        default="wikitext2",
        help="wikitext2 | c4 | a text file | a folder of text files | ids.pt",
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--align",
        type=int,
        default=None,
        help="slimgpt: keep every layer's FFN width a multiple of N and whole KV "
        "groups (default per device: off on CPU, 64 on CUDA; see docs/cli.md); "
        "search: the FFN width step",
    )
    p.add_argument("--json", help="also write the prune report as JSON here")
    p.add_argument(
        "--stream",
        action="store_true",
        help="for models larger than memory: read one layer at a time from the safetensors "
        "shards and write the pruned checkpoint layer by layer (slimgpt, formula schedules)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="save progress after every layer in OUT.progress/ and continue from it if a "
        "killed run left one (same settings; slimgpt)",
    )
    _add_method_options(
        p.add_argument_group(
            "method options (each method takes its own; unset: the method's default)"
        )
    )


SEARCH_PLOT = "search_pareto.png"
# Options the CLI defines itself (above), not generated from the method configs.
_OWN_OPTIONS = ("align", "seed")


def _add_method_options(group) -> None:
    """One flag per method config field (slimops.methods.option_fields)."""
    import dataclasses

    from .methods import METHODS, option_fields

    for name, f in option_fields().items():
        if name in _OWN_OPTIONS:
            continue
        owners = ", ".join(m for m, meth in METHODS.items() if name in meth.options())
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} ({owners}; default {default})".lstrip()
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = type(default) if default is not None else float
            group.add_argument(flag, type=kind, default=None, help=text)


# Perplexity options: None in argparse so that giving one together with --tasks is caught.
_EVAL_DEFAULTS = {"data": "wikitext2", "seqlen": 128}
_PPL_ONLY = ("data", "seqlen", "max_windows")
_ZEROSHOT_ONLY = ("num_fewshot", "limit", "include_path")


def _add_eval(sub) -> None:
    from .evaluation.zeroshot import PAPER_TASKS  # lm_eval itself is imported only to run

    p = sub.add_parser(
        "eval",
        help="perplexity and parameter count of a model, or zero-shot accuracy (--tasks)",
        description="Without --tasks: perplexity over non-overlapping windows of --data. "
        "With --tasks: zero-shot accuracy through lm-evaluation-harness (pip install "
        "'slimops[eval]'), e.g. --tasks " + ",".join(PAPER_TASKS) + " (the pruning papers' set).",
    )
    p.add_argument("model", help="HF causal-LM folder, hub id or slimops checkpoint")
    ppl = p.add_argument_group("perplexity (without --tasks)")
    ppl.add_argument(
        "--data",
        default=None,
        help="wikitext2 | c4 (test split) | a text file | a folder of text files "
        f"(default {_EVAL_DEFAULTS['data']})",
    )
    ppl.add_argument("--seqlen", type=int, default=None, help=f"default {_EVAL_DEFAULTS['seqlen']}")
    ppl.add_argument("--max-windows", type=int, default=None, help="score only this many windows")
    zs = p.add_argument_group("zero-shot (lm-evaluation-harness)")
    zs.add_argument("--tasks", help="comma-separated lm_eval task names, e.g. boolq,piqa")
    zs.add_argument("--num-fewshot", type=int, default=None, help="default: each task's (0)")
    zs.add_argument(
        "--limit", type=int, default=None, help="score only this many examples per task"
    )
    zs.add_argument(
        "--include-path",
        action="append",
        help="a folder (or YAML file) of extra lm_eval task configs; repeatable",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--json", help="write {ppl, params, ...} or the zero-shot results here")


_BENCH_DESCRIPTION = (
    "Benchmark models side by side through HF generate (greedy, exactly --gen new tokens, "
    "static KV cache where the model supports it). The last line is 'speedup decode X prefill "
    "Y': the LAST model's median tok/s over the FIRST model's, at the FIRST --batch and FIRST "
    "--prompt value."
)


def _add_bench(sub) -> None:
    about = "prefill/decode tok/s, TTFT, peak memory, params, MACs of models"
    p = sub.add_parser("bench", help=about, description=_BENCH_DESCRIPTION)
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="HF causal-LM folders or slimops checkpoints (--engine llama.cpp: .gguf files); "
        "dense first, pruned last",
    )
    p.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "llama.cpp"],
        help="torch: HF generate on MODEL folders; llama.cpp: .gguf files through "
        "llama-cpp-python (batch 1, the first --prompt, --gen, --threads)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads (default: all cores)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes")
    p.add_argument("--prompt", type=int, nargs="+", default=[128], help="prompt lengths")
    p.add_argument("--gen", type=int, default=128, help="new tokens per generate (>= 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per shape")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per shape")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the forward (CUDA graphs on GPU; mainly for GPU)",
    )
    p.add_argument(
        "--no-static-cache",
        action="store_true",
        help="use the dynamic KV cache instead of the static one",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    p.add_argument("--json", help="write every raw repeat and the summary here")
    p.add_argument("--plot", help="write a PNG bar chart of prefill and decode tok/s here")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="prune the built-in reference model by 20%% and compare")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--out", help="also save the pruned checkpoint here")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--eval-windows",
        type=int,
        default=512,
        help="score this many 128-token windows of the shipped test text (at most 512)",
    )


def cmd_prune(args) -> None:
    from . import calibration, distributed, pipeline

    if args.gguf_file:  # one model path from here on: the .gguf file
        args.model = pipeline.resolve_model_path(args.model, args.gguf_file)
    schedule, options = _check_prune(args)  # every cheap check before any work
    distributed.init_from_env()  # under torchrun: join the group, calibrate on a share
    tokenizer = pipeline.load_tokenizer(args.model)  # calibration before weights:
    tokens = calibration.calibration_tokens(
        args.calib, tokenizer, args.nsamples, args.seqlen, args.seed
    )  # short data fails fast
    progress = _progress(args, options) if args.resume else None
    if args.stream:  # one layer in memory at a time, written to --out as it goes
        from .streaming import prune_streamed

        plan, report = prune_streamed(
            args.model,
            tokens,
            args.out,
            tokenizer,
            args.method,
            args.ratio,
            schedule,
            args.device,
            pipeline.DTYPES[args.dtype],
            args.overwrite,
            progress,
            **options,
        )
    else:
        model, _ = pipeline.load_model(args.model, args.dtype)
        plan, report = pipeline.prune_model(
            model, tokens, args.method, args.ratio, schedule, args.device, progress, **options
        )
    if distributed.is_main():  # every rank holds the same model: one writes it
        if not args.stream:
            _save_and_report(args, model, tokenizer, plan, report)
        else:
            _report(args, report)
        if progress is not None:
            progress.clear()  # the checkpoint is complete: the progress is not needed
    distributed.barrier()


def _progress(args, options):
    """--resume: the progress folder beside --out, tied to every setting of this run."""
    from .progress import Progress

    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "json")}
    folder = Path(args.out).with_name(Path(args.out).name + ".progress")
    progress = Progress(folder, {**settings, **options})
    if progress.done:
        print(f"resuming from {folder}: {progress.done} layers already pruned", file=sys.stderr)
    return progress


def _check_prune(args) -> tuple:
    """(schedule, method options) after the checks that need no model: options, ratio,
    family, --out, --calib."""
    from . import calibration
    from .loading import model_config
    from .methods import make_config
    from .schedules import parse_schedule

    schedule = None if args.schedule is None else parse_schedule(args.schedule)
    options = _method_options(args)
    cfg = make_config(args.method, args.ratio, schedule, args.device, **options)
    if args.stream:
        from .streaming import check_streamable

        check_streamable(args.method, cfg, args.model)
    if args.resume and not METHODS[args.method].resumable:
        resumable = ", ".join(n for n, m in METHODS.items() if m.resumable)
        raise ValueError(f"--resume is implemented for {resumable} only, not {args.method}")
    model_config(args.model)  # an unsupported family fails first
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (use --overwrite)")
    if args.calib not in calibration.HUB_DATASETS and not Path(args.calib).exists():
        raise FileNotFoundError(
            f"--calib {args.calib!r} is neither "
            f"{calibration.HUB_DATASETS} nor an existing file or folder"
        )
    return schedule, options


def _run_info(args, report) -> dict:
    return _report_dict(report) | {
        "model": args.model,
        "calib": args.calib,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
    }


def _report(args, report, extra_plot: bool = False) -> None:
    out = Path(args.out)
    print(report.summary())
    if extra_plot:
        print(f"search history and Pareto front: {out / 'slimops_plan.json'}, {out / SEARCH_PLOT}")
    print(f"saved to {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(_run_info(args, report), indent=2))


def _save_and_report(args, model, tokenizer, plan, report) -> None:
    from .checkpoint import save_pruned

    info = _run_info(args, report)
    extra = {}
    if "pareto_params" in plan.info:  # search: the Pareto front as a picture
        from .evaluation.search_report import pareto_png

        extra[SEARCH_PLOT] = pareto_png(plan.info)
    save_pruned(
        model.to("cpu"),
        args.out,
        tokenizer=tokenizer,
        plan=plan,
        extra_info=info,
        overwrite=args.overwrite,
        extra_files=extra,
    )
    _report(args, report, bool(extra))


def _method_options(args) -> dict:
    """The method options the user set (others keep the method's default), plus --align's
    per-device default and --seed for methods that take them."""
    from .methods import METHODS, option_fields

    options = {
        name: getattr(args, name)
        for name in option_fields()
        if name not in _OWN_OPTIONS and getattr(args, name) is not None
    }
    options["align"] = _align(args)
    if "seed" in METHODS[args.method].options():
        options["seed"] = args.seed
    return options


def _align(args) -> int | None:
    """--align as given, else the device default for methods that align (align.py)."""
    if args.align is not None or "align" not in METHODS[args.method].options():
        return args.align
    from .methods.align import default_align

    return default_align(args.device)


def _report_dict(report) -> dict:
    return asdict(report) | {
        "achieved_ratio": report.achieved_ratio,
        "total_ratio": report.total_ratio,
    }


def cmd_eval(args) -> None:
    _check_eval_options(args)
    if args.tasks:
        _eval_zeroshot(args)
    else:
        _eval_perplexity(args)


def _check_eval_options(args) -> None:
    """Options of the other mode are refused rather than silently ignored."""
    wrong = _PPL_ONLY if args.tasks else _ZEROSHOT_ONLY
    given = ["--" + name.replace("_", "-") for name in wrong if getattr(args, name) is not None]
    if given:
        mode, other = ("perplexity", "--tasks") if args.tasks else ("--tasks", "perplexity")
        raise ValueError(f"{', '.join(given)}: only for {mode} evaluation, not {other}")


def _eval_perplexity(args) -> None:
    from . import calibration, pipeline
    from .evaluation.perplexity import perplexity
    from .models import get_adapter

    data = args.data if args.data is not None else _EVAL_DEFAULTS["data"]
    seqlen = args.seqlen if args.seqlen is not None else _EVAL_DEFAULTS["seqlen"]
    model, tokenizer = pipeline.load_model(args.model, args.dtype)
    split = "test" if data in calibration.HUB_DATASETS else "train"
    ids = calibration.tokenize(calibration.load_text(data, split), tokenizer)
    model.to(args.device)
    ppl = perplexity(model, ids, seqlen, args.batch_size, max_windows=args.max_windows)
    adapter = get_adapter(model)
    result = {
        "ppl": ppl,
        "params": adapter.total_params(),
        "decoder_params": adapter.decoder_params(),
        "seqlen": seqlen,
        "tokens": int(ids.numel()),
        "data": data,
        "model": args.model,
    }
    print(
        f"ppl {ppl:.3f}  params {result['params']:,}  ({result['tokens']:,} tokens, "
        f"seqlen {seqlen})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _eval_zeroshot(args) -> None:
    from . import pipeline
    from .evaluation import zeroshot
    from .models import get_adapter

    lm_eval = zeroshot.require_lm_eval()  # the missing extra, then bad names: before loading
    tasks = zeroshot.parse_tasks(args.tasks)
    manager = zeroshot.task_manager(tasks, args.include_path)
    model, tokenizer = pipeline.load_model(args.model, args.dtype)
    model.to(args.device)
    raw = zeroshot.evaluate(
        model, tokenizer, tasks, manager, args.num_fewshot, args.limit, args.batch_size
    )
    summary = zeroshot.summarize(raw)
    print(zeroshot.markdown(summary))
    if args.json:
        result = summary | {
            "model": args.model,
            "params": get_adapter(model).total_params(),
            "num_fewshot": args.num_fewshot,
            "limit": args.limit,
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "lm_eval": raw,
        }
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


def cmd_bench_llamacpp(args) -> None:
    import os

    from .evaluation.llamacpp import EngineBench, engine_table, run_engine_bench

    for path in args.models:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--engine llama.cpp takes .gguf files; {path} is not a file")
    settings = EngineBench(
        threads=args.threads or os.cpu_count(),
        prompt=args.prompt[0],
        gen=args.gen,
        repeats=args.repeats,
        seed=args.seed,
    )
    result = run_engine_bench(args.models, settings)
    print(engine_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    last = result["rows"][-1]
    # the same last line as the torch engine's (evaluation.report.speedup_line)
    print(f"speedup decode {last['decode_x']:.2f} prefill {last['prefill_x']:.2f}")


def cmd_bench(args) -> None:
    if args.engine == "llama.cpp":
        return cmd_bench_llamacpp(args)
    from .evaluation import report as bench_report
    from .evaluation.throughput import BenchSettings, run_bench

    settings = BenchSettings(
        device=args.device,
        dtype=args.dtype,
        batches=args.batch,
        prompts=args.prompt,
        gen=args.gen,
        repeats=args.repeats,
        warmup=args.warmup,
        compile=args.compile,
        static_cache=not args.no_static_cache,
        seed=args.seed,
    )
    if args.plot:  # fail before the (long) run, not after it
        import matplotlib  # noqa: F401
    result = run_bench(args.models, settings)
    for note in result["notes"]:
        print(f"note: {note}")
    print(bench_report.markdown_table(result))
    print()
    print(bench_report.footnotes(result))
    if args.json:
        print(f"wrote {bench_report.write_json(result, args.json)}")
    if args.plot:
        print(f"wrote {bench_report.write_plot(result, args.plot)}")
    print(bench_report.speedup_line(result))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(ratio=args.ratio, out=args.out, device=args.device, eval_windows=args.eval_windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_bench(sub)
    add_export_parser(sub)
    _add_demo(sub)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    commands = {"prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo}
    try:
        {**commands, "train": cmd_train, "export": cmd_export}[args.command](args)
    except USER_ERRORS as err:
        print(f"slimops {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
