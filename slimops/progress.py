"""Resumable pruning (`--resume`): progress saved after every layer, picked up after a kill.

The sequential driver (sequential.run_sequential) writes, after each pruned layer, that
layer's weights (`layer_<i>.safetensors`, as pruned: dense shapes, compensated) and then
`progress.json` (layers done, the method's own state such as SlimGPT's rounding carry and
plans, and a fingerprint of the run's settings). Each file is written to a temp name and
renamed, so a kill at any moment leaves the last complete layer. On resume the saved layers
are loaded into the model, the calibration inputs are recomputed through them (the same
computation, so the result is bit-identical to an unbroken run) and pruning continues at
the next layer. A folder from a run with other settings is refused, not mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class Progress:
    def __init__(self, folder, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.done = 0  # layers completed
        self.state: dict = {}  # the method's state after `done` layers
        self.state_fn: Callable[[], dict] = dict
        self._read()

    @property
    def _json(self) -> Path:
        return self.folder / "progress.json"

    def _read(self) -> None:
        if not self._json.is_file():
            return
        saved = json.loads(self._json.read_text())
        if saved["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{self.folder} holds progress of a run with other settings "
                f"({saved['fingerprint']}); delete it or use the same settings"
            )
        self.done, self.state = saved["done"], saved["state"]

    def load_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Put the saved (pruned) weights of layer `index` into `layer`."""
        layer.load_state_dict(load_file(self.folder / f"layer_{index}.safetensors"))

    def save_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Layer `index` is pruned: write it, then the progress that points at it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        _atomic(
            self.folder / f"layer_{index}.safetensors", lambda tmp: save_file(weights, str(tmp))
        )
        self.done = index + 1
        record = {"done": self.done, "state": self.state_fn(), "fingerprint": self.fingerprint}
        _atomic(self._json, lambda tmp: tmp.write_text(json.dumps(record, default=str)))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
