"""Build the demo's shipped text (slimops/assets/demo_text/) from Debian's python3-doc.

`slimops demo` must be fast and give the same numbers on every machine, with or without
python3-doc installed, so it reads this excerpt instead of the corpus (or, as it once did,
generating text from the model: 342 s on a fresh 2-core machine). The excerpt keeps the
corpus' by-file split (slimops/corpus.py), so calibration and test text never overlap:

  train.txt.gz  the first TRAIN_CHARS_PER_FILE characters of every TRAIN_FILE_STRIDE-th train
                file (sorted by path): many topics, ~0.27 M characters, ~75 k tokens, a pool
                4-5x larger than the demo's 64 x 256 calibration tokens;
  test.txt.gz   the test split's text from its start to the first blank line after
                TEST_TOKENS tokens of the reference tokenizer: exactly the first 512 windows
                of 128 tokens that the demo scores (and that the corpus-based demo scored).

The Python documentation is under the PSF licence (python3-doc's copyright file), which
allows redistribution with the notice: LICENSE.txt beside the excerpt.

    python scripts/make_demo_text.py          # rewrites slimops/assets/demo_text/*
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from slimops import corpus
from slimops.demo import DEMO_TEXT, EVAL_SEQLEN, EVAL_WINDOWS, REFERENCE_MODEL

TRAIN_FILE_STRIDE, TRAIN_CHARS_PER_FILE = 8, 5000
TEST_TOKENS = EVAL_WINDOWS * EVAL_SEQLEN + 1
LICENSE = Path("/usr/share/doc/python3-doc/copyright")


def _paragraph_cut(text: str, at: int) -> str:
    """text[:at], extended to the end of its paragraph (no sentence cut in half)."""
    end = text.find("\n\n", at)
    return text if end < 0 else text[:end]


def train_excerpt() -> str:
    files = corpus.corpus_files("train")[::TRAIN_FILE_STRIDE]
    parts = [
        _paragraph_cut(p.read_text(encoding="utf-8", errors="replace"), TRAIN_CHARS_PER_FILE)
        for p in files
    ]
    return "\n\n".join(parts)


def test_excerpt(tokenizer) -> str:
    text = corpus.read_split("test")
    chars = 3 * TEST_TOKENS  # ~3.5 characters a token: start below, then grow until enough
    while True:
        piece = _paragraph_cut(text, chars)
        if piece == text or len(tokenizer(piece)["input_ids"]) >= TEST_TOKENS:
            return piece
        chars += chars // 4


def _write_gz(path: Path, text: str) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode("utf-8"))  # mtime=0: the same bytes on every rebuild


def main() -> None:
    if corpus.find_corpus_dir() is None:
        raise SystemExit(corpus.CORPUS_HINT)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    DEMO_TEXT.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train_excerpt()), ("test", test_excerpt(tokenizer))):
        _write_gz(DEMO_TEXT / f"{split}.txt.gz", text)
        print(f"{split}: {len(text):,} characters, {len(tokenizer(text)['input_ids']):,} tokens")
    if LICENSE.is_file():
        shutil.copyfile(LICENSE, DEMO_TEXT / "LICENSE.txt")


if __name__ == "__main__":
    main()
