"""Export a committed ZeRO-2/3 checkpoint as a Hugging Face model directory.

    python -m mmrope.train.export runs/<run_name>/checkpoints            # the latest committed step
    python -m mmrope.train.export runs/<run_name>/checkpoints/step_300 --out exported/ --dtype bf16

Writes: `model.safetensors` (+ `config.json`, `generation_config.json`) for the whole VLM, frozen ViT
included; the tokenizer (with its chat template) and the image processor; and `mmrope_encoding.json`, the
position encoding the model was trained with. With the family's own encoding (`mrope` for Qwen2-VL/Qwen2.5-VL,
`mrope_i` for Qwen3-VL(-MoE)/Qwen3.5(-MoE); no DIPE, default hyperparameters but `mrope_section`) the directory is
a stock checkpoint (`stock: true`): the family's `*ForConditionalGeneration.from_pretrained(out)` computes what the
training model computed, given `mm_token_type_ids` (mmrope/train/README.md). Any other export would compute something else there,
so its config.json carries fields stock transformers refuses, with a message naming `mmrope.from_pretrained` and
lmms-eval's `--model mmrope` (`mmrope.model.stock`). Every export loads with `mmrope.from_pretrained(out)`, which
restores those fields and installs the encoding (and DIPE) from mmrope_encoding.json.

With an adapter (`adapter=lora|qlora`) the checkpoint holds the adapters (and any other trained parameter) only.
The export rebuilds the base model, wraps it with PEFT's LoRA over the same modules, loads the trained tensors and
writes the merged model (`merge_and_unload`: a normal export, as above). `--adapter-only` writes the PEFT adapter
folder instead (`adapter_config.json` + `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained`
onto the base): its `base/` subfolder is the base export (the model the adapters were trained on, with the same
encoding metadata), or, for a pretrained stock checkpoint, `base_model_name_or_path` names `model.path` itself.

    python -m mmrope.train.export runs/<run_name>/checkpoints --adapter-only --out exported/lora

An encoding with learned parameters (GRAPE's `axis`/`mixed`/`block_mixed` planes, which live in the installed
rotary module, not in the transformers model) writes them to `mmrope_rotary.safetensors` next to the model;
`mmrope.from_pretrained` loads them into the encoding it installs.

The weights come from DeepSpeed's own consolidation (`get_fp32_state_dict_from_zero_checkpoint`: fp32 master
weights of the trainable parameters + the frozen ones from the model-state files). The engine wraps the VLM
in `SFTObjective`, so keys arrive prefixed `vlm.`. Parameters the shards do not hold (frozen parameters of an
`exclude_frozen_parameters` save) are taken from the base model rebuilt from the config: frozen means they
never moved from it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mmrope.model.families import FAMILIES
from mmrope.pretrained import ROTARY_FILE
from mmrope.train.checkpoint import MANIFEST, CheckpointManager
from mmrope.train.config import TrainConfig

WRAPPER_PREFIX = "vlm."
ROTARY_KEY = (
    "rotary_emb.rotary."  # the installed MMRopeRotaryEmbedding's encoding module (mmrope.model.rotary)
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory (`.../step_N`) as is; a checkpoints directory -> its latest committed step."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = CheckpointManager(path, rank=0, world_size=1).latest()
    if latest is None:
        raise ValueError(f"checkpoint: {str(path)!r} is neither a committed step nor holds one")
    return latest


def config_from_manifest(manifest: dict) -> TrainConfig:
    if "train_config" not in manifest:
        raise ValueError("checkpoint: the manifest has no `train_config` (saved by an older mmrope)")
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(manifest["train_config"]))
    return OmegaConf.to_object(merged)


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The VLM's full fp32 state dict from the ZeRO shards, without the `vlm.` wrapper prefix."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items() if k.startswith(WRAPPER_PREFIX)}


def rotary_parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the installed encoding's own parameters (`...rotary_emb.rotary.<name>`) out of a consolidated state
    dict; returns them keyed by their name inside the encoding's Rotary module."""
    keys = [k for k in state if ROTARY_KEY in k]
    return {k.split(ROTARY_KEY, 1)[1]: state.pop(k) for k in keys}


