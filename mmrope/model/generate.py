"""Generation with a KV cache for a model with an installed mmrope encoding (and DIPE, spec dipe.md 9.3): greedy,
or sampled (temperature, top-p) for evaluators that ask for it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from mmrope.encodings import Encoding, TokenIds, anchored_positions
from mmrope.model.families import tokens_per_second
from mmrope.model.install import is_installed, seam_kwargs, text_model


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    encoding: Encoding,
    input_ids_BL: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_grid_thw: Tensor | None = None,
    pixel_values_videos: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    second_per_grid_ts: Tensor | None = None,
    attention_mask_BL: Tensor | None = None,
    max_new_tokens: int,
    tokens: TokenIds,
    layout: str = "qwen3",
    dipe: bool = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Prompt + `max_new_tokens` greedy tokens, `[B, L + max_new_tokens]` (like HF `generate`).

    With `eos_token_id` it stops like HF `generate`: once every row produced it, rows that finished earlier
    continue with `pad_token_id` (default: eos), and the result may be shorter. Without it, no early stop.
    `stop(new_BN) -> done_B` marks more rows finished (e.g. a stop string was decoded); it needs `eos_token_id`.

    `temperature > 0` samples from `softmax(logits / temperature)` restricted to the smallest set of tokens whose
    probability reaches `top_p` (HF's nucleus rule), drawing from `generator`; 0 is greedy (argmax).
    Videos: `pixel_values_videos` + `video_grid_thw` (+ `second_per_grid_ts` for the qwen2_5 layout) as the data
    path makes them (`data.processing.Sample`).

    Prefill uses `encoding.position_ids` on the (left-padded) prompt; decode step `s` uses
    `encoding.decode_position_ids(rope_deltas, L + s)`. DIPE: a new token is a text query with that dynamic
    position and, as static position, the anchor of the last prompt token (constant during generation).
    Videos: a "qwen2_5"-layout video's temporal step is `second_per_grid_ts[i] * tokens_per_second`, the latter read
    from the model's vision config as transformers' own `get_rope_index` does.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if stop is not None and eos_token_id is None:
        raise ValueError("stop: needs eos_token_id (finished rows are padded)")
    if not is_installed(model):
        raise ValueError("model: install an mmrope encoding first (mmrope.model.install.install)")
    num_rows, prompt_len = input_ids_BL.shape
    device = input_ids_BL.device
    mask_BL = torch.ones_like(input_ids_BL) if attention_mask_BL is None else attention_mask_BL.to(device)
    if not bool(mask_BL[:, -1].all()):
        raise ValueError(
            "attention_mask_BL: generation needs left padding (the last prompt column must be real)"
        )
    pos_3BL, rope_deltas_B1 = encoding.position_ids(
        input_ids_BL,
        tokens=tokens,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        attention_mask_BL=mask_BL,
        layout=layout,
        tokens_per_second=tokens_per_second(model.config),
    )
    pos_3BL = pos_3BL.to(device)
    visual_BL = (input_ids_BL == tokens.image_token_id) | (input_ids_BL == tokens.video_token_id)
    prefill_kw = seam_kwargs(attention_mask_BL=mask_BL)
    if dipe:
        static_3BL = anchored_positions(pos_3BL, visual_BL, mask_BL)
        prefill_kw |= seam_kwargs(static_position_ids=static_3BL, visual_mask_BL=visual_BL)
        anchor_3B1 = static_3BL[:, :, -1:]  # spec 9.3: static of the last prompt token, fixed while decoding

    cache = DynamicCache(config=text_model(model).config)
    out = model.model(
        input_ids=input_ids_BL,
        position_ids=pos_3BL,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        past_key_values=cache,
        use_cache=True,
        **prefill_kw,
    )

    def pick(hidden_B1D: Tensor) -> Tensor:
        logits_BV = model.lm_head(hidden_B1D)[:, -1].float()
        if temperature == 0:
            return logits_BV.argmax(-1, keepdim=True)
        probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
        if top_p < 1:  # keep the most probable tokens up to top_p (always the first), renormalised
            sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
            drop_BV = sorted_BV.cumsum(-1) - sorted_BV >= top_p
            probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, 0))
        draw = torch.multinomial(probs_BV.cpu(), 1, generator=generator)
        return draw.to(logits_BV.device)

    def finished(next_B1: Tensor, sequence_BN: Tensor) -> Tensor:
        done_B1 = next_B1 == eos_token_id
        if stop is not None:
            done_B1 = done_B1 | stop(sequence_BN[:, prompt_len:]).view(-1, 1).to(device)
        return done_B1

    next_B1 = pick(out.last_hidden_state[:, -1:])
    sequence_BN = torch.cat([input_ids_BL, next_B1], dim=1)
    fill = eos_token_id if pad_token_id is None else pad_token_id
    done_B1 = finished(next_B1, sequence_BN) if eos_token_id is not None else None
    key_valid_BK, key_visual_BK = mask_BL.bool(), visual_BL
    text_query_B1 = torch.zeros(num_rows, 1, dtype=torch.bool, device=device)
    for step in range(max_new_tokens - 1):
        if done_B1 is not None and bool(done_B1.all()):
            break
        key_valid_BK = torch.cat([key_valid_BK, torch.ones_like(text_query_B1)], dim=1)
        key_visual_BK = torch.cat([key_visual_BK, text_query_B1], dim=1)
        cache_position_1 = torch.tensor([prompt_len + step], device=device)
        pos_3B1 = encoding.decode_position_ids(rope_deltas_B1.to(device), cache_position_1).to(device)
        step_kw = seam_kwargs(key_valid_BK=key_valid_BK)
        if dipe:
            step_kw |= seam_kwargs(
                key_visual_BK=key_visual_BK, static_position_ids=anchor_3B1, visual_mask_BL=text_query_B1
            )
        out = model.model(
            input_ids=next_B1, position_ids=pos_3B1, past_key_values=cache, use_cache=True, **step_kw
        )
        next_B1 = pick(out.last_hidden_state[:, -1:])
        if done_B1 is not None:  # finished rows keep emitting padding, as HF generate does
            next_B1 = next_B1.masked_fill(done_B1, fill)
        sequence_BN = torch.cat([sequence_BN, next_B1], dim=1)
        if done_B1 is not None:
            done_B1 = done_B1 | finished(next_B1, sequence_BN)
    return sequence_BN[:, : prompt_len + max_new_tokens]
