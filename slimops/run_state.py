"""The one writer of resumable run state: prune --resume (progress.py), slimops train's
progress folder (cli_train.py) and the training loop's state file (trainer.py).

Every file is written durably: to a temp name, fsync'ed, renamed over the old one, then the
folder is fsync'ed so the rename itself survives a power cut; a kill at any moment leaves
the previous complete file. A folder is tied to a fingerprint of its run's settings
(fingerprint.json): a folder left by a run with other settings is refused before anything
is loaded from it. Under torchrun every rank must see the same folder: resuming on nodes
that do not share a filesystem is refused in one line instead of hanging at the first
collective of a rank that found no state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from . import distributed
from .readers import read_json

FINGERPRINT = "fingerprint.json"


def durable_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename tmp over `path`, with the data and the rename on disk."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def same_on_every_rank(path: Path) -> bool:
    """Whether `path` exists, refusing when the ranks disagree (no shared filesystem)."""
    here = Path(path).exists()
    seen = [bool(t) for t in distributed.all_gather(torch.tensor([here], dtype=torch.int64))]
    if len(set(seen)) > 1:
        have = [r for r, s in enumerate(seen) if s]
        raise ValueError(
            f"slimops: {path} exists on rank(s) {have} only: resuming under torchrun needs a "
            "folder every node sees (a shared filesystem)"
        )
    return here


class RunState:
    """A resumable run's folder, tied to the run's settings."""

    def __init__(self, folder, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))

    def check(self) -> bool:
        """True when the folder holds this run's state; refuses another run's (nothing of it
        is loaded first)."""
        record = self.folder / FINGERPRINT
        if not same_on_every_rank(record):
            return False
        saved = read_json(record)
        if saved != self.fingerprint:
            raise ValueError(
                f"{self.folder} holds progress of a run with other settings ({saved}); "
                "delete it or use the same settings"
            )
        return True

    def claim(self) -> None:
        """Check, then tie the folder to these settings (rank 0 writes, after every rank
        has compared)."""
        self.check()
        distributed.barrier()
        if distributed.is_main():
            self.record()

    def record(self) -> None:
        """Write the fingerprint (the caller is the one writing rank)."""
        self.write(FINGERPRINT, lambda tmp: tmp.write_text(json.dumps(self.fingerprint)))

    def write(self, name: str, write: Callable[[Path], None]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        durable_write(self.folder / name, write)