def save_rotary(rotary_state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in rotary_state.items()}, str(Path(out) / ROTARY_FILE))


def is_stock(name: str, hparams: dict, dipe: bool, family: str) -> bool:
    """Whether stock transformers computes what the training model computed: the family's own encoding (MRoPE
    for Qwen2(.5)-VL, interleaved MRoPE for Qwen3-VL(-MoE) and Qwen3.5(-MoE)), no DIPE, every hyperparameter but `mrope_section` (written
    to the exported config) at its default."""
    from mmrope.encodings import build

    if dipe or FAMILIES[family].stock_encoding != name:
        return False
    defaults, used = build(name).hparams, build(name, **hparams).hparams
    return all(used[k] == defaults[k] for k in used if k != "mrope_section")


def write_export(
    model: torch.nn.Module,
    processor,
    out: str | Path,
    *,
    name: str,
    hparams: dict,
    dipe: bool,
    layout: str,
    family: str,
    **record,
) -> Path:
    """Save a built VLM (in its dtype) with its processor and `mmrope_encoding.json` (encoding + `record`) to `out`.

    A stock export gets the trained `mrope_section` in config.json (stock transformers splits the rotary channels
    by it); any other export gets config.json fields that stock transformers refuses, naming `mmrope.from_pretrained`
    (`mmrope.model.stock`), and their original values in mmrope_encoding.json."""
    from mmrope.encodings import build
    from mmrope.model.stock import STOCK_FIELDS_KEY, mark_not_stock, refusal_message

    out = Path(out)
    model.eval()
    model.config.use_cache = True
    stock = is_stock(name, hparams, dipe, family)
    if stock:
        section = list(build(name, **hparams).hparams["mrope_section"])
        model.config.get_text_config().rope_parameters["mrope_section"] = section
    model.save_pretrained(out, safe_serialization=True)
    processor.save(out)
    encoding = {
        "name": name,
        "hparams": hparams,
        "dipe": dipe,
        "layout": layout,
        "stock": stock,
        "model_family": family,
        **record,
    }
    if not stock:
        message = refusal_message(name, hparams, dipe, family)
        encoding[STOCK_FIELDS_KEY] = mark_not_stock(out / "config.json", message)
    (out / "mmrope_encoding.json").write_text(json.dumps(encoding, indent=1, default=str))
    return out


