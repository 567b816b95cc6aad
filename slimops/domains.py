"""Training data by domain, and Sheared-LLaMA's dynamic batch loading.

A domain is a folder of text files. `--domains` is either `name=path,name=path,...` or one
folder whose sub-folders are the domains (python3-doc's `_sources`: library, tutorial,
howto, reference, c-api, whatsnew, ...). Each file goes to the test split when
crc32("<domain folder>/<path inside it>") % 10 == 0, the same rule as slimops.corpus, so the
python3-doc domains never see the reference model's test text. The train text of a domain
is cut into seqlen windows; its last `valid_windows` windows are the held-in validation set
dynamic batch loading evaluates on (never the test split).

Dynamic batch loading (Xia et al. 2023, Alg. 1): every eval interval, with l_i the domain's
validation loss and ref_i its reference loss,

    d = l - ref  (clipped at 0, as the paper; the official code does not clip, their #42)
    w <- softmax(ln w + d);  w <- (1 - c) w + c / k       (c = 1e-4, the official value)

and each sequence of a batch draws its domain from w. A batch is a pure function of (seed,
step, w), so a resumed run draws exactly the batches an unbroken run draws.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .calibration import TEXT_SUFFIXES, tokenize
from .corpus import is_test_file


@dataclass
class Domain:
    name: str
    train: torch.Tensor  # (n, seqlen) token windows to train on
    valid: torch.Tensor  # (m, seqlen) held-in windows (the end of the train text)


def parse_domains(spec: str) -> dict[str, Path]:
    """`name=path,...`, or one folder whose sub-folders (with text files) are the domains."""
    if "=" not in spec:
        root = Path(spec)
        if not root.is_dir():
            raise FileNotFoundError(f"--domains {spec!r} is neither name=path,... nor a folder")
        found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and _files(p)}
        if not found:
            raise FileNotFoundError(f"--domains {spec}: no sub-folder holds text files")
        return found
    out = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--domains item {item!r} is not name=path")
        if name in out:
            raise ValueError(f"--domains names {name!r} twice")
        if not Path(path).is_dir() or not _files(Path(path)):
            raise FileNotFoundError(f"--domains {name}={path}: not a folder with text files")
        out[name] = Path(path)
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))


def domain_text(folder: Path, split: str) -> str:
    """Text of a domain folder's files in `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    keep = []
    for p in _files(folder):
        rel = f"{folder.name}/{p.relative_to(folder).as_posix()}"
        if is_test_file(rel) == (split == "test"):
            keep.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(keep)


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def load_domains(
    spec: str, tokenizer, seqlen: int, valid_windows: int = 8, min_windows: int = 4
) -> list[Domain]:
    """Every domain of `spec`, tokenized and windowed. A domain with fewer than
    valid_windows + min_windows train windows is skipped with a warning when it came from a
    folder of domains, and is an error when named."""
    named = "=" in spec
    out = []
    for name, folder in parse_domains(spec).items():
        w = windows(tokenize(domain_text(folder, "train"), tokenizer), seqlen)
        if len(w) < valid_windows + min_windows:
            msg = (
                f"domain {name} has {len(w)} windows of {seqlen} tokens; it needs at least "
                f"{valid_windows + min_windows} ({valid_windows} held in for validation)"
            )
            if named:
                raise ValueError(msg)
            if distributed.is_main():
                print(f"skipping {msg}", file=sys.stderr, flush=True)
            continue
        out.append(Domain(name, w[: len(w) - valid_windows], w[len(w) - valid_windows :]))
    if not out:
        raise ValueError(f"--domains {spec}: no domain has enough text")
    return out


def test_windows(spec: str, tokenizer, seqlen: int, names: list[str]) -> dict[str, torch.Tensor]:
    """Each named domain's test-split windows (for reporting, never for training)."""
    folders = parse_domains(spec)
    return {n: windows(tokenize(domain_text(folders[n], "test"), tokenizer), seqlen) for n in names}


@dataclass
class Mixture:
    """Domain weights: static, or updated by dynamic batch loading."""

    names: list[str]
    weights: torch.Tensor  # float64, sums to 1
    reference: torch.Tensor | None = None  # per-domain reference losses (dynamic only)
    dynamic: bool = False
    smoothing: float = 1e-4
    clip: bool = True
    history: list[dict] = field(default_factory=list)

    @classmethod
    def make(cls, domains: list[Domain], init: str = "uniform", **kw) -> Mixture:
        """init "uniform", or "tokens" (each domain's share of the train tokens)."""
        if init == "uniform":
            w = torch.ones(len(domains), dtype=torch.float64)
        elif init == "tokens":
            w = torch.tensor([d.train.numel() for d in domains], dtype=torch.float64)
        else:
            raise ValueError(f"mixture init must be uniform or tokens, got {init!r}")
        return cls([d.name for d in domains], w / w.sum(), **kw)

    def update(self, step: int, losses: torch.Tensor, move: bool = True) -> None:
        """Record the eval losses; if dynamic (and `move`), move the weights toward lagging
        domains."""
        losses = losses.double().cpu()
        excess = None
        if self.dynamic and move:
            if self.reference is None:
                raise ValueError("dynamic batch loading needs reference losses")
            excess = losses - self.reference
            if self.clip:
                excess = excess.clamp(min=0.0)
            w = torch.softmax(torch.log(self.weights) + excess, dim=0)
            self.weights = (1.0 - self.smoothing) * w + self.smoothing / len(w)
        self.history.append(
            {
                "step": step,
                "losses": losses.tolist(),
                "excess": None if excess is None else excess.tolist(),
                "weights": self.weights.tolist(),
            }
        )

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.history = list(state["history"])


def draw_batch(
    domains: list[Domain], weights: torch.Tensor, batch_size: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch_size, seqlen) ids and each row's domain: a pure function of its arguments."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    which = torch.multinomial(weights.double(), batch_size, replacement=True, generator=g)
    rows = [
        domains[d].train[torch.randint(len(domains[d].train), (1,), generator=g)] for d in which
    ]
    return torch.cat(rows), which
