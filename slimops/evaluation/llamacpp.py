"""Run GGUF files in llama.cpp itself (through llama-cpp-python, the binding users use):
next-token logits, llama-perplexity's perplexity protocol, and prefill/decode throughput.

The same perplexity protocol runs in transformers (`hf_perplexity`), so a pruned export's
llama.cpp perplexity ratio can be compared with the ratio slimops measures: llama-perplexity
cuts the tokens into chunks of n_ctx and scores only the second half of each chunk (every
scored token sees at least n_ctx/2 of context). Scoring whole windows, as `slimops eval`
does, gives 3-4% different numbers (docs/serving.md), which looks like an export bug.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


def require_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        raise ImportError(
            "running a GGUF in llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
            "(it builds llama.cpp from source, ~10 minutes on 2 cores)"
        )
    import llama_cpp

    return llama_cpp


def open_gguf(path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = False):
    """A llama_cpp.Llama on `path` (CPU, quiet); a clear error when llama.cpp refuses it."""
    llama_cpp = require_llama_cpp()
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )
    except ValueError as exc:  # llama.cpp's loader failed (its reason goes to stderr)
        raise ValueError(f"llama.cpp cannot load {path}: {exc}") from None


def logits(path, ids: list[int], threads: int | None = None) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (float32, len(ids) x vocab)."""
    llm = open_gguf(path, n_ctx=max(len(ids), 8), threads=threads, logits_all=True)
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenize(path, text: str, add_bos: bool = False) -> list[int]:
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=add_bos, special=False)


# --- perplexity (llama-perplexity's protocol) -----------------------------------------------


def chunks(ids: torch.Tensor, n_ctx: int, max_chunks: int | None = None) -> torch.Tensor:
    """(n_chunks, n_ctx) consecutive token chunks of a 1-D id tensor."""
    n = ids.numel() // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens: fewer than one chunk of n_ctx={n_ctx}")
    return ids[: n * n_ctx].view(n, n_ctx)


def _second_half_nll(chunk_logits: torch.Tensor, chunk: torch.Tensor) -> tuple[float, int]:
    first = chunk.numel() // 2
    logp = torch.log_softmax(chunk_logits[first:-1].double(), dim=-1)
    return -logp.gather(1, chunk[first + 1 :, None]).sum().item(), chunk.numel() - first - 1


def _perplexity(token_chunks: torch.Tensor, chunk_logits, desc: str) -> float:
    """exp(mean NLL) of the second halves; chunk_logits(chunk) -> (n_ctx, vocab) logits."""
    nll = count = 0
    for chunk in tqdm(token_chunks, desc=desc, unit="chunk"):
        a, b = _second_half_nll(chunk_logits(chunk), chunk)
        nll, count = nll + a, count + b
    return math.exp(nll / count)


def gguf_perplexity(path, token_chunks: torch.Tensor, threads: int | None = None) -> float:
    llm = open_gguf(path, n_ctx=token_chunks.shape[1], threads=threads, logits_all=True)

    def chunk_logits(chunk):
        llm.reset()
        llm.eval(chunk.tolist())
        return torch.from_numpy(np.array(llm.scores[: chunk.numel()]))

    return _perplexity(token_chunks, chunk_logits, "llama.cpp ppl")


@torch.no_grad()
def hf_perplexity(model, token_chunks: torch.Tensor) -> float:
    def chunk_logits(chunk):
        return model(chunk[None].to(model.device)).logits[0].float().cpu()

    return _perplexity(token_chunks, chunk_logits, "transformers ppl")


# --- throughput ----------------------------------------------------------------------------


@dataclass
class EngineBench:
    """llama.cpp throughput settings (one thread count, prompt and generation for all files)."""

    threads: int = 2
    prompt: int = 128
    gen: int = 64
    repeats: int = 3
    seed: int = 0


def _time_once(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    start = time.perf_counter()
    for _ in range(gen):  # one token a step: decode as a server runs it (greedy)
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill, time.perf_counter() - start


def run_engine_bench(paths: list, s: EngineBench) -> dict:
    """Every file in the same run and settings, ratios against the FIRST (the dense one).

    The files take turns, one timed round each per repeat (round-robin), so a slow spell of a
    shared machine hits every file alike instead of whichever was being measured then.
    """
    models = [open_gguf(p, n_ctx=s.prompt + s.gen + 8, threads=s.threads) for p in paths]
    rng = np.random.default_rng(s.seed)
    prompt = rng.integers(0, min(m.n_vocab() for m in models), s.prompt).tolist()
    for llm in models:  # warm-up: page the weights in, size the buffers
        _time_once(llm, prompt, min(s.gen, 4))
    times = [[] for _ in models]
    for _ in tqdm(range(s.repeats), desc="llama.cpp bench", unit="round"):
        for llm, mine in zip(models, times):
            mine.append(_time_once(llm, prompt, s.gen))
    rows = []
    for path, mine in zip(paths, times):
        prefill = statistics.median(t[0] for t in mine)
        decode = statistics.median(t[1] for t in mine)
        rows.append({
            "model": str(path),
            "bytes": os.path.getsize(path),
            "prefill_tok_s": s.prompt / prefill,
            "decode_tok_s": s.gen / decode,
            "raw_seconds": mine,
        })  # fmt: skip
    for row in rows:
        row["prefill_x"] = row["prefill_tok_s"] / rows[0]["prefill_tok_s"]
        row["decode_x"] = row["decode_tok_s"] / rows[0]["decode_tok_s"]
        row["size_x"] = row["bytes"] / rows[0]["bytes"]
    return {"engine": "llama.cpp", "settings": asdict(s), "rows": rows}


def engine_table(result: dict) -> str:
    lines = [
        "| model | MiB | prefill tok/s | decode tok/s | size x | prefill x | decode x |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['bytes'] / 2**20:.1f} | {r['prefill_tok_s']:.1f} | "
            f"{r['decode_tok_s']:.1f} | {r['size_x']:.3f} | {r['prefill_x']:.2f} | "
            f"{r['decode_x']:.2f} |"
        )
    return "\n".join(lines)
