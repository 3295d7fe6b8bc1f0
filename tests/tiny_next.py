"""A tiny LLaVA-NeXT (hidden 32, 2 layers, 16x16 views of 4x4 patches, 1x2 / 2x1 / 2x2 tiles) for the
DeFT-LLaVA-NeXT tests; CPU, seconds. Stock twins share every weight."""

from __future__ import annotations

import numpy as np
import tiny
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

from modeling_deft_llava import (
    DeftLlavaNextConfig,
    DeftLlavaNextForConditionalGeneration,
    DeftLlavaNextProcessor,
)

VIEW, PATCH = 16, 4
PINPOINTS = [[16, 32], [32, 16], [32, 32]]
# (height, width): 1x2 tiles, 2x1, 1x2 unpadded to 2 of 4 rows, 2x2, 2x1 unpadded to 2 of 4 columns
SIZES = [(20, 40), (40, 22), (12, 60), (32, 32), (60, 14)]


def stock_fields() -> dict:
    tok = tiny.tokenizer(video=False)
    vision = {**tiny.vision_config(), "image_size": VIEW, "patch_size": PATCH}
    return dict(
        vision_config=vision,
        text_config=tiny.text_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(VIEW // PATCH) ** 2,
    )


def config(**overrides) -> DeftLlavaNextConfig:
    return DeftLlavaNextConfig(**{**stock_fields(), **overrides})


def model(seed: int = 0, **overrides) -> DeftLlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    return DeftLlavaNextForConditionalGeneration(config(**overrides)).eval()


def stock_model(seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(LlavaNextConfig(**stock_fields())).eval()


def stock_twin(deft_model) -> LlavaNextForConditionalGeneration:
    """Stock LLaVA-NeXT with the weights of `deft_model` (its compression method left out)."""
    stock = stock_model()
    state = {
        k: v for k, v in deft_model.state_dict().items() if ".deft." not in k and ".compressor." not in k
    }
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return stock


def image_processor():
    from transformers import LlavaNextImageProcessorPil  # the PIL backend by name: no torchvision notice

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": VIEW},
        crop_size={"height": VIEW, "width": VIEW},
        image_grid_pinpoints=PINPOINTS,
    )


def processor(stock: bool = False, **deft):
    tok = tiny.tokenizer(video=False)
    arguments = dict(
        image_processor=image_processor(),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    if stock:
        return LlavaNextProcessor(**arguments)
    return DeftLlavaNextProcessor(**arguments, **deft)


def image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def inputs(proc, sizes, prompts=None, seed: int = 0):
    """One sample per image of `sizes` (left padding), or `prompts` (each with its `<image>`s) over them."""
    images = [image(s, seed + i) for i, s in enumerate(sizes)]
    prompts = prompts or [tiny.prompt(1)] * len(sizes)
    proc.tokenizer.padding_side = "left"
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)
