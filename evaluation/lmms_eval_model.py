"""`deft_llava`: DeFT-LLaVA as an lmms-eval model (lmms-eval 0.7, a "simple" model: `lmms_eval.api.model.lmms`).

    lmms-eval eval --model deft_llava \
        --model_args pretrained=FOLDER,compression_method=visionzip,deft_retention_ratio=0.25 \
        --tasks textvqa_val,gqa,mme,pope --batch_size 8 --log_samples --output_path logs/

`pretrained` is a DeFT-LLaVA folder or a stock llava-hf folder (read by `DeftLlavaForConditionalGeneration`
.from_pretrained, which also reads stock folders); every other model argument that is a DeFT setting
(`DEFT_CONFIG_KEYS`: `use_deft`, `deft_retention_ratio`, `compression_method`, `compression_settings` as JSON,
`deft_inference_mode`, `deft_question_aware`, ...) overrides the folder's config and processor. A compression
setting given without `use_deft` switches compression on; `use_deft=false` is the stock model.

Follows lmms-eval's own `llava_hf` model (`lmms_eval/models/simple/llava_hf.py`: one `<image>` per visual before
the context unless the context places them, the folder's chat template, greedy unless `temperature > 0`), with
these differences:
- batches: `--batch_size B` runs B requests of one task and one set of generation settings in one padded
  `generate` (left padding; llava_hf takes one at a time);
- `loglikelihood` is not offered (the generation tasks this model is compared on do not use it): it raises
  NotImplementedError naming the method;
- the visual tokens the language model saw: every answer carries lmms-eval's `TokenCounts` plus
  `visual_tokens` / `visual_tokens_per_image` (written per sample with `--log_samples`), and each
  `generate_until` call logs `visual tokens kept per image` (mean, min, max) with the encoder's count at INFO
  (`--verbosity INFO`).
  For a method that writes K placeholders per image the count is K, read from the prompt; for one that decides the
  count in the forward pass (DeFT `hybrid`/`adaptive`, PruneSID `dynamic_budget`) it costs one extra prefill
  (`kept_indices` of a forward, as `serving/handler.py` counts them).
Generation settings read from a task: `until` (the answer is cut at the first of these strings),
`max_new_tokens` (default 1024), `temperature` (0: greedy), `top_p`, `num_beams`, `do_sample`.

Raises:
    ValueError: an unknown model argument (names the valid ones), or a bad DeFT setting (the config's own checks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from modeling_deft_llava.configuration.configuration_deft_llava import DEFT_CONFIG_KEYS
from PIL import Image

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.compressors.compression_registry import method_class

IMAGE_TOKEN = "<image>"
MODEL_ARGS = (
    "pretrained",
    "device",
    "dtype",
    "batch_size",
    "max_new_tokens",
    "attn_implementation",
    "chat_template",
)


@dataclass
class DeftTokenCounts(TokenCounts):
    """lmms-eval's per-sample counts plus the visual tokens the language model saw (after compression)."""

    visual_tokens: int | None = None
    visual_tokens_per_image: list[int] | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["visual_tokens"] = self.visual_tokens
        out["visual_tokens_per_image"] = self.visual_tokens_per_image
        return out


