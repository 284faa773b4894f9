"""Stock or not: an export whose positions or attention differ from its family's stock model refuses to load in
stock transformers, with a message naming how to load it; `mmrope.from_pretrained` restores it.

An export with the family's own encoding (`mrope` for Qwen2-VL/Qwen2.5-VL, `mrope_i` for Qwen3-VL/Qwen3.5), no
DIPE and default hyperparameters (`mrope_section` aside: it is written to config.json and stock transformers
honours it) is a stock checkpoint: config.json is left as transformers wrote it. Any other export would load
silently in stock transformers and compute with the family's stock positions and attention, i.e. another model.
Its config.json gets the refusal message (`refusal_message`) in two fields, both read before any weight is:

- `model_type` (top level). `AutoConfig` looks it up in `CONFIG_MAPPING` and raises ValueError("The checkpoint you
  are trying to load has model type `<message>` but Transformers does not recognize this architecture ..."), and so
  does every Auto class (`AutoModelForImageTextToText`) and anything that resolves a checkpoint's config through
  AutoConfig (vLLM does, for model types it does not define itself; not run here). The family's own class does not
  look: `Qwen2_5_VLForConditionalGeneration.from_pretrained` only warns on another model_type.
- `text_config.rope_parameters.rope_type`. Every family's text rotary embedding looks a rope_type other than
  "default" up in `ROPE_INIT_FUNCTIONS` when the model is built and raises KeyError(`<message>`), whichever class
  builds it (the family's own class included, which lmms-eval's stock `qwen2_5_vl` model uses). It is also the field
  that names the model's rotary, so inference engines that build their own rotary from it meet an unknown type.
  Alone it is not enough: config validation only warns about an unknown rope_type ("Missing validation function
  ..."), so AutoConfig would load.

Considered and not taken (transformers 5.23): a string in a typed field (`@strict` refuses
`max_position_embeddings="<message>"` at config load, naming the value, but the field has nothing to do with the
reason and only 5.x configs are strict); `layer_types` entries (refused at config load, but the message comes after
every allowed layer type, and Qwen3-VL's text config declares no such field); `problem_type` (not checked).

`mmrope_encoding.json` records the original values (`stock_fields`); `load_config` puts them back. Exports written
before this marking have an unmarked config.json and load as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from mmrope.model.families import FAMILIES

STOCK_FIELDS_KEY = "stock_fields"  # in mmrope_encoding.json: {dotted config.json key: original value}
MARKED_KEYS = ("model_type", "text_config.rope_parameters.rope_type")
# the lmms-eval plugin: `lmms-eval --model mmrope --model_args pretrained=<export>`
LMMS_EVAL_MODEL = "mmrope"


def refusal_message(name: str, hparams: dict, dipe: bool, family: str) -> str:
    """One line (it is a config value): what the export is and how to load it."""
    what = " ".join([name, *(f"{k}={v}" for k, v in hparams.items() if k != "mrope_section")])
    what += " + DIPE" if dipe else ""
    return (
        f"mmrope export (rope={what}): not a stock {family} model, its positions or attention differ; load it "
        f"with mmrope.from_pretrained(path), or in lmms-eval with --model {LMMS_EVAL_MODEL}"
    )


def _parent(config: dict, dotted: str) -> tuple[dict, str]:
    *path, leaf = dotted.split(".")
    node = config
    for key in path:
        node = node[key]
    return node, leaf


def mark_not_stock(config_json: Path, message: str) -> dict[str, Any]:
    """Write `message` into config.json's refusing fields; returns their original values (`stock_fields`)."""
    config = json.loads(config_json.read_text())
    original = {}
    for dotted in MARKED_KEYS:
        node, leaf = _parent(config, dotted)
        original[dotted] = node[leaf]
        node[leaf] = message
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return original


def load_config(path: str | Path, meta: dict | None = None) -> PretrainedConfig:
    """The family config of an exported folder, with the stock fields a non-stock export marked restored.

    `meta`: its mmrope_encoding.json (read from `path` when None). Without `stock_fields` (a stock export, or one
    written before the marking) config.json is read as it is."""
    path = Path(path)
    if meta is None:
        meta = json.loads((path / "mmrope_encoding.json").read_text())
    family = FAMILIES[meta.get("model_family", "qwen2_5_vl")]
    config = json.loads((path / "config.json").read_text())
    for dotted, value in (meta.get(STOCK_FIELDS_KEY) or {}).items():
        node, leaf = _parent(config, dotted)
        node[leaf] = value
    if config.get("model_type") != family.name:
        raise ValueError(
            f"checkpoint: {path / 'config.json'} has model_type {config.get('model_type')!r}, but its "
            f"mmrope_encoding.json says model_family {family.name!r}"
        )
    return family.config_class.from_dict(config)


def checkpoint_config(path: str | Path) -> PretrainedConfig:
    """The config of a local checkpoint folder: an mmrope export's (`load_config`), else AutoConfig's, so a
    non-stock export can be the base model of a new run."""
    from transformers import AutoConfig

    if (Path(path) / "mmrope_encoding.json").is_file():
        return load_config(path)
    return AutoConfig.from_pretrained(path, local_files_only=True)
