"""Second-order saliency of every prunable unit, from one pass over the dense model.

Search for Efficient LLMs, eq. 1: for a linear layer with weights W and inputs X,

    Phi_ij = W_ij^2 / [H^-1]_jj,        H = X X^T (damped; the paper's factor 2 is a constant)

the OBS cost of removing the single weight W_ij. A unit's score sums Phi over the weights it
owns, with the mask shared across the block as in the paper: a query head its q rows and
o_proj columns, a KV group its k/v rows (plus its query heads' scores when the whole group
goes), an FFN channel its gate/up rows and its down_proj column.

The pass also keeps o_proj's and down_proj's damped input Hessians: search's fitness can
compensate a candidate's kept columns with them (least squares, no second pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Widths
from ..sequential import LayerWork, run_sequential
from .allocation import OutputEnergy
from .obs_solver import damp_hessian


@dataclass
class LayerSpace:
    """One layer as search sees it: dense widths, unit costs and every unit's saliency."""

    dense: Widths  # the layer's widths before pruning
    costs: dict  # params per head / kv head / channel (adapter.unit_costs)
    fixed: int  # params no width removes (norms, o/down biases)
    head_scores: list[float]  # saliency of every unit (higher = keep)
    kv_scores: list[float]
    channel_scores: list[float]
    attn_macs: int  # attention MACs per kept query head per token (context)


@dataclass
class LayerStats:
    space: LayerSpace
    H_o: torch.Tensor  # damped Hessian of o_proj's input (CPU, fp32)
    H_down: torch.Tensor  # damped Hessian of down_proj's input (CPU, fp32)
    energy: float  # mean squared norm of the layer's output hidden states


def inverse_diagonal(
    H: torch.Tensor, W: torch.Tensor, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag(H_damped^-1), H_damped); W's columns of dead inputs are zeroed (GPTQ)."""
    H, _ = damp_hessian(H, W, percdamp)
    return torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal(), H


def row_saliency(W: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """sum_j Phi_ij for every output row i."""
    return (W.double().pow(2) / hinv_diag.double()).sum(1)


def column_saliency(W: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """sum_i Phi_ij for every input column j."""
    return W.double().pow(2).sum(0) / hinv_diag.double()


@torch.no_grad()
def layer_stats(work: LayerWork, percdamp: float, attn_macs: int) -> LayerStats:
    """Saliency scores and o/down Hessians of one (dense) layer."""
    adapter, layer = work.adapter, work.layer
    nh, nkv, ffn = adapter.layer_shape(layer)
    hd = adapter.head_dim
    up = adapter.linear(layer, "up")
    with OutputEnergy(layer) as energy:
        H = work.hessians(
            {
                "attn": adapter.linear(layer, "q"),
                "o": adapter.o_proj(layer),
                "mlp": up,
                "down": adapter.down_proj(layer),
            }
        )
    weight = {
        r: adapter.linear(layer, r).weight.float().clone()
        for r in ("q", "k", "v", "o", "gate", "up", "down")
        if adapter.linear(layer, r) is not None
    }
    inv = {}
    for name, roles in (
        ("attn", ("q", "k", "v")),
        ("o", ("o",)),
        ("mlp", ("gate", "up")),
        ("down", ("down",)),
    ):
        W = torch.cat([weight[r] for r in roles if r in weight])
        inv[name], H[name] = inverse_diagonal(H[name], W, percdamp)
    heads = row_saliency(weight["q"], inv["attn"]).view(nh, hd).sum(1) + column_saliency(
        weight["o"], inv["o"]
    ).view(nh, hd).sum(1)
    kv = row_saliency(weight["k"], inv["attn"]).view(nkv, hd).sum(1) + row_saliency(
        weight["v"], inv["attn"]
    ).view(nkv, hd).sum(1)
    channels = column_saliency(weight["down"], inv["down"])
    for r in ("gate", "up"):
        if r in weight:
            channels = channels + row_saliency(weight[r], inv["mlp"])
    costs = adapter.unit_costs(layer)
    linear = nh * costs["head"] + nkv * costs["kv_head"] + ffn * costs["channel"]
    space = LayerSpace(
        Widths(nh, nkv, ffn),
        costs,
        adapter.layer_params(layer) - linear,
        heads.tolist(),
        kv.tolist(),
        channels.tolist(),
        attn_macs,
    )
    return LayerStats(space, H["o"].cpu(), H["down"].cpu(), energy.mean)


def dense_pass(
    model,
    adapter,
    tokens: torch.Tensor,
    percdamp: float,
    context: int,
    desc: str = "search: saliency",
    **driver,
) -> tuple[list[LayerStats], dict]:
    """LayerStats of every layer from one sequential pass over the DENSE model (nothing is
    pruned: layer i+1 sees dense layer-i outputs); phase timings. driver: run_sequential's
    device, batch_size, offload (PruneConfig.driver())."""
    stats: list[LayerStats] = []
    attn_macs = 2 * adapter.head_dim * context  # q.k and p.v per kept head and token
    timer = run_sequential(
        model,
        adapter,
        tokens,
        lambda w: stats.append(layer_stats(w, percdamp, attn_macs)),
        desc=desc,
        **driver,
    )
    return stats, timer.seconds
