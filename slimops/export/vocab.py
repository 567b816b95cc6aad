"""The tokenizer of a GGUF export: copied from a source .gguf, else built from tokenizer.json.

A wrong tokenizer fails silently (same text, other ids), so both paths are strict:
  * from a .gguf: every `tokenizer.*` key copied verbatim (vocabulary, merges, pre-tokenizer
    name, BOS/EOS, chat template), the file llama.cpp itself wrote;
  * from a HF tokenizer: only byte-level BPE (what LLaMA-3, Qwen2/3, SmolLM and GPT-2 ship),
    with llama.cpp's pre-tokenizer NAME chosen from tokenizer.json's pre_tokenizer by the
    table below (the regexes llama.cpp hard-codes per name, src/llama-vocab.cpp). Anything
    else is refused in one line; `--tokenizer-from FILE.gguf` copies a known-good one instead.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf

# Split regexes as HF tokenizer.json writes them, for the names whose pre-tokenizer is
# Sequence[Split(regex), ByteLevel(use_regex=False)].
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
SPLIT_NAMES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def copy_from_gguf(writer: gguf.GGUFWriter, source: str | Path, n_vocab: int) -> str:
    """Copy every tokenizer.* key of `source` into `writer`; returns the pre-tokenizer name."""
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{source}: has no tokenizer (no tokenizer.ggml.tokens key)")
    if len(tokens.data) != n_vocab:
        raise ValueError(
            f"{source}: its tokenizer has {len(tokens.data)} tokens but the model's "
            f"embedding has {n_vocab} rows: not this model's tokenizer"
        )
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(key, f.contents(), f.types[0], f.types[-1] if array else None)
    pre = reader.fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else "default"


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or None when it has none."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # one digit a token, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _token_table(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the embedding's rows) and their llama.cpp token types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_from_hf(writer: gguf.GGUFWriter, tokenizer, n_vocab: int) -> str:
    """Write a byte-level BPE HF tokenizer; returns the pre-tokenizer name it chose."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast (tokenizer.json) tokenizer: GGUF export "
            "needs one, or --tokenizer-from FILE.gguf"
        )
    spec = json.loads(backend.to_str())
    model_type, pre = spec["model"]["type"], _pre_name(spec.get("pre_tokenizer"))
    if model_type != "BPE" or pre is None:
        raise ValueError(
            f"tokenizer ({model_type}, pre-tokenizer "
            f"{json.dumps(spec.get('pre_tokenizer'))[:120]}) has no llama.cpp byte-level BPE "
            "equivalent slimops knows; pass --tokenizer-from FILE.gguf (the source model's)"
        )
    if len(tokenizer) > n_vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the embedding {n_vocab} rows")
    tokens, types = _token_table(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes merges as "a b" strings or (newer) [a, b] pairs; llama.cpp wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:  # llama.cpp's gpt2 vocabulary refuses to load without them
        raise ValueError("the BPE tokenizer has no merges: llama.cpp cannot load it")
    writer.add_token_merges(merges)
    # BOS/EOS/pad ids, add_bos and the chat template, read the way llama.cpp's own converter
    # reads them: from the saved tokenizer files.
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(Path(folder), load_merges=False, n_vocab=n_vocab).add_to_gguf(writer)
    return pre
