"""Inference speed of dense and pruned models: prefill / decode tokens per second, time to
first token, peak memory, parameters and MACs per token, through HF `generate`.

What each number is (the table and JSON use exactly these definitions):

- prefill tok/s = batch * prompt / (one forward over the prompt). The forward is what
  generate's prefill runs: `logits_to_keep=1` (only the last position's logits), no cache.
- TTFT = from calling `generate` to the first generated token being on the host: cache
  set-up, prefill, lm_head and the greedy pick of token 1.
- decode tok/s = batch * (gen - 1) / decode time. `generate` makes exactly `gen` tokens
  (greedy, min_new_tokens = max_new_tokens = gen); token 1 comes out of the prefill, the
  other gen - 1 out of one decode step each. A StoppingCriteria (StepClock) timestamps
  every token inside the SAME generate call, so decode time = t(token gen) - t(token 1)
  is timed directly, not as a difference of two separately noisy runs.
- peak MB: on CUDA torch.cuda.max_memory_allocated during generate (weights + KV cache +
  activations); on CPU the growth of the process's peak RSS during generate (KV cache +
  activations; the weights are already resident): VmHWM after writing "5" to
  /proc/self/clear_refs, minus VmRSS at the start, after malloc_trim returned freed heap.
- MACs/token (analytical, from the module shapes, so pruned per-layer widths count):
  sum over every nn.Linear of the decoder layers of in*out, plus lm_head in*out, plus
  attention 2 * n_query_heads(layer) * head_dim * context per layer (q.k scores and the
  weighted sum of values, each head_dim MACs per attended position). The table uses
  context = prompt (a token attending to `prompt` positions). Norms, rotary, softmax and
  the embedding lookup are not multiply-accumulates over weights and are left out.

Every (batch, prompt) runs `warmup` untimed rounds, then `repeats` timed rounds (prefill
forward + generate); the device is synchronised around every timestamp. Results are
median with min / max / IQR over the repeats.
"""

from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteriaList

from ..loading import DTYPES, load_model, model_config, resolve_model_path
from ..memory import reset_peak_rss, status_kb
from ..models import family_spec, get_adapter, stock_class
from .report import environment, stats


@dataclass
class BenchSettings:
    device: str = "cpu"
    dtype: str = "fp32"
    batches: list[int] = field(default_factory=lambda: [1])
    prompts: list[int] = field(default_factory=lambda: [128])
    gen: int = 128
    repeats: int = 5
    warmup: int = 1
    compile: bool = False
    static_cache: bool = True
    seed: int = 0

    def combos(self) -> list[tuple[int, int]]:
        """(batch, prompt) pairs in run order; the first is the speedup line's."""
        return [(b, p) for b in self.batches for p in self.prompts]


def check_settings(s: BenchSettings) -> list[str]:
    """Raise ValueError on bad settings before any model is loaded; return notes."""
    if s.dtype not in DTYPES:
        raise ValueError(f"--dtype {s.dtype!r}: choose one of {', '.join(DTYPES)}")
    for name, values in (("--batch", s.batches), ("--prompt", s.prompts)):
        if not values or min(values) < 1:
            raise ValueError(f"{name} values must be positive integers, got {values}")
    if s.gen < 2:
        raise ValueError(
            f"--gen {s.gen}: need at least 2 (token 1 comes from the prefill, "
            "decode tok/s needs at least one decode step)"
        )
    if s.repeats < 1 or s.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if s.compile and not s.static_cache:
        raise ValueError(
            "--compile needs the static KV cache (a growing dynamic cache changes "
            "shape every step and recompiles); drop --no-static-cache"
        )
    try:
        device = torch.device(s.device)
    except RuntimeError:
        device = None
    notes = []
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {s.device!r}: choose cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {s.device}: CUDA is not available here (CPU-only torch "
                "build or no visible GPU); use --device cpu"
            )
        if s.dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("--dtype bf16: this GPU has no bf16 support; use fp16")
    else:
        if s.dtype == "fp16":
            notes.append(
                "fp16 on CPU runs, but slowly (few CPUs have fp16 GEMMs); prefer fp32/bf16"
            )
        if s.compile:
            notes.append("--compile on CPU: torch.compile mainly pays off on GPU (CUDA graphs)")
    if s.compile and s.warmup == 0:
        notes.append("--compile with --warmup 0: the first timed round includes compilation")
    return notes


