"""mmrope: fine-tune Qwen-VL style models with selectable multimodal position encodings.

    import mmrope
    model, processor = mmrope.from_pretrained("exported/mrope")   # an exported folder, no torchvision needed
    out = mmrope.generate(model, processor, processor(text=..., images=[...]), max_new_tokens=32)

The two names are imported on first use, so `import mmrope.encodings` stays pure torch (no transformers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["from_pretrained", "generate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mmrope import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
