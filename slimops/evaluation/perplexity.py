"""Perplexity over non-overlapping windows of a token stream (the GPTQ/SparseGPT protocol:
every token of the text is scored once, with up to seqlen-1 tokens of context)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int = 128,
    batch_size: int = 8,
    device=None,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """exp(mean NLL) over floor(len(ids) / seqlen) windows of seqlen tokens."""
    ids = ids.reshape(-1)
    windows = ids.numel() // seqlen
    if windows == 0:
        raise ValueError(f"eval text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        windows = min(windows, max_windows)
    device = device or next(model.parameters()).device
    data = ids[: windows * seqlen].view(windows, seqlen)
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, windows, batch_size), desc="ppl", disable=not progress, leave=False):
        batch = data[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)
