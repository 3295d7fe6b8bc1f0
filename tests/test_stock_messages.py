"""Error messages that tools and tests match on: ours start with stock LLaVA's wording (more may follow).

The stock message comes from running stock `LlavaForConditionalGeneration` / `ProcessorMixin` of the
installed transformers on the same bad input, so a wording change upstream shows up here.
"""

from __future__ import annotations

import pytest
import tiny
from test_model import batch_inputs
from transformers import ProcessorMixin
from transformers.models.llava.modeling_llava import LlavaModel
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoModel


def message_of(fn, *args, **kwargs) -> str:
    """The message of the ValueError that `fn(*args, **kwargs)` raises."""
    with pytest.raises(ValueError) as caught:
        fn(*args, **kwargs)
    return str(caught.value)


def drop_one_placeholder(inputs: dict) -> dict:
    """The same batch with the first `<image>` of row 0 replaced by a text token (one placeholder short)."""
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == 4).nonzero()[0])
    ids[0, first] = tiny.tokenizer().convert_tokens_to_ids("a")
    return dict(inputs, input_ids=ids)


@pytest.mark.parametrize("use_deft", [False, True])
def test_placeholder_count_mismatch_starts_with_stock_wording(use_deft):
    model = tiny.model(use_deft=use_deft, deft_retention_ratio=0.25)
    stock = tiny.stock_twin(model)
    bad = drop_one_placeholder(batch_inputs(tiny.processor(use_deft=use_deft, deft_retention_ratio=0.25)))
    ours = message_of(model, **bad)
    if use_deft:  # stock cannot run the compressed count: compare the wording with the counts filled in
        assert ours.startswith("Image features and image tokens do not match, tokens: 7, features: 8"), ours
    else:
        # stock's wording up to its feature count (5.18-5.24 print rows * hidden_size there; we print rows)
        stock = message_of(stock, **bad)
        assert stock.startswith("Image features and image tokens do not match, tokens: 31, features: ")
        assert ours.startswith(stock[: stock.index(", features: ")] + ", features: 32"), ours
    assert "DeftLlavaProcessor" in ours  # our helpful rest follows


def test_video_count_mismatch_uses_the_stock_video_wording():
    # stock LLaVA has no video input; the LLaVA video models (llava_next_video, llava_onevision, video_llava)
    # say "Video features and video tokens do not match, tokens: ..., features: ..."
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    inputs = processor(
        videos=[tiny.images(3)], text=["USER: <video>\nwhat is ? ASSISTANT:"], return_tensors="pt"
    )
    ids = inputs["input_ids"].clone()
    ids[0, int((ids[0] == 5).nonzero()[0])] = tiny.tokenizer().convert_tokens_to_ids("a")
    ours = message_of(model, **dict(inputs, input_ids=ids))
    assert ours.startswith("Video features and video tokens do not match, tokens: 11, features: 12"), ours


@pytest.mark.parametrize("case", ["neither", "both", "pixel_values_and_encoder_outputs"])
def test_input_checks_match_stock_wording(case):
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    stock = tiny.stock_twin(model)
    inputs = batch_inputs(tiny.processor(use_deft=True, deft_retention_ratio=0.25))
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    if case == "neither":
        bad = dict(input_ids=None, pixel_values=inputs["pixel_values"])
    elif case == "both":
        bad = dict(input_ids=inputs["input_ids"], inputs_embeds=embeds)
    else:
        features = model.model.get_image_features(inputs["pixel_values"])
        bad = dict(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            mm_encoder_outputs={"image": features},
        )
    assert message_of(model.model, **bad) == message_of(LlavaModel.forward, stock.model, **bad)


