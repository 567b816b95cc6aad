#!/usr/bin/env python
"""Train slimops' reference model: a small LLaMA-architecture GQA causal LM plus a
byte-level BPE tokenizer, trained from scratch on the python3-doc corpus (CPU, offline).

    python scripts/train_reference_model.py            # ~15-27 min on a 2-core CPU
    python scripts/train_reference_model.py --steps 10 --out /tmp/ref   # smoke / timing run

Writes config.json, model.safetensors, generation_config.json, tokenizer files and
training_log.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from slimops.corpus import read_split  # noqa: E402

EOT = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="slimops/assets/reference_model")
    # 540 steps x 16 x 256 = 2.2M tokens (~0.77 epoch of train).
    # Measured: 2.87 s/step with --threads 1
    # on a shared, loaded 2-core host (27 min total); expect ~1.2-2.3 s/step on 2 idle cores.
    p.add_argument("--steps", type=int, default=540)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--eval-windows", type=int, default=0, help="0 = whole test split")
    return p.parse_args()


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # GPT-2 style byte-level BPE: every string is encodable, decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        text.split("\n\n"), trainer
    )  # paragraphs: merges never cross blank lines
    return tok


def checked_auto_tokenizer(out: Path, raw: Tokenizer, samples: list[str]):
    """Load the tokenizer exactly as downstream users will (AutoTokenizer next to a llama
    config.json) and check it is the tokenizer we trained: transformers picks the class from
    tokenizer_config.json / config.model_type, and a class that pre-tokenizes differently
    silently wrecks perplexity (ids at eval time != ids at train time)."""
    tok = AutoTokenizer.from_pretrained(out)
    for s in samples:
        ids = tok(s, add_special_tokens=True)["input_ids"]
        assert ids == raw.encode(s).ids, (
            f"{type(tok).__name__} ids differ from tokenizer.json on {s[:60]!r}"
        )
        assert tok.decode(ids) == s, f"round trip failed on {s[:60]!r}"
    return tok


@torch.no_grad()
def evaluate(
    model, ids: torch.Tensor, seq_len: int, max_windows: int, bs: int = 16
) -> tuple[float, int, int]:
    """Perplexity over non-overlapping seq_len windows (the remainder is dropped)."""
    model.eval()
    n = ids.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * seq_len].view(n, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n, bs):
        x = windows[i : i + bs]
        loss = model(
            input_ids=x, labels=x
        ).loss  # mean over the x.shape[0]*(seq_len-1) predicted tokens
        k = x.shape[0] * (seq_len - 1)
        nll, count = nll + loss.item() * k, count + k
    model.train()
    return math.exp(nll / count), n, count


def main() -> None:
    args = parse_args()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_text, test_text = read_split("train"), read_split("test")
    raw = train_tokenizer(train_text, args.vocab_size)  # train split only: no test leakage
    eot = raw.token_to_id(EOT)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT
    )
    hf_tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    config.save_pretrained(
        out
    )  # must exist before AutoTokenizer loads: it can steer the class choice

    paragraphs = [p for p in test_text.split("\n\n") if p.strip()]
    samples = paragraphs[:50] + [
        test_text[:20000],
        "  x\n\t y ",
        "héllo — ✓ 日本語\r\n",
        f"a{EOT}b",
    ]
    tok = checked_auto_tokenizer(out, raw, samples)
    print(
        f"AutoTokenizer -> {type(tok).__module__}.{type(tok).__name__}; "
        "ids == tokenizer.json ids, round trip OK"
    )

    # Encode with exactly the object users will get from AutoTokenizer (see checked_auto_tokenizer).
    train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    test_ids = torch.tensor(tok(test_text)["input_ids"], dtype=torch.long)
    assert train_ids[:1000].tolist() == raw.encode(train_text[:5000]).ids[:1000]
    print(f"tokens: train {train_ids.numel():,}  test {test_ids.numel():,}")

    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    print(f"params: {n_params:,}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # no weight decay on norms
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10% of peak
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - args.seq_len
    losses: list[float] = []
    t_train = time.time()
    model.train()
    pbar = tqdm(range(args.steps), desc="train", mininterval=10)
    for step in pbar:
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        pbar.set_postfix(
            loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr_at(step):.2e}"
        )
    train_s = time.time() - t_train
    final_loss = sum(losses[-20:]) / max(1, len(losses[-20:]))
    print(
        f"train: {args.steps} steps in {train_s:.0f}s ({train_s / max(1, args.steps):.2f} s/step), "
        f"final loss (mean of last 20) {final_loss:.4f}"
    )

    t_eval = time.time()
    ppl, n_win, n_tok = evaluate(model, test_ids, args.seq_len, args.eval_windows)
    scope = "whole test split" if not args.eval_windows else f"first {args.eval_windows} windows"
    print(
        f"test ppl {ppl:.3f} on {n_win} windows x {args.seq_len} "
        f"({n_tok:,} predicted tokens, {scope}) "
        f"[{time.time() - t_eval:.0f}s]"
    )

    model.generation_config.bos_token_id = eot
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = eot
    # fp32 safetensors (~21 MB). The tokenizer files were written above; re-saving the loaded
    # AutoTokenizer would only add load-time keys (is_local, local_files_only) to
    # tokenizer_config.json.
    model.save_pretrained(out, safe_serialization=True)

    log = {
        "config": config.to_dict(),
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "out"}
        | {
            "optimizer": "AdamW",
            "betas": [0.9, 0.95],
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "schedule": "linear warmup + cosine to 10% of peak",
            "dtype": "float32",
        },
        "params": n_params,
        "tokenizer_class": type(tok).__name__,
        "train_tokens_available": train_ids.numel(),
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "final_train_loss": final_loss,
        "test_ppl": ppl,
        "test_windows": n_win,
        "test_predicted_tokens": n_tok,
        "test_scope": scope,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.time() - t_start, 1),
        "threads": args.threads,
        "argv": sys.argv[1:],
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "python": sys.version.split()[0],
        },
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved to {out}  (total {log['total_wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
