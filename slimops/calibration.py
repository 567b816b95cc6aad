"""Calibration tokens: from a HF dataset (wikitext2, c4), a text file, a folder of text
files, or saved token ids (.pt); plus data-free samples drawn from the model itself."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .readers import load_token_ids

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HUB_DATASETS = ("wikitext2", "c4")


def load_text(source: str, split: str = "train") -> str:
    """Raw text of DATA: `wikitext2`, `c4`, a text file, or a folder of text files."""
    if source in HUB_DATASETS:
        return _hub_text(source, split)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
        return "\n\n".join(_read(p) for p in files)
    if path.is_file():
        return _read(path)
    raise FileNotFoundError(
        f"calibration/eval data {source!r} is neither {HUB_DATASETS} nor "
        "an existing text file or folder"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise OSError(f"cannot read data file {path}: {err.strerror}") from err


def _hub_text(name: str, split: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(
            f"--calib {name} needs the `datasets` package (pip install datasets); "
            "or pass a local text file / folder"
        ) from None
    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return "\n\n".join(ds["text"])
    files = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    split = "validation" if split != "train" else split
    ds = load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
    return "\n\n".join(ds["text"][:20000])


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """1-D LongTensor of ids for the whole text (no special tokens in the middle)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(
    source: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """(nsamples, seqlen) non-overlapping windows drawn at random from DATA's token stream."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError("nsamples and seqlen must be positive")
    if source.endswith(".pt") and Path(source).is_file():
        ids = load_token_ids(source, len(tokenizer))
    else:
        ids = tokenize(load_text(source, "train"), tokenizer)
    return sample_windows(ids, nsamples, seqlen, seed, what=source)


def sample_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0, what: str = "data"
) -> torch.Tensor:
    windows = ids.numel() // seqlen
    if windows < nsamples:
        raise ValueError(
            f"calibration data {what!r} has {ids.numel()} tokens, fewer than "
            f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen}; "
            "lower --nsamples/--seqlen or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=g)[:nsamples].sort().values
    return ids[: windows * seqlen].view(windows, seqlen)[pick].clone()


@torch.no_grad()
def sample_from_model(
    model, tokenizer, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 8
) -> torch.Tensor:
    """Data-free calibration: sequences sampled from the dense model itself, starting from
    the BOS token (as in LLM-QAT's / SlimGPT's data-free ablations)."""
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # Every sequence has exactly seqlen tokens, so nothing is ever padded; the pad id only has
    # to differ from the start token (HF warns of "right padding" when a prompt ends in pad).
    pad = (start + 1) % len(tokenizer)
    device = next(model.parameters()).device
    out = []
    for n in tqdm(range(0, nsamples, batch_size), desc="sampling calibration text", unit="batch"):
        b = min(batch_size, nsamples - n)
        prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
        seq = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_length=seqlen + 1,
            min_length=seqlen + 1,
            pad_token_id=pad,
        )
        out.append(seq[:, 1 : seqlen + 1].cpu())
    return torch.cat(out)