def deft_overrides(arguments: dict) -> dict:
    """The DeFT settings among lmms-eval's parsed `--model_args` (`compression_settings` may be a JSON string).

    Raises:
        ValueError: an argument that is neither a model argument (`MODEL_ARGS`) nor a DeFT setting.
    """
    unknown = sorted(set(arguments) - set(MODEL_ARGS) - set(DEFT_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"deft_llava: unknown model argument(s) {unknown}; valid: {list(MODEL_ARGS)} and the DeFT settings "
            f"{list(DEFT_CONFIG_KEYS)}"
        )
    overrides = {key: arguments[key] for key in DEFT_CONFIG_KEYS if key in arguments}
    if isinstance(overrides.get("compression_settings"), str):
        overrides["compression_settings"] = json.loads(overrides["compression_settings"])
    if overrides and "use_deft" not in overrides:
        overrides["use_deft"] = True  # a compression setting asks for compression
    return overrides


def user_content(context: str, num_images: int) -> list[dict]:
    """The chat-template content of one request: the context's own `<image>` tokens become image parts in place
    (a task that places its images); otherwise the images come first, then the text (as lmms-eval's llava_hf).

    Raises:
        ValueError: the context holds a number of `<image>` tokens other than the number of images.
    """
    count = context.count(IMAGE_TOKEN)
    if count == 0:
        return [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
    if count != num_images:
        raise ValueError(
            f"the context holds {count} {IMAGE_TOKEN!r} token(s) but the task gave {num_images} image(s)"
        )
    content = []
    for i, part in enumerate(context.split(IMAGE_TOKEN)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return content


class DeftLlavaLmmsEval(lmms):
    """DeFT-LLaVA (any compression method) for lmms-eval; see the module docstring.

    Args:
        pretrained: a DeFT-LLaVA or stock llava-hf folder (or Hub id).
        device: `"cuda"` when available, else `"cpu"` (default); dtype: `"auto"` (the folder's), or a torch
            dtype name; batch_size: requests per `generate`; max_new_tokens: when the task sets none;
        attn_implementation: passed to `from_pretrained`; chat_template: a Jinja template replacing the folder's.
        **settings: DeFT settings (`DEFT_CONFIG_KEYS`), as in `from_pretrained`.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 1024,
        attn_implementation: str | None = None,
        chat_template: str | None = None,
        **settings,
    ) -> None:
        super().__init__()
        self.settings = deft_overrides(settings)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        load = {"dtype": torch_dtype}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        self.model = (
            DeftLlavaForConditionalGeneration.from_pretrained(pretrained, **load, **self.settings)
            .to(self._device)
            .eval()
        )
        self.processor = DeftLlavaProcessor.from_pretrained(pretrained, **self.settings)
        self.processor.tokenizer.padding_side = "left"  # batched generation
        if chat_template is not None:
            self.processor.chat_template = chat_template
        if self.processor.chat_template is None:
            raise ValueError(
                f"deft_llava: {pretrained!r} has no chat template; pass chat_template=... in --model_args"
            )
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        config = self.model.config
        self.counts_in_forward = bool(config.use_deft) and method_class(
            config.compression_method
        ).writes_all_placeholders(config)
        self.pretrained = pretrained

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            "deft_llava answers generation tasks (generate_until); loglikelihood is not offered"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("deft_llava: multi-round generation is not offered")

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in the order of `requests`; batches of `batch_size` requests that share task, split and
        generation settings."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            key = json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        seen: list[int] = []
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, result in zip(chunk, self._generate([requests[i] for i in chunk])):
                    results[i] = result
                    seen.extend(result.token_counts.visual_tokens_per_image)
        if seen:
            logger.info(
                f"deft_llava: visual tokens kept per image: mean {sum(seen) / len(seen):.2f}, min {min(seen)}, "
                f"max {max(seen)} over {len(seen)} images (compression "
                + (
                    f"{self.model.config.compression_method!r} at deft_retention_ratio="
                    f"{self.model.config.deft_retention_ratio})"
                    if self.model.config.use_deft
                    else "off)"
                )
            )
        return results

    def _generate(self, batch: list[Instance]) -> list[GenerationResult]:
        contexts, texts, images, images_per_request = [], [], [], []
        for request in batch:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = [v.convert("RGB") for v in doc_to_visual(self.task_dict[task][split][doc_id])]
            if not all(isinstance(v, Image.Image) for v in visuals):
                raise ValueError("deft_llava takes image tasks (PIL images from doc_to_visual)")
            messages = [{"role": "user", "content": user_content(context, len(visuals))}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
            contexts.append(context)
            images.extend(visuals)
            images_per_request.append(len(visuals))
        gen_kwargs = dict(batch[0].args[1])
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        generation = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if do_sample:
            generation["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                generation["top_p"] = float(gen_kwargs["top_p"])
        inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt").to(
            self._device
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            per_image = self._visual_tokens_per_image(inputs)
            output = self.model.generate(**inputs, **generation)
        prompt_length = inputs["input_ids"].shape[1]
        results, image_cursor = [], 0
        for row in range(len(batch)):
            new = output[row, prompt_length:]
            text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            kept = per_image[image_cursor : image_cursor + images_per_request[row]]
            image_cursor += images_per_request[row]
            counts = DeftTokenCounts(
                input_tokens=int(inputs["attention_mask"][row].sum()),
                output_tokens=int((new != self.processor.tokenizer.pad_token_id).sum()),
                visual_tokens=sum(kept),
                visual_tokens_per_image=kept,
            )
            results.append(GenerationResult(text=text, token_counts=counts))
            self.cache_hook.add_partial("generate_until", (contexts[row], batch[0].args[1]), text)
        return results

    def _visual_tokens_per_image(self, inputs) -> list[int]:
        """Visual tokens the language model sees per image, in the batch's image order."""
        if "pixel_values" not in inputs:
            return []
        if self.counts_in_forward:  # the count is decided in the forward pass: one extra prefill
            return [int(len(k)) for k in self.model(**inputs).kept_indices]
        num_images = inputs["pixel_values"].shape[0]
        placeholders = int((inputs["input_ids"] == self.model.config.image_token_index).sum())
        return [placeholders // num_images] * num_images


__all__ = ["DeftLlavaLmmsEval", "DeftTokenCounts", "deft_overrides", "user_content"]
