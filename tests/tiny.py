"""A tiny DeFT-LLaVA (hidden 32, 2 layers, 32x32 images, 4x4 patches) shared by the tests; CPU, seconds."""

from __future__ import annotations

import numpy as np
import torch
from modeling_deft_llava.processing.word_tokenizer import build_word_tokenizer
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor

WORDS = ["USER", ":", "ASSISTANT", "what", "is", "in", "the", "picture", "?", "a", "cat", "dog", "and"] + [
    str(i) for i in range(10)
]
IMAGE_SIZE, PATCH = 32, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16


def vision_config(model_type: str = "clip_vision_model"):
    """The tiny CLIP tower (CLS first); `model_type="siglip_vision_model"`: the same sizes without a CLS token
    (LLaVA then uses `vision_feature_select_strategy="full"`, see `SIGLIP`)."""
    return dict(
        model_type=model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )


# overrides of `config` and `processor` for a SigLIP tower: no CLS token, so every feature is a patch
SIGLIP = dict(vision_config=vision_config("siglip_vision_model"), vision_feature_select_strategy="full")
SIGLIP_PROCESSOR = dict(vision_feature_select_strategy="full", num_additional_image_tokens=0)


def text_config(vocab_size):
    return dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def tokenizer(video: bool = True):
    """The word tokenizer of `WORDS`; `video=False`: without `<video>`, as the public llava-hf tokenizers."""
    return build_word_tokenizer(WORDS, video=video)


def config(**overrides) -> DeftLlavaConfig:
    """The tiny config; `overrides`: DeFT settings, or any other `DeftLlavaConfig` field (e.g. `**SIGLIP`)."""
    tok = tokenizer()
    fields = dict(
        vision_config=vision_config(),
        text_config=text_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return DeftLlavaConfig(**{**fields, **overrides})


def model(seed: int = 0, **deft) -> DeftLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return DeftLlavaForConditionalGeneration(config(**deft)).eval()


def stock_twin(deft_model) -> LlavaForConditionalGeneration:
    """Stock LLaVA with the same weights (DeFT modules left out)."""
    cfg = deft_model.config
    stock_cfg = LlavaConfig(
        vision_config=cfg.vision_config.to_dict(),
        text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_index,
        image_seq_length=cfg.image_seq_length,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    stock = LlavaForConditionalGeneration(stock_cfg).eval()
    state = {k: v for k, v in deft_model.state_dict().items() if ".deft." not in k}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    return stock


def processor(**overrides) -> DeftLlavaProcessor:
    """The tiny processor; `overrides`: DeFT settings, or any other argument (e.g. `**SIGLIP_PROCESSOR`)."""
    tok = tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    arguments = dict(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return DeftLlavaProcessor(**{**arguments, **overrides})


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(n)
    ]


def prompt(n_images: int = 1, question: str = "what is in the picture ?") -> str:
    return "USER: " + "<image>" * n_images + "\n" + question + " ASSISTANT:"
