"""Virtual pruning: run a layer as if it were sliced to a LayerPlan, on its DENSE weights.

Each projection is swapped for a `SliceLinear` that calls the `slice_gemm` op with the plan's
index lists (kept output rows for q/k/v/gate/up, kept input heads/channels for o/down), so no
weight is copied; the attention module is told its kept head counts, and the family's own
HF forward runs unchanged. `virtual_layer` restores the layer on exit. Evaluating many
candidate plans (methods/search/) this way costs no copies of the model.

slice_gemm reads X at the projection's full input width. o_proj and down_proj receive the
compact activations of the kept heads / channels, so SliceLinear scatters them to full width
first (a (T, d_in) write, small against the GEMM), and the op reads only the kept columns.
A `replace` weight stands in for o/down's kept columns (compensated weights: search's fitness
with reformation), used as a plain compact matmul.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .kernels.slice_gemm.reference import expand_blocks
from .plan import LayerPlan
from .slicing import head_rows


class SliceLinear(nn.Module):
    """y = x[:, I] @ W[J][:, I]^T (+ b[J]) of a dense nn.Linear, through ops.slice_gemm."""

    def __init__(
        self,
        dense: nn.Linear,
        in_idx: torch.Tensor | None = None,
        out_idx: torch.Tensor | None = None,
        in_block: int = 1,
        replace: torch.Tensor | None = None,
    ):
        super().__init__()
        self.dense, self.in_block, self.replace = dense, in_block, replace
        device = dense.weight.device
        self.in_idx = None if in_idx is None else in_idx.to(device)
        self.out_idx = None if out_idx is None else out_idx.to(device)
        self.cols = None if in_idx is None else expand_blocks(self.in_idx, in_block)

    @property
    def out_features(self) -> int:
        return self.dense.out_features if self.out_idx is None else len(self.out_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.replace is not None:  # compensated kept columns: compact matmul
            y = F.linear(x2, self.replace.to(x2.dtype), self._bias())
            return y.reshape(*lead, -1)
        if self.cols is not None and x2.shape[1] != self.dense.in_features:
            full = x2.new_zeros(x2.shape[0], self.dense.in_features)
            full[:, self.cols] = x2  # compact kept activations -> full input width
            x2 = full
        y = ops.slice_gemm(
            x2,
            self.dense.weight,
            self.dense.bias,
            self.in_idx,
            self.out_idx,
            self.in_block,
            check_indices=False,
        )
        return y.reshape(*lead, -1)

    def _bias(self):
        b = self.dense.bias
        return b if b is None or self.out_idx is None else b[self.out_idx]


def layer_views(adapter, layer, lp: LayerPlan, replace: dict | None = None) -> dict:
    """role -> SliceLinear for the plan (replace: {"o": W_o, "down": W_down} compact weights)."""
    hd = adapter.head_dim
    device = adapter.o_proj(layer).weight.device
    q_rows = head_rows(lp.kept_heads, hd, device)
    kv_rows = head_rows(lp.kept_kv_heads, hd, device)
    heads = torch.as_tensor(lp.kept_heads, dtype=torch.long, device=device)
    channels = torch.as_tensor(lp.kept_channels, dtype=torch.long, device=device)
    replace = replace or {}
    specs = {
        "q": dict(out_idx=q_rows),
        "k": dict(out_idx=kv_rows),
        "v": dict(out_idx=kv_rows),
        "o": dict(in_idx=heads, in_block=hd, replace=replace.get("o")),
        "gate": dict(out_idx=channels),
        "up": dict(out_idx=channels),
        "down": dict(in_idx=channels, in_block=1, replace=replace.get("down")),
    }
    return {
        role: SliceLinear(adapter.linear(layer, role), **kw)
        for role, kw in specs.items()
        if adapter.linear(layer, role) is not None
    }


@contextmanager
def virtual_layer(adapter, layer, lp: LayerPlan, replace: dict | None = None):
    """Inside the block, `layer` computes what the layer sliced to `lp` computes."""
    nh, nkv, _ = adapter.layer_shape(layer)
    originals = {role: adapter.linear(layer, role) for role in adapter.paths}
    views = layer_views(adapter, layer, lp, replace)
    try:
        for role, view in views.items():
            adapter.set_linear(layer, role, view)
        adapter.set_layer_geometry(layer, len(lp.kept_heads), len(lp.kept_kv_heads))
        yield layer
    finally:
        for role, module in originals.items():
            if module is not None:
                adapter.set_linear(layer, role, module)
        adapter.set_layer_geometry(layer, nh, nkv)
