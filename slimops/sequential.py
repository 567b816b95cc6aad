"""The one layer-by-layer driver every layer-wise method plugs into.

    capture the inputs of layer 0 (one forward of the embeddings, stopped at layer 0)
    for each layer i:
        move layer i to the compute device
        method(LayerWork)      # accumulates Hessians through hooks, prunes, compensates
        propagate: outputs of the PRUNED layer i become the inputs of layer i+1
        move layer i back

Only one decoder layer is on the compute device at a time, and the inputs of layer i are
produced by the already-pruned layers 0..i-1 (SparseGPT / SlimGPT's sequential scheme).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, ops

OFFLOADS = ("auto", "cpu", "none")


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0: records its inputs and stops the forward pass."""

    def __init__(self, layer: nn.Module, sink: list, kwargs_sink: dict):
        super().__init__()
        self.layer, self.sink, self.kwargs_sink = layer, sink, kwargs_sink

    def forward(self, hidden_states, *args, **kwargs):
        # Decoders pass everything but the hidden states by keyword; BERT's encoder passes
        # (attention_mask, encoder_hidden_states) positionally: kept under "_args".
        self.sink.append(hidden_states)
        if not self.kwargs_sink:
            self.kwargs_sink.update(kwargs, _args=args)
        raise _StopForward


