"""Placeholder tokens the tokenizer lacks: the processor must never count `<unk>` as a placeholder.

A stock llava-hf folder's tokenizer has no `<video>` token (the public llava-hf tokenizers have none): video
is then unsupported (a clear error when a video is passed) and images work, also with prompts holding words
the tokenizer does not know (they become `<unk>`). A tokenizer without `<image>` is refused at construction.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.processing.word_tokenizer import SPECIAL_TOKENS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

DEFT = dict(use_deft=True, deft_retention_ratio=0.25)
UNKNOWN_WORDS = "what is a zebra doing ?"  # "zebra" and "doing" are not in tiny.WORDS


def image_processor():
    return CLIPImageProcessorPil(
        size={"shortest_edge": tiny.IMAGE_SIZE},
        crop_size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE},
    )


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    """A stock LLaVA model and processor saved as llava-hf publishes them: no `<video>` anywhere."""
    folder = tmp_path_factory.mktemp("llava-hf")
    tok = tiny.tokenizer(video=False)
    config = LlavaConfig(
        vision_config=tiny.vision_config(),
        text_config=tiny.text_config(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=tiny.NUM_PATCHES,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": tiny.IMAGE_SIZE},
        crop_size={"height": tiny.IMAGE_SIZE, "width": tiny.IMAGE_SIZE},
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=tiny.PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    ).save_pretrained(folder)
    return folder


def test_the_tokenizer_really_lacks_the_video_token():
    tok = tiny.tokenizer(video=False)
    assert "<video>" not in tok.get_vocab() and not hasattr(tok, "video_token")
    assert tok.convert_tokens_to_ids("<video>") == tok.unk_token_id  # what the processor used to take


@pytest.mark.parametrize("deft", [{}, DEFT])
def test_images_work_with_unknown_words(stock_folder, deft):
    processor = DeftLlavaProcessor.from_pretrained(stock_folder, **deft)
    text = [tiny.prompt(1, UNKNOWN_WORDS), tiny.prompt(1)]
    inputs = processor(images=tiny.images(2), text=text, return_tensors="pt", padding=True)
    unk = processor.tokenizer.unk_token_id
    assert int((inputs["input_ids"][0] == unk).sum()) == 2  # zebra, doing
    model = DeftLlavaForConditionalGeneration.from_pretrained(stock_folder, **deft).eval()
    assert model.config.video_token_index is None
    kept = model.config.num_kept_tokens(tiny.NUM_PATCHES)
    assert ((inputs["input_ids"] == model.config.image_token_index).sum(1) == kept).all()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert processor.video_token is None and processor.video_token_id is None


def test_a_video_is_refused_with_a_clear_error(stock_folder):
    processor = DeftLlavaProcessor.from_pretrained(stock_folder)
    with pytest.raises(
        ValueError,
        match=r"videos are not supported: this processor's tokenizer has no video placeholder token",
    ):
        processor(videos=[tiny.images(2)], text=["USER: <video>\nwhat is ? ASSISTANT:"])


def test_a_saved_processor_keeps_video_off(stock_folder, tmp_path):
    DeftLlavaProcessor.from_pretrained(stock_folder, **DEFT).save_pretrained(tmp_path)
    reloaded = DeftLlavaProcessor.from_pretrained(tmp_path)
    reloaded(images=tiny.images(1), text=[tiny.prompt(1, UNKNOWN_WORDS)])
    assert reloaded.video_token is None and reloaded.use_deft


def test_a_tokenizer_with_the_video_token_keeps_video():
    processor = tiny.processor()
    assert processor.video_token == "<video>" and processor.video_token_id == 5


def test_a_tokenizer_without_the_image_token_is_refused_at_construction():
    # before: the <unk> id became the image placeholder, so even a text-only prompt with an unknown word
    # failed with "Mismatch in `image` token count between text and `input_ids`"
    vocab = {t: i for i, t in enumerate([t for t in SPECIAL_TOKENS if t not in ("<image>", "<video>")])}
    vocab.update({w: len(vocab) + i for i, w in enumerate(tiny.WORDS)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    with pytest.raises(ValueError, match=r"the tokenizer has no '<image>' token .* add it with"):
        DeftLlavaProcessor(image_processor=image_processor(), tokenizer=tok, patch_size=tiny.PATCH)
