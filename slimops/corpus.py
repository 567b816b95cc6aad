"""Local text corpus used to train and evaluate the reference model.

The corpus is the Debian ``python3-doc`` package's reStructuredText sources
(~12 MB, ~500 files). The train/test split is fixed *by file* (crc32 of the
relative path), so it is identical on every machine and never leaks text
between the splits.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

CORPUS_DIR = "/usr/share/doc/python3.11/html/_sources"
CORPUS_HINT = (
    "The python3-doc corpus was not found. Install it with "
    "`apt-get install python3-doc`, or set SLIMOPS_CORPUS_DIR to a directory "
    "containing the *.rst.txt sources."
)
SPLITS = ("train", "test")


def find_corpus_dir() -> Path | None:
    """Return the corpus root (SLIMOPS_CORPUS_DIR first, then CORPUS_DIR), or None."""
    for cand in (os.environ.get("SLIMOPS_CORPUS_DIR"), CORPUS_DIR):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def is_test_file(relpath: str) -> bool:
    """The file-level test split: 10% of files, by crc32 of the relative posix path."""
    return zlib.crc32(relpath.encode()) % 10 == 0


def corpus_files(split: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Files of `split` ("train" or "test"), sorted by relative posix path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = Path(root) if root is not None else find_corpus_dir()
    if base is None or not base.is_dir():
        raise FileNotFoundError(f"{CORPUS_HINT} (looked in {base or CORPUS_DIR})")
    files = sorted(base.rglob("*.txt"), key=lambda p: p.relative_to(base).as_posix())
    if not files:
        raise FileNotFoundError(f"{CORPUS_HINT} (no *.txt files under {base})")
    want_test = split == "test"
    return [p for p in files if is_test_file(p.relative_to(base).as_posix()) == want_test]


def read_split(split: str, root: str | os.PathLike | None = None) -> str:
    """Concatenated text of the split's files, joined by a blank line."""
    return "\n\n".join(
        p.read_text(encoding="utf-8", errors="replace") for p in corpus_files(split, root)
    )