@dataclass
class PhaseTimer:
    """Exclusive wall time per phase (forward, hessian, obs, ...): a phase nested inside
    another is subtracted from its parent, so the phases add up to the total."""

    seconds: dict = field(default_factory=dict)
    _children: list = field(default_factory=list)

    @contextmanager
    def __call__(self, phase: str, device: torch.device | None = None):
        _sync(device)
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            yield
        finally:
            _sync(device)
            elapsed = time.perf_counter() - start
            own = elapsed - self._children.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + own
            if self._children:
                self._children[-1] += elapsed


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def capture_inputs(adapter, tokens: torch.Tensor, batch_size: int, device) -> tuple[list, dict]:
    """Hidden states entering layer 0 for every calibration batch, and the layer kwargs
    (rotary embeddings, mask, positions): identical for all batches of one shape."""
    backbone, layers = adapter.backbone(), adapter.layers()
    first = layers[0]
    moved = [(m, _device_of(m)) for m in _outside(backbone, layers)]
    for m, _ in moved:
        m.to(device)
    inputs, kwargs = [], {}
    layers[0] = _Catcher(first, inputs, kwargs)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                backbone(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
        for m, home in moved:
            m.to(home)
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def _outside(module: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The children of `module` that do not hold the layers (embeddings, rotary, norms),
    recursing into the ones that do: decoders keep the layers at model.layers, BERT at
    model.encoder.layer, and moving the encoder whole would onload every layer at once."""
    out = []
    for child in module.children():
        if child is layers:
            continue
        if any(m is layers for m in child.modules()):
            out += _outside(child, layers)
        else:
            out.append(child)
    return out


class LayerWork:
    """What a method sees of one layer: the layer on the compute device, its calibration
    inputs, and helpers to accumulate Hessians of any of its Linear inputs."""

    def __init__(
        self,
        index,
        layer,
        adapter,
        inputs,
        kwargs,
        device,
        timer,
        accumulate=ops.hessian_accumulate,
    ):
        self.index, self.layer, self.adapter = index, layer, adapter
        self.inputs, self.kwargs, self.device, self.timer = inputs, kwargs, device, timer
        self.accumulate = accumulate
        self.dropped = False  # set by a method that removes the whole layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output for one batch (on the compute device; offloaded activations
        are moved there first)."""
        kwargs = dict(self.kwargs)
        out = self.layer(
            hidden.to(self.device, non_blocking=True), *kwargs.pop("_args", ()), **kwargs
        )
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def observe_inputs(
        self, modules: dict[str, nn.Linear], on_input: Callable[[str, torch.Tensor], None]
    ) -> None:
        """Run the layer over every calibration input once, calling on_input(name, x) with
        the 2-D input x of each module (forward pre-hooks, removed afterwards)."""

        def hook(name):
            return lambda _module, args: on_input(name, args[0].reshape(-1, args[0].shape[-1]))

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            with self.timer("forward", self.device):
                for hidden in self.inputs:
                    self.forward(hidden)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def hessians(self, modules: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """H = mean over calibration tokens of x x^T for the input x of each module, fp32,
        accumulated with `self.accumulate` (ops.hessian_accumulate) in one pass; under
        torch.distributed summed over every rank's tokens (all ranks get the same H)."""
        acc = {
            name: torch.zeros(1, m.in_features, m.in_features, device=self.device)
            for name, m in modules.items()
        }
        rows = {name: 0 for name in modules}

        def add(name, x):
            with self.timer("hessian", self.device):
                self.accumulate(acc[name], x, None, 1.0)
            rows[name] += x.shape[0]

        self.observe_inputs(modules, add)
        out = {}
        for name in modules:
            total = distributed.all_sum_float(float(rows[name]))
            out[name] = distributed.all_sum(acc[name][0]) / max(total, 1.0)
        return out


class InMemoryLayers:
    """Where layers come from and go back to: the model in memory (each layer visits the
    compute device while it is pruned). streaming.py's source reads them from safetensors
    shards instead and writes each pruned layer out."""

    def open(self, i: int, layers: nn.ModuleList, device) -> nn.Module:
        self.home = _device_of(layers[i])
        return layers[i].to(device)

    def close(self, i: int, layers: nn.ModuleList, layer: nn.Module, work: LayerWork) -> None:
        layers[i] = layer.to(self.home)


def activation_home(inputs: list[torch.Tensor], device: torch.device, offload: str) -> torch.device:
    """Where calibration activations live between layers: on the compute device, or on the
    CPU (pinned, moved per batch) with offload="cpu", or with "auto" when they would take
    more than half of the free GPU memory."""
    if offload not in OFFLOADS:
        raise ValueError(f"--offload {offload!r}: choose one of {', '.join(OFFLOADS)}")
    if device.type != "cuda" or offload == "none":
        return device
    if offload == "auto":
        need = sum(h.numel() * h.element_size() for h in inputs)
        if need < 0.5 * torch.cuda.mem_get_info(device)[0]:
            return device
    return torch.device("cpu")


def run_sequential(
    model,
    adapter,
    tokens: torch.Tensor,
    prune_layer: Callable[[LayerWork], None],
    device="cpu",
    batch_size: int = 8,
    desc: str = "pruning",
    accumulate=ops.hessian_accumulate,
    progress=None,
    source=None,
    offload: str = "auto",
) -> PhaseTimer:
    """Drive `prune_layer` over every decoder layer, in order; returns the phase timings.
    progress (slimops.progress.Progress): layers it holds are loaded and only propagated,
    every newly pruned layer is saved to it. source: where layers come from (default
    InMemoryLayers). offload: where activations wait between layers (activation_home)."""
    device = torch.device(device)
    timer = PhaseTimer()
    source = source or InMemoryLayers()
    use_cache = model.config.use_cache
    model.config.use_cache = False
    try:
        with timer("forward", device):
            inputs, kwargs = capture_inputs(adapter, tokens, batch_size, device)
        home = activation_home(inputs, device, offload)
        inputs = [_park(h, home) for h in inputs]
        layers = adapter.layers()
        done = progress.done if progress is not None else 0
        for i in tqdm(
            range(len(layers)), desc=desc, unit="layer", disable=not distributed.is_main()
        ):
            layer = source.open(i, layers, device)
            work = LayerWork(i, layer, adapter, inputs, kwargs, device, timer, accumulate)
            if i < done:  # pruned by an earlier, killed run: load it, only propagate
                progress.load_layer(i, layer)
            else:
                prune_layer(work)
                if progress is not None and distributed.is_main():
                    progress.save_layer(i, layer)
            if not work.dropped:  # a dropped layer passes its inputs on unchanged
                with timer("forward", device), torch.no_grad():
                    inputs = [_park(work.forward(h), home) for h in inputs]
            _check_finite(inputs, i)
            source.close(i, layers, layer, work)
    finally:
        model.config.use_cache = use_cache
    return timer


def _park(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    if t.device == home:
        return t
    t = t.to(home)
    return t.pin_memory() if home.type == "cpu" and torch.cuda.is_available() else t


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _check_finite(tensors: list[torch.Tensor], index: int) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise FloatingPointError(
                f"non-finite activations after layer {index}: the model overflows in its dtype "
                "on this calibration data; try --dtype fp32 or check the checkpoint"
            )