def test_video_pixels_and_encoder_outputs_together_are_refused_as_stock():
    # before: the pre-encoded video silently won and pixel_values_videos was ignored
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    inputs = tiny.processor(use_deft=True, deft_retention_ratio=0.25)(
        videos=[tiny.images(3)], text=["USER: <video>\nwhat is ? ASSISTANT:"], return_tensors="pt"
    )
    encoded = model.model.get_video_features(inputs["pixel_values_videos"])
    bad = dict(inputs, mm_encoder_outputs={"video": encoded})
    # stock LLaVA takes no video; the LLaVA video models' check runs first in their forward
    stock = message_of(LlavaNextVideoModel.forward, model.model, **bad)
    assert message_of(model.model, **bad) == stock


def stock_validation_message(processor, **inputs) -> str | None:
    """`ProcessorMixin.validate_inputs`' message for these inputs; None where it does not count placeholders
    (transformers 5.18 does not; 5.23 and 5.24 do)."""
    try:
        ProcessorMixin.validate_inputs(processor, **inputs)
    except ValueError as err:
        return str(err)
    return None


def test_processor_video_count_mismatch_uses_stock_wording():
    processor = tiny.processor()
    inputs = dict(videos=[tiny.images(2)], text=["USER: <video><video>\nwhat is ? ASSISTANT:"])
    expected = (
        "The total number of <video> tokens in the prompts should be the same as the number of videos passed. "
        "Found total 2 <video> tokens and 1 videos."
    )
    assert message_of(processor, **inputs) == expected
    assert stock_validation_message(processor, **inputs) in (expected, None)


def test_processor_video_placeholder_without_videos_is_refused_as_stock():
    # before: the placeholder was tokenised and reached the model as a plain token embedding, silently
    processor = tiny.processor()
    inputs = dict(images=tiny.images(1), text=["USER: <image>\n<video>\nwhat ? ASSISTANT:"])
    expected = "Found 1 <video> tokens in the text but no videos were passed."
    assert message_of(processor, **inputs) == expected
    assert stock_validation_message(processor, **inputs) in (expected, None)


def test_adaptive_outer_forward_refuses_pixels_and_encoder_outputs_as_stock():
    """Before: the outer forward's adaptive path silently used the pre-encoded features and dropped the pixels."""
    settings = dict(use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="adaptive")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    features = model.model.get_image_features(inputs["pixel_values"])
    bad = dict(inputs, mm_encoder_outputs={"image": features})
    with pytest.raises(ValueError, match="You cannot specify both pixel_values and mm_encoder_outputs"):
        model(**bad)


def test_collator_refuses_a_tokenizer_without_the_image_placeholder():
    """Before: the placeholder resolved to <unk>, so unknown answer words were masked as image tokens."""
    from modeling_deft_llava.training.collator import DeftLlavaDataCollator

    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)

    class StockLikeProcessor:  # a processor whose placeholder the tokenizer does not know
        tokenizer = processor.tokenizer
        image_token = "<no-such-image-token>"

    with pytest.raises(ValueError, match="the tokenizer has no '<no-such-image-token>' token"):
        DeftLlavaDataCollator(StockLikeProcessor())


def test_placeholders_must_hold_whole_images_per_sample():
    """Before: 5 + 3 placeholders for two images of 4 rows (total 8) were accepted, and one image's tokens
    landed in the other sample."""
    settings = dict(use_deft=True, deft_retention_ratio=0.25)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    ids = inputs["input_ids"].clone()
    row0 = (ids[0] == 4).nonzero()[:, 0]
    text0 = (ids[0] != 4).nonzero()[:, 0]
    text0 = text0[inputs["attention_mask"][0, text0].bool()]
    row1 = (ids[1] == 4).nonzero()[:, 0]
    ids[0, text0[-1]] = 4  # one more placeholder in sample 0 ...
    ids[1, row1[0]] = 5  # ... one fewer in sample 1: the total stays 2 x K
    assert int((ids == 4).sum()) == 8 and len(row0) == 4
    with pytest.raises(ValueError, match=r"do not match per sample: the samples hold \[5, 3\]"):
        model(**dict(inputs, input_ids=ids))
