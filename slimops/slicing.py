"""Physical removal: replace each pruned layer's nn.Linear modules by smaller ones.

Only index_select on weights: the kept weights (already OBS-compensated by the method) are
copied unchanged, so a sliced model computes exactly what the masked model computed.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import get_adapter
from .plan import LayerPlan, PruningPlan


def head_rows(heads: list[int], head_dim: int, device=None) -> torch.Tensor:
    """Row (or column) indices of the given heads in a [heads * head_dim] axis."""
    h = torch.as_tensor(heads, dtype=torch.long, device=device)
    return (h[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)


@torch.no_grad()
def slice_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new nn.Linear holding linear.weight[rows][:, cols] (and bias[rows])."""
    w = linear.weight
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    out = nn.Linear(
        w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype
    )
    out.weight.copy_(w)
    if linear.bias is not None:
        b = linear.bias if rows is None else linear.bias.index_select(0, rows.to(w.device))
        out.bias.copy_(b)
    return out


def slice_layer(adapter, layer, lp: LayerPlan) -> None:
    nh, nkv, ffn = adapter.layer_shape(layer)
    lp.validate(nh, nkv, ffn)
    hd = adapter.head_dim
    q_rows, kv_rows = head_rows(lp.kept_heads, hd), head_rows(lp.kept_kv_heads, hd)
    channels = torch.as_tensor(lp.kept_channels, dtype=torch.long)
    for role, rows, cols in (
        ("q", q_rows, None),
        ("k", kv_rows, None),
        ("v", kv_rows, None),
        ("o", None, q_rows),
        ("gate", channels, None),
        ("up", channels, None),
        ("down", None, channels),
    ):
        linear = adapter.linear(layer, role)
        if linear is not None:
            adapter.set_linear(layer, role, slice_linear(linear, rows=rows, cols=cols))
    adapter.set_layer_geometry(layer, len(lp.kept_heads), len(lp.kept_kv_heads))


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Slice every layer of `model` in place to the plan's kept heads and channels (and
    hidden dimensions, when the plan keeps a subset), and remove the layers it drops."""
    adapter = get_adapter(model)
    layers = adapter.layers()
    if len(plan.layers) != len(layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {len(layers)}")
    if all(lp.drop_layer for lp in plan.layers):
        raise ValueError("a plan must keep at least one layer")
    for layer, lp in zip(layers, plan.layers):  # check every layer before changing any
        if not lp.drop_layer:
            lp.validate(*adapter.layer_shape(layer))
    if plan.kept_hidden is not None:
        check_kept_hidden(plan, adapter.hidden_size)
    for layer, lp in zip(layers, plan.layers):
        if not lp.drop_layer:
            slice_layer(adapter, layer, lp)
    if plan.kept_hidden is not None:
        slice_hidden(model, adapter, torch.as_tensor(plan.kept_hidden, dtype=torch.long))
        for key, value in plan.shapes()[0].items():  # one shape (checked): the config says it
            setattr(model.config, key, value)
    drop_layers(model, adapter, [i for i, lp in enumerate(plan.layers) if lp.drop_layer])
    return model


def check_kept_hidden(plan: PruningPlan, hidden_size: int) -> None:
    """A plan that narrows the hidden size (sheared) keeps a valid subset of it and gives
    every kept layer one shape (the config's global widths will say it)."""
    kept = plan.kept_hidden
    if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= hidden_size:
        raise ValueError(
            f"kept hidden dims must be a non-empty sorted unique subset of 0..{hidden_size - 1}"
        )
    shapes = plan.shapes()
    if any(s != shapes[0] for s in shapes):
        raise ValueError("a plan that slices the hidden dimension must give every layer one shape")


@torch.no_grad()
def slice_hidden(model: nn.Module, adapter, kept: torch.Tensor) -> None:
    """Keep only the hidden dimensions `kept` everywhere: the embedding's columns, every
    hidden-wide norm, the inputs of q/k/v/gate/up, the outputs of o/down, the LM head's
    input (re-tied to the embedding when tied) and config.hidden_size."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.index_select(1, kept.to(emb.weight.device)))
    emb.embedding_dim = kept.numel()
    norms = [adapter.final_norm()] + [
        n for layer in adapter.layers() for n in adapter.hidden_norms(layer)
    ]
    for norm in norms:
        norm.weight = nn.Parameter(norm.weight.index_select(0, kept.to(norm.weight.device)))
    for layer in adapter.layers():
        # the hidden side of each projection is the one head/channel pruning leaves alone
        for role, (_, pruned_side, _) in adapter.spec["projections"].items():
            linear = adapter.linear(layer, role)
            if linear is not None:
                side = {"cols": kept} if pruned_side == "out" else {"rows": kept}
                adapter.set_linear(layer, role, slice_linear(linear, **side))
    if tied:
        head.weight = emb.weight
    elif head is not None:
        model.set_output_embeddings(slice_linear(head, cols=kept))
    model.config.hidden_size = adapter.hidden_size = kept.numel()


def drop_layers(model: nn.Module, adapter, indices: list[int]) -> None:
    """Remove whole layers: the ModuleList, the config's layer count and per-layer lists,
    and the layer_idx the KV cache is indexed by (renumbered)."""
    if not indices:
        return
    layers = adapter.layers()
    for i in sorted(indices, reverse=True):  # in place: the model keeps the same ModuleList
        del layers[i]
    kept = list(layers)
    config = model.config
    config.num_hidden_layers = len(kept)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):
        config.layer_types = [t for i, t in enumerate(types) if i not in set(indices)]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx


@torch.no_grad()
def mask_layer(adapter, layer, lp: LayerPlan) -> None:
    """Zero the o_proj / down_proj input columns of everything the plan removes (the
    'virtually pruned' model: same function as the sliced one, dense shapes)."""
    nh, _, ffn = adapter.layer_shape(layer)
    hd = adapter.head_dim
    drop_heads, drop_ch = lp.removed(nh, ffn)
    if drop_heads:
        adapter.o_proj(layer).weight[:, head_rows(drop_heads, hd)] = 0
    if drop_ch:
        adapter.down_proj(layer).weight[:, drop_ch] = 0