def export(
    checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", adapter_only: bool = False
) -> Path:
    from data.processor import processor_for
    from mmrope.model.build import build_model

    if dtype not in DTYPES:
        raise ValueError(f"argument `--dtype`: {dtype!r} is not one of {sorted(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    cfg = config_from_manifest(manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    d = cfg.data
    processor = processor_for(
        cfg.model, cache_dir=d.cache_dir, min_pixels=d.min_pixels, max_pixels=d.max_pixels
    )
    # The base model: architecture + config, and the source of any parameter the shards do not hold.
    model = build_model(
        cfg.model,
        vocab_size=len(processor.tokenizer),
        special_ids=processor.special_ids,
        seed=cfg.trainer.seed,
    )
    adapter = cfg.adapter.name != "none"
    if adapter_only and not adapter:
        raise ValueError(
            f"argument `--adapter-only`: {step_dir} was trained without an adapter (adapter=none)"
        )
    peft_model = None
    if adapter:  # the base wrapped with PEFT's LoRA over the modules training adapted (same paths, same init)
        from peft import get_peft_model

        from mmrope.distributed.adapters import lora_config, resolve_targets

        base = model
        targets = [n for names in resolve_targets(base, cfg.adapter.targets).values() for n in names]
        peft_model = get_peft_model(base, lora_config(cfg.adapter, targets))
        model = peft_model.base_model.model  # the base itself, LoRA layers injected in place
    trained = consolidated_state_dict(step_dir)
    rotary_state = rotary_parameters(trained)  # removed from `trained`: the bare model has no such modules
    expected = model.state_dict()
    unknown = sorted(set(trained) - set(expected))
    if unknown:
        raise RuntimeError(f"checkpoint {step_dir} holds parameters the model does not have: {unknown[:5]}")
    from_base = sorted(k for k in expected if k not in trained)
    tied = {"lm_head.weight"} if model.config.get_text_config().tie_word_embeddings else set()
    if any(k not in tied for k in from_base):
        print(
            f"export: {len(from_base)} tensors not in the shards, kept from the base model: {from_base[:5]}..."
        )
    model.load_state_dict(trained, strict=False)
    rope = cfg.rope
    encoding = dict(name=rope.name, hparams=dict(rope.hparams), dipe=rope.dipe, layout=cfg.rope_layout())
    encoding.update(family=cfg.model.family, config_hash=manifest["config_hash"])
    # how the training data was processed, so that evaluators prompt like training (mmrope.eval.chat)
    encoding["data"] = {"video": asdict(d.video), "system_prompt": d.system_prompt}
    if peft_model is not None and adapter_only:
        return _export_adapter(peft_model, trained, cfg, processor, out, encoding, manifest, dtype, step_dir)
    if peft_model is not None:
        adapted = sorted({k.split(".lora_")[0] for k in trained if ".lora_" in k})
        model = peft_model.merge_and_unload()  # W + scale * B @ A into each base layer; plain modules again
        print(f"export: {len(adapted)} adapted modules merged into their base weights")
    model.to(DTYPES[dtype])
    write_export(model, processor, out, trained_steps=manifest["step"], **encoding)
    if rotary_state:
        save_rotary(rotary_state, out, DTYPES[dtype])
        print(f"export: the encoding's {len(rotary_state)} learned tensors -> {ROTARY_FILE}")
    print(f"exported step {manifest['step']} of {step_dir} -> {out} ({dtype})")
    return out


def _export_adapter(
    peft_model, trained, cfg, processor, out: Path, encoding, manifest, dtype, step_dir
) -> Path:
    """`--adapter-only`: the PEFT adapter folder, and the base it applies to (`base/`, unless it is model.path)."""
    other = sorted(k for k in trained if ".lora_" not in k)
    if other:
        raise ValueError(
            f"argument `--adapter-only`: {step_dir} also trained {len(other)} parameters outside the adapters "
            f"({other[:3]}...: an unfrozen model.freeze group or the encoding's learned planes), which a PEFT "
            "adapter folder does not carry; export the merged model (without --adapter-only)"
        )
    base_dir = out / "base"
    reuse = False  # a pretrained stock checkpoint whose config holds the trained section is the base itself
    stock = is_stock(encoding["name"], encoding["hparams"], encoding["dipe"], encoding["family"])
    if cfg.model.kind == "pretrained" and stock:
        from transformers import AutoConfig

        from mmrope.encodings import build

        section = list(build(encoding["name"], **encoding["hparams"]).hparams["mrope_section"])
        saved = AutoConfig.from_pretrained(cfg.model.path, local_files_only=True).get_text_config()
        reuse = (saved.rope_parameters or {}).get("mrope_section") == section
    peft_model.peft_config["default"].base_model_name_or_path = str(
        Path(cfg.model.path).resolve() if reuse else base_dir.resolve()
    )
    peft_model.to(DTYPES[dtype])
    peft_model.save_pretrained(out, safe_serialization=True)
    if not reuse:  # the untouched base (adapters unloaded, nothing merged), a normal export of its own
        base = peft_model.unload()
        base.to(DTYPES[dtype])
        write_export(base, processor, base_dir, trained_steps=0, **encoding)
    processor.save(out)
    print(
        f"exported the adapter of step {manifest['step']} of {step_dir} -> {out} ({dtype}); base: "
        f"{cfg.model.path if reuse else base_dir}"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmrope.train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step_N directory, or a checkpoints directory (its latest step)")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/export/step_N)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="adapter runs: write the PEFT adapter folder (+ its base in base/) instead of the merged model",
    )
    args = p.parse_args(argv)
    step_dir = resolve_checkpoint(args.checkpoint)
    out = args.out or step_dir.parent.parent / "export" / (
        step_dir.name + ("_adapter" if args.adapter_only else "")
    )
    export(step_dir, out, dtype=args.dtype, adapter_only=args.adapter_only)


if __name__ == "__main__":
    main()
