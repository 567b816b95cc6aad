"""Resumable pruning (`--resume`): progress saved after every layer, picked up after a kill.

The sequential driver (sequential.run_sequential) writes, after each pruned layer, that
layer's weights (`layer_<i>.safetensors`, as pruned: dense shapes, compensated) and then
`progress.json` (layers done, the method's own state such as SlimGPT's rounding carry and
plans), in a run_state.RunState folder tied to the run's settings: each file is written
durably (temp name, fsync, rename), so a kill at any moment leaves the last complete layer.
On resume the saved layers are loaded into the model, the calibration inputs are recomputed
through them (the same computation, so the result is bit-identical to an unbroken run) and
pruning continues at the next layer. A folder from a run with other settings is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from .readers import read_json
from .run_state import FINGERPRINT, RunState

PROGRESS = "progress.json"


class Progress:
    def __init__(self, folder, fingerprint: dict):
        self.run = RunState(folder, fingerprint)  # refuses another run's folder, first
        self.folder = self.run.folder
        self.done = 0  # layers completed
        self.state: dict = {}  # the method's state after `done` layers
        self.state_fn: Callable[[], dict] = dict
        if self.run.check() and (self.folder / PROGRESS).is_file():
            saved = read_json(self.folder / PROGRESS)
            self.done, self.state = saved["done"], saved["state"]

    def load_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Put the saved (pruned) weights of layer `index` into `layer`."""
        layer.load_state_dict(load_file(self.folder / f"layer_{index}.safetensors"))

    def save_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Layer `index` is pruned: write it, then the progress that points at it (the
        writing rank alone calls this)."""
        if not (self.folder / FINGERPRINT).is_file():
            self.run.record()
        weights = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        self.run.write(f"layer_{index}.safetensors", lambda tmp: save_file(weights, str(tmp)))
        self.done = index + 1
        record = {"done": self.done, "state": self.state_fn()}
        self.run.write(PROGRESS, lambda tmp: tmp.write_text(json.dumps(record, default=str)))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