# ---- analytical size ---------------------------------------------------------------------
def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def macs_breakdown(model) -> dict:
    """{"linear": per-token MACs of every weight matrix, "attn_per_position": attention MACs
    per attended position}, read from the current module shapes (see module docstring)."""
    adapter = get_adapter(model)
    layers = adapter.layers()
    heads = [adapter.layer_shape(layer)[0] for layer in layers]
    lm_head = model.get_output_embeddings()
    return {
        "linear": sum(_linear_macs(layer) for layer in layers) + _linear_macs(lm_head),
        "attn_per_position": sum(2 * h * adapter.head_dim for h in heads),
        "query_heads": heads,
    }


def macs_per_token(model, context: int) -> int:
    """MACs to produce one token that attends to `context` positions."""
    b = macs_breakdown(model)
    return b["linear"] + b["attn_per_position"] * context


def model_info(model) -> dict:
    """Size and the code path generate will run (classes, not instances: the test compares
    dense and per-layer-shaped models on these)."""
    adapter = get_adapter(model)
    layers = adapter.layers()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "params": adapter.total_params(),
        "weights_mb": weights / 2**20,
        **macs_breakdown(model),
        "code_path": {
            "hf_class": stock_class(model).__qualname__,
            "generate": type(model).generate.__qualname__,
            "forward": type(model).forward.__qualname__,
            "layer": sorted({type(layer).__qualname__ for layer in layers}),
            "attention": sorted({type(adapter.attention(layer)).__qualname__ for layer in layers}),
        },
    }


