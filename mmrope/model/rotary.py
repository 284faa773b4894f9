"""The text model's rotary module under mmrope: `language_model.rotary_emb` becomes `MMRopeRotaryEmbedding`.

It holds the encoding's `Rotary` ONCE for all layers (GRAPE's learned planes live there) and turns the 3-row
`position_ids` into `(cos, sin)` tables, or passes the positions through for GRAPE's learned modes (they rotate
q/k directly, there is no table). Installed by `mmrope.model.install.install`.
"""

from __future__ import annotations

from torch import Tensor, nn


class MMRopeRotaryEmbedding(nn.Module):
    """Replaces the text model's `rotary_emb`: holds the encoding's Rotary once for all layers.

    `forward(x, position_ids_3BL)` returns the float32 `(cos, sin)` tables, or, for GRAPE's learned modes (no
    tables), the positions themselves; `MMRopeAttention` accepts both.
    """

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self.returns_positions = hasattr(rotary, "apply_qk")  # GRAPE learned planes rotate q/k directly

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        if position_ids.ndim != 3 or position_ids.shape[0] != 3:
            raise ValueError(
                f"position_ids must be [3, B, L] for an mmrope model, got {tuple(position_ids.shape)}"
            )
        if self.returns_positions:
            return position_ids
        return self.rotary(position_ids)

    def rotate(self, q_BHLD: Tensor, k_BHkvLD: Tensor, embedding: tuple[Tensor, Tensor] | Tensor):
        if self.returns_positions:
            return self.rotary.rotate(q_BHLD, k_BHkvLD, embedding)
        cos, sin = embedding
        return self.rotary.apply_tables(q_BHLD, k_BHkvLD, cos, sin)
