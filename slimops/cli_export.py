"""`slimops export MODEL --to gguf --out FILE.gguf [--dtype f32|f16|bf16|q8_0]`."""

from __future__ import annotations

import json
from pathlib import Path

from .export import DTYPE_NAMES


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model (pruned or dense) as a GGUF file for llama.cpp",
        description="Write MODEL (a slimops checkpoint, a HF folder, a hub id or a .gguf) as "
        "one GGUF file llama.cpp runs: its family's own architecture when every layer has "
        "one shape, llama.cpp's per-layer `deci` graph otherwise (docs/serving.md).",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--to", default="gguf", choices=["gguf"], help="the format (gguf)")
    p.add_argument("--out", required=True, help="the .gguf file to write (its folder must exist)")
    p.add_argument(
        "--dtype",
        default="f16",
        choices=DTYPE_NAMES,
        help="matrix type; norms and biases stay f32; q8_0 keeps matrices whose row length is "
        "not a multiple of 32 in f16 and lists them (prune with --align 32 --no-whole-kv-groups "
        "to avoid that)",
    )
    p.add_argument(
        "--tokenizer-from",
        metavar="FILE.gguf",
        help="copy the tokenizer of this .gguf verbatim (default: MODEL itself when it is a "
        ".gguf, else built from its tokenizer.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")


def format_report(report: dict) -> str:
    widths = report["written_layers"]
    uniform = all(w == widths[0] for w in widths)
    shapes = (
        f"{len(widths)} layers x (heads, kv, ffn) {tuple(widths[0])}"
        if uniform
        else f"{len(widths)} layers (heads, kv, ffn): " + ", ".join(str(tuple(w)) for w in widths)
    )
    types = ", ".join(f"{n} {k}" for k, n in sorted(report["tensor_types"].items()))
    lines = [
        f"wrote {report['file']} ({report['bytes'] / 2**20:.1f} MiB)",
        f"  architecture {report['arch']}, {shapes}",
        f"  tensors: {types}; tokenizer pre-tokenizer {report['tokenizer_pre']!r}",
    ]
    if report["f16_fallback"]:
        lines.append(
            f"  {len(report['f16_fallback'])} matrices kept in f16 (row length not a multiple "
            f"of the {report['dtype']} block): {', '.join(report['f16_fallback'][:6])}"
            + (" ..." if len(report["f16_fallback"]) > 6 else "")
        )
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def cmd_export(args) -> None:
    from .export import export_gguf

    if args.report and not Path(args.report).parent.is_dir():  # fail before the export
        raise FileNotFoundError(f"--report {args.report}: its folder does not exist")
    report = export_gguf(
        args.model,
        args.out,
        dtype=args.dtype,
        tokenizer_from=args.tokenizer_from,
        overwrite=args.overwrite,
    )
    print(format_report(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.report}")