# ---- timing and memory --------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A (duck-typed) StoppingCriteria that never stops, only timestamps every generated token.

    HF calls stopping criteria once per new token, after it is appended. On CUDA the sync
    here costs nothing extra: HF's own stop check reads `unfinished.max()` to the host
    every step anyway (transformers 5.23 defers that only on MPS).
    """

    def __init__(self, device: torch.device):
        self.device, self.stamps, self.never = device, [], None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.never is None:  # allocate once, outside the timed steps that follow
            self.never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.never


def _malloc_trim() -> None:
    """Give freed heap back to the OS so RSS at the start is live memory only (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the enclosed block in MB (see the module docstring for what)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        _malloc_trim()
        reset_peak_rss()  # not Linux / not permitted: nan below
        self.start_kb = status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = status_kb("VmHWM")
            if peak is not None and self.start_kb is not None:
                self.mb = max(peak - self.start_kb, 0) / 1024
        return False


def peak_memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during generate (weights + KV cache + activations)"
    return (
        "CPU peak RSS growth during generate (KV cache + activations; weights excluded): "
        "VmHWM after clear_refs minus VmRSS at the start"
    )


def random_prompt(vocab: int, batch: int, prompt: int, seed: int, device) -> torch.Tensor:
    """Fixed-seed token ids in [0, vocab): every model gets the same prompt."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)


def generation_config(model, gen: int, cache: str):
    """Greedy, exactly `gen` new tokens (min_new_tokens suppresses EOS until then), eager
    unless the forward itself was compiled (HF would otherwise auto-compile the decode step
    on GPU with a static cache, and dense vs pruned would compare compilers)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    pad = model.generation_config.pad_token_id
    first_eos = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=gen,
        min_new_tokens=gen,
        cache_implementation=cache,
        disable_compile=True,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else (first_eos or 0),
    )


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor) -> float:
    """Seconds for one forward over the prompt, as generate's prefill (last logits only)."""
    device = ids.device
    synchronize(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_generate(model, ids: torch.Tensor, gen_config) -> dict:
    """One generate call: TTFT, decode time (directly, via StepClock), generated count, peak."""
    # generate sizes a static cache to the longest call so far (a torch.compile aid); for
    # timing each shape must get a cache of exactly prompt + gen, so forget earlier calls.
    model.__dict__.pop("_previous_max_cache_length", None)
    clock = StepClock(ids.device)
    with PeakMemory(ids.device) as peak:
        synchronize(ids.device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=gen_config,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
        synchronize(ids.device)
        end = time.perf_counter()
    stamps = clock.stamps
    return {
        "ttft_s": stamps[0] - start,
        "decode_s": stamps[-1] - stamps[0],
        "total_s": end - start,
        "generated_tokens": int(out.shape[1] - ids.shape[1]),
        "steps_timed": len(stamps),
        "peak_mb": peak.mb,
    }


# ---- one model ----------------------------------------------------------------------------
def choose_cache(model, ids: torch.Tensor, want_static: bool) -> tuple[str, str | None]:
    """("static" | "dynamic", note). Static where a 2-token generate with it works."""
    if not want_static:
        return "dynamic", None
    try:
        time_generate(model, ids[:, :8], generation_config(model, 2, "static"))
        return "static", None
    except Exception as err:  # noqa: BLE001  (any family-specific refusal means: fall back)
        return "dynamic", (
            f"static KV cache failed for this model ({type(err).__name__}: "
            f"{err}); measured with the dynamic cache"
        )


def bench_combo(model, batch: int, prompt: int, s: BenchSettings, cache: str) -> dict:
    """Warm-up, then `repeats` timed rounds of (prefill forward, generate) for one shape."""
    device = torch.device(s.device)
    vocab = model.config.get_text_config().vocab_size
    ids = random_prompt(vocab, batch, prompt, s.seed, device)
    gen_config = generation_config(model, s.gen, cache)
    for _ in range(s.warmup):
        time_prefill(model, ids)
        time_generate(model, ids, gen_config)
    runs = []
    for _ in range(s.repeats):
        run = {"prefill_s": time_prefill(model, ids), **time_generate(model, ids, gen_config)}
        if run["generated_tokens"] != s.gen or run["steps_timed"] != s.gen:
            raise RuntimeError(
                f"generate made {run['generated_tokens']} tokens "
                f"({run['steps_timed']} timed steps), expected {s.gen}"
            )
        runs.append(run)
    return {
        "batch": batch,
        "prompt": prompt,
        "gen": s.gen,
        "cache": cache,
        "macs_per_token": macs_per_token(model, prompt),
        "prefill_tok_s": stats([batch * prompt / r["prefill_s"] for r in runs]),
        "decode_tok_s": stats([batch * (s.gen - 1) / r["decode_s"] for r in runs]),
        "ttft_ms": stats([1e3 * r["ttft_s"] for r in runs]),
        "peak_mb": stats([r["peak_mb"] for r in runs]),
        "repeats": runs,
    }


def load_on_device(name: str, s: BenchSettings):
    """pipeline.load_model (dense HF folders and slimops checkpoints alike), on the device."""
    model, _ = load_model(name, s.dtype)
    return model.to(s.device).eval()


def compile_forward(model, s: BenchSettings) -> None:
    """torch.compile the forward, so prefill and decode both run compiled (generate calls
    model(...) -> model.forward); CUDA graphs on GPU, where launch overhead is the cost."""
    # Static shapes: each (batch, prompt) adds ~3 graphs (prefill without cache, prefill
    # into the cache, decode step); past dynamo's default limit of 8 the rest would
    # silently run eager, so allow them all.
    limit = 4 * (len(s.combos()) + 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    mode = "reduce-overhead" if torch.device(s.device).type == "cuda" else None
    model.forward = torch.compile(model.forward, mode=mode, dynamic=False)


def bench_model(name: str, s: BenchSettings, progress=None) -> dict:
    """One model over every (batch, prompt); freed before returning."""
    model = load_on_device(name, s)
    notes = []
    try:
        info = model_info(model)
        text_config = model.config.get_text_config()
        probe = random_prompt(text_config.vocab_size, 1, 8, s.seed, s.device)
        cache, note = choose_cache(model, probe, s.static_cache)  # eager: no probe graphs
        notes += [note] if note else []
        if s.compile and cache == "static":
            compile_forward(model, s)
        elif s.compile:
            notes.append("--compile skipped: it needs the static KV cache")
        results = []
        for batch, prompt in s.combos():
            results.append(bench_combo(model, batch, prompt, s, cache))
            if progress is not None:
                progress.update(1)
        max_pos = getattr(text_config, "max_position_embeddings", None)
    finally:
        del model
        gc.collect()
        if torch.device(s.device).type == "cuda":
            torch.cuda.empty_cache()
    longest = max(s.prompts) + s.gen
    if max_pos and longest > max_pos:
        notes.append(f"prompt + gen = {longest} exceeds max_position_embeddings {max_pos}")
    return {
        "name": Path(name).name or name,
        "path": name,
        "cache": cache,
        "compiled": s.compile and cache == "static",
        **info,
        "notes": notes,
        "results": results,
    }


def check_causal_lm(path: str) -> None:
    """A supported family with a generate() (encoder families such as BERT have none)."""
    model_type = model_config(path).model_type
    if family_spec(model_type)["auto_class"] != "AutoModelForCausalLM":
        raise ValueError(
            f"{path} is a {model_type} encoder: bench times generation and needs a causal LM"
        )


def run_bench(models: list[str], s: BenchSettings) -> dict:
    """Every model over every (batch, prompt); one model in memory at a time."""
    notes = check_settings(s)
    for name in models:  # all models checked before any loading
        check_causal_lm(resolve_model_path(name))
    device = torch.device(s.device)
    with tqdm(total=len(models) * len(s.combos()), desc="bench", unit="shape") as progress:
        entries = [bench_model(name, s, progress) for name in models]
    return {
        "settings": vars(s) | {"combos": s.combos()},
        "environment": environment(device),
        "peak_memory": peak_memory_kind(device),
        "notes": notes,
        "models": entries,
    }
