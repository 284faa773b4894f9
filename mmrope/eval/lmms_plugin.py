"""lmms-eval model `mmrope`: any export of this project (every family, encoding, DIPE, text_axes) in lmms-eval.

    .venv-eval/bin/lmms-eval --model mmrope --model_args pretrained=exported/videorope_dipe --batch_size 4 \\
        --tasks mmstar_qwen --output_path results/

Registered by the `lmms_eval.models` entry point of this package (`mmrope.eval.lmms_entry`). A chat model
(`is_simple = False`): every request's conversation goes through `mmrope.eval.chat.ChatModel`, i.e. the
training data path and generation with the export's own positions (DIPE included), never transformers'
`generate` (whose positions are the family's stock `get_rope_index`).

model_args (all optional but `pretrained`):
    pretrained      an exported folder (`python -m mmrope.train.export`)
    device, dtype   cpu | cuda | cuda:N (default: cuda when available, else cpu); fp32 | bf16 | fp16 (default
                    bf16 on CUDA, fp32 on CPU)
    (--batch_size)  rows per generation batch (left padded; greedy answers equal those of batch size 1)
    min_pixels, max_pixels   per-image pixel range (default: the export's image processor, i.e. training's)
    fps, max_num_frames      video file sampling (default: the training data's, `data.video` of the export)
    system_prompt   default: the training data's (`data.system_prompt`), else the chat template's own
    seed            sampling seed (tasks with temperature > 0)

Data parallel: under `accelerate launch` (one process per GPU) each process takes GPU `local_process_index`
and lmms-eval gives it the documents of its rank, as with lmms-eval's own models.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger
from tqdm import tqdm

from mmrope.eval.chat import ChatModel, gen_settings, unused_gen_keys


class MMRoPE(lmms):
    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        max_num_frames: int | None = None,
        system_prompt: str | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,  # lmms-eval passes it; batch_size is what we use
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"--model_args: unknown argument(s) {sorted(kwargs)} for --model mmrope")
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or ("bf16" if str(device).startswith("cuda") else "fp32")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch_size: must be an integer >= 1 for --model mmrope, got {batch_size!r}")
        self.batch_size_per_gpu = int(batch_size)
        self.chat = ChatModel(
            pretrained,
            device=device,
            dtype=dtype,
            min_pixels=None if min_pixels is None else int(min_pixels),
            max_pixels=None if max_pixels is None else int(max_pixels),
            fps=None if fps is None else float(fps),
            max_num_frames=None if max_num_frames is None else int(max_num_frames),
            system_prompt=system_prompt,
            seed=int(seed),
        )
        self._device = self.chat.device
        self._warned: set[str] = set()
        logger.info(f"mmrope: {pretrained} on {device} ({dtype}): {json.dumps(self.chat.settings())}")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model(self):
        return self.chat.model

    @property
    def tokenizer(self):
        return self.chat.processor.tokenizer

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "--model mmrope answers generation tasks (chat); loglikelihood is not supported"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model mmrope does not support multi-round generation tasks")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Requests grouped by their generation kwargs, in batches of `batch_size` in the given order."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[2], sort_keys=True, default=str)].append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mmrope answering")
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[2]
            unused = unused_gen_keys(gen_kwargs)
            if unused and str(unused) not in self._warned:
                logger.warning(f"mmrope: generation kwargs {unused} have no meaning here and are ignored")
                self._warned.add(str(unused))
            settings = gen_settings(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                conversations, keys = [], []
                for i in chunk:
                    _, doc_to_messages, _, doc_id, task, split = requests[i].args
                    messages = doc_to_messages(self.task_dict[task][split][doc_id])
                    conversations.append(ChatMessages(messages=messages).to_hf_messages())
                    keys.append(f"{task}/{split}/{doc_id}")
                answers = self.chat.generate(conversations, keys=keys, **settings)
                for i, answer in zip(chunk, answers):
                    num_tokens = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
                    results[i] = GenerationResult(
                        text=answer, token_counts=TokenCounts(output_tokens=num_tokens)
                    )
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answer)
                bar.update(len(chunk))
        bar.close()
        return results
