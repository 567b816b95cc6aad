"""Which llama.cpp graph runs a slimops model, and its tensors in that graph's layout.

llama.cpp builds most architectures from SCALAR hyper-parameters (`hparams.n_head()` is layer
0's count, used for every layer), so a model whose layers differ only loads under a graph that
reads one value per layer. `deci` does (src/models/deci.cpp: `n_head(il)`, `n_head_kv(il)`,
`n_ff(il)`, optional q/k/v/o/FFN biases), but it has no place for Qwen3's per-head q/k norms.
The rule, per model:

  1. the family's own architecture (llama, qwen2, qwen3) when it can say the model: one shape
     for every layer, biases it takes, and for qwen2 heads * head_dim == hidden (its graph
     builds wq and wo as hidden x hidden);
  2. else `deci`, with the per-layer arrays (any GQA-valid slimops plan), unless the model
     has q/k norms;
  3. else (Qwen3 with per-layer shapes) the family's architecture with every layer zero-padded
     to the largest kept widths: padded query heads have zero q rows and zero o columns,
     padded KV groups zero k/v rows, padded FFN channels zero gate/up rows and zero down
     columns, so the function is unchanged (silu(0) * 0 = 0, a zero value vector contributes
     nothing) and llama.cpp's GQA mapping (query head j reads KV head j // rep) still pairs
     every kept head with its own group. It costs speed: the file runs at the padded size.

`llama` and `deci` rotate interleaved pairs (ggml's NORM rope) where HF rotates halves, so
their q and k rows (and biases) are permuted per head, with the layer's own head counts;
qwen2 and qwen3 use NEOX rope, HF's order, and are written as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.base import Widths

FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
NORM_ROPE_ARCHES = ("llama", "deci")  # interleaved rotary pairs: q/k rows permuted
# Optional biases each graph adds (llama.cpp src/models/<arch>.cpp, create_tensor_qkv).
ARCH_BIASES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "deci": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v"},
    "qwen3": {"q", "k", "v"},
}
GGUF_ROLE = {  # slimops projection role -> GGUF tensor name inside blk.N
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
}  # fmt: skip


def is_uniform(widths: list[Widths]) -> bool:
    return all(w == widths[0] for w in widths)


@dataclass
class Layout:
    """What the writer needs to know about the target graph."""

    arch: str
    widths: list[Widths]  # per layer, as written (padded where `padded`)
    padded: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        return is_uniform(self.widths)

    @property
    def permute_qk(self) -> bool:
        return self.arch in NORM_ROPE_ARCHES


def _fits_own(arch: str, widths: list[Widths], biases: set[str], hidden: int, head_dim: int):
    if not is_uniform(widths) or not biases <= ARCH_BIASES[arch]:
        return False
    return arch != "qwen2" or widths[0].heads * head_dim == hidden


def padded_widths(widths: list[Widths]) -> Widths:
    """The smallest shape every layer fits in: max KV groups x max query heads per group."""
    kv = max(w.kv_heads for w in widths)
    rep = max(w.rep for w in widths)
    return Widths(kv * rep, kv, max(w.ffn for w in widths))


def choose_layout(
    family: str,
    widths: list[Widths],
    biases: set[str],
    hidden: int,
    head_dim: int,
    has_qk_norm: bool,
) -> Layout:
    """The llama.cpp graph for these per-layer widths (module docstring: the three rules)."""
    if family not in FAMILY_ARCH:
        raise ValueError(
            f"cannot export family {family!r} to GGUF; exportable: {', '.join(FAMILY_ARCH)}"
        )
    own = FAMILY_ARCH[family]
    if _fits_own(own, widths, biases, hidden, head_dim):
        return Layout(own, list(widths))
    if not has_qk_norm and biases <= ARCH_BIASES["deci"]:
        why = (
            f"{own}'s graph cannot take heads x head_dim != hidden or these biases"
            if is_uniform(widths)
            else "per-layer shapes"
        )
        return Layout("deci", list(widths), notes=[f"written as deci ({why})"])
    pad = padded_widths(widths)
    if _fits_own(own, [pad], biases, hidden, head_dim):
        kept = sum(w.heads + w.ffn for w in widths) / (len(widths) * (pad.heads + pad.ffn))
        return Layout(
            own,
            [pad] * len(widths),
            padded=True,
            notes=[
                f"{own} graph has q/k norms but no per-layer shapes and deci has no q/k norms: "
                f"every layer zero-padded to {tuple(pad)} (exact; runs at the padded size, "
                f"{kept:.0%} of its heads + channels are real)"
            ],
        )
    raise ValueError(f"no llama.cpp graph takes this {family} model: biases {sorted(biases)}")


# --- tensors -------------------------------------------------------------------------------


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> ggml NORM (interleaved) rows, per head (llama.cpp's convert:
    reshape (heads, 2, d/2, ...), swap the middle axes). Works on weights and biases."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _pad_head_rows(w: torch.Tensor, slots: torch.Tensor, n_out: int, head_dim: int):
    """Rows of heads placed at `slots` of an n_out-head zero tensor (dim 0 = head rows)."""
    out = w.new_zeros(n_out * head_dim, *w.shape[1:])
    rows = (slots[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    out[rows] = w
    return out


def head_slots(have: Widths, want: Widths) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept query head and KV head goes in the padded layer: query head j of group
    g (j = g * rep + i) goes to g * want.rep + i, so llama.cpp's j // rep mapping holds."""
    q = torch.arange(have.heads)
    q_slots = (q // have.rep) * want.rep + q % have.rep
    return q_slots, torch.arange(have.kv_heads)


def pad_layer(tensors: dict, have: Widths, want: Widths, head_dim: int) -> dict:
    """Zero-pad one layer's {role: weight} / {role + '.bias': bias} to `want` (exact)."""
    if have == want:
        return tensors
    q_slots, kv_slots = head_slots(have, want)
    out = {}
    for key, t in tensors.items():
        role = key.split(".")[0]
        if role == "q":
            t = _pad_head_rows(t, q_slots, want.heads, head_dim)
        elif role in ("k", "v"):
            t = _pad_head_rows(t, kv_slots, want.kv_heads, head_dim)
        elif key == "o":  # (o's bias is hidden-wide: unchanged)
            t = _pad_head_rows(t.T, q_slots, want.heads, head_dim).T
        elif role in ("gate", "up"):
            t = torch.cat([t, t.new_zeros(want.ffn - have.ffn, *t.shape[1:])])
        elif key == "down":  # (down's bias too)
            t = torch.cat([t, t.new_zeros(t.shape[0], want.ffn - have.ffn)], dim=1)
        out[key] = t
    return out


def arrange_layer(tensors: dict, have: Widths, want: Widths, head_dim: int, layout: Layout):
    """A layer's projections as the target graph wants them: padded, then q/k rope-permuted."""
    tensors = pad_layer(tensors, have, want, head_dim)
    if layout.permute_qk:
        for key in [k for k in tensors if k.split(".")[0] in ("q", "k")]:
            heads = want.heads if key.startswith("q") else want.kv_heads
            tensors[key] = rope_permute(tensors[key], heads)
    return tensors
