"""The PruningPlan: what every method produces and slicing/checkpointing consume.

Indices are in the ORIGINAL model's numbering. Query head h belongs to KV group
h // (num_heads // num_kv_heads), as in HF's repeat_kv. A plan is valid GQA when every kept
query head lies in a kept KV group and every kept KV group keeps the same number of query
heads (then sorted kept heads map onto the new groups exactly as repeat_kv expects).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .models.base import Widths


@dataclass
class LayerPlan:
    kept_heads: list[int]  # query heads kept
    kept_kv_heads: list[int]  # KV heads (groups) kept
    kept_channels: list[int]  # FFN channels (intermediate units) kept
    drop_layer: bool = False  # the whole layer removed (search's depth moves)

    def widths(self) -> Widths:
        return Widths(len(self.kept_heads), len(self.kept_kv_heads), len(self.kept_channels))

    def shape(self) -> dict:
        """The layer's checkpoint config keys."""
        return self.widths().config()

    def removed(self, num_heads: int, intermediate_size: int) -> tuple[list[int], list[int]]:
        """(query heads, FFN channels) this plan removes from a layer of the given widths."""
        heads, channels = set(self.kept_heads), set(self.kept_channels)
        return (
            [h for h in range(num_heads) if h not in heads],
            [c for c in range(intermediate_size) if c not in channels],
        )

    def validate(self, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
        """Raise ValueError unless this layer plan is a valid (GQA-preserving) sub-shape."""
        rep = num_heads // num_kv_heads
        heads, kv, ch = self.kept_heads, self.kept_kv_heads, self.kept_channels
        if not heads or not kv:
            raise ValueError("a layer must keep at least one query head and one KV head")
        if not ch:
            raise ValueError("a layer must keep at least one FFN channel")
        for name, idx, n in (
            ("query head", heads, num_heads),
            ("KV head", kv, num_kv_heads),
            ("FFN channel", ch, intermediate_size),
        ):
            if sorted(set(idx)) != list(idx) or idx[0] < 0 or idx[-1] >= n:
                raise ValueError(f"kept {name} indices must be sorted, unique and < {n}")
        per_group = {g: 0 for g in kv}
        for h in heads:
            if h // rep not in per_group:
                raise ValueError(f"query head {h} is kept but its KV group {h // rep} is not")
            per_group[h // rep] += 1
        if len(set(per_group.values())) != 1:
            raise ValueError(
                f"kept KV groups keep unequal query-head counts {per_group}: not a valid GQA shape"
            )


@dataclass
class PruningPlan:
    layers: list[LayerPlan]
    method: str = "slimgpt"
    target_ratio: float = 0.0
    info: dict = field(default_factory=dict)  # per-method extras (schedule, damping, ...)
    kept_hidden: list[int] | None = None  # hidden dims kept (sheared); None: all

    def shapes(self) -> list[dict]:
        """Shapes of the layers the plan keeps (dropped layers are gone from the model)."""
        return [lp.shape() for lp in self.layers if not lp.drop_layer]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        raw = json.loads(text)
        raw["layers"] = [LayerPlan(**lp) for lp in raw["layers"]]
        return cls(**raw)

    @classmethod
    def dense(cls, num_layers: int, num_heads: int, num_kv_heads: int, intermediate: int):
        return cls(
            [
                LayerPlan(
                    list(range(num_heads)), list(range(num_kv_heads)), list(range(intermediate))
                )
                for _ in range(num_layers)
            ]
        )
