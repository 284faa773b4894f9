"""The `lmms_eval.models` entry point of this package (pyproject.toml): registers `--model mmrope`.

lmms-eval loads every entry point whenever it lists models, so this module imports nothing heavy: the model
class (`mmrope.eval.lmms_plugin.MMRoPE`, torch + transformers) is imported only when `--model mmrope` is used.
"""

from __future__ import annotations

MODEL_ID = "mmrope"
CHAT_CLASS = "mmrope.eval.lmms_plugin.MMRoPE"


def manifests():
    """lmms-eval calls this (a callable payload) and registers the manifest it returns."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS)
