"""A user's mistake in the model's or the processor's inputs is one clear ValueError/TypeError that names the value
and what is valid, raised before anything reaches torch or transformers (issue 24, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from test_model import batch_inputs


@pytest.fixture(scope="module")
def model():
    return tiny.model(use_deft=True, deft_retention_ratio=0.25)


@pytest.fixture(scope="module")
def inputs():
    return dict(batch_inputs(tiny.processor(use_deft=True, deft_retention_ratio=0.25)))


def refused(fn, error=ValueError, **kwargs) -> str:
    with pytest.raises(error) as caught, torch.no_grad():
        fn(**kwargs)
    return str(caught.value)


@pytest.mark.parametrize("visual", [True, False])
def test_labels_shorter_than_input_ids(model, inputs, visual):
    batch = (
        inputs if visual else {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    )
    labels = batch["input_ids"][:, :-3]
    message = refused(model, **batch, labels=labels)
    assert f"labels of shape {tuple(labels.shape)}" in message
    assert str(tuple(batch["input_ids"].shape)) in message and "-100" in message


def test_labels_outside_the_vocabulary(model, inputs):
    labels = inputs["input_ids"].clone()
    labels[0, -1] = 999
    assert "[999]" in refused(model, **inputs, labels=labels)
    labels[0, -1] = -100  # the ignore index is a valid label
    with torch.no_grad():
        assert model(**inputs, labels=labels).loss is not None


@pytest.mark.parametrize("visual", [True, False])
def test_attention_mask_of_the_wrong_length(model, inputs, visual):
    mask = inputs["attention_mask"][:, :-2]
    batch = dict(inputs) if visual else {"input_ids": inputs["input_ids"]}
    batch["attention_mask"] = mask
    message = refused(model, **batch)
    assert f"attention_mask of shape {tuple(mask.shape)}" in message
    assert str(tuple(inputs["input_ids"].shape)) in message


@pytest.mark.parametrize("bad_id", [10_000, -1])
def test_token_ids_outside_the_vocabulary(model, inputs, bad_id):
    ids = inputs["input_ids"].clone()
    ids[0, -1] = bad_id
    message = refused(model, **{**inputs, "input_ids": ids})
    vocab = model.get_input_embeddings().num_embeddings
    assert f"[{bad_id}]" in message and f"0..{vocab - 1}" in message


def test_float_input_ids_are_a_type_error(model, inputs):
    assert "torch.float32" in refused(model, TypeError, input_ids=inputs["input_ids"].float())


def test_empty_input_ids(model):
    empty = torch.zeros(1, 0, dtype=torch.long)
    assert "(1, 0) holds no tokens" in refused(model, input_ids=empty)
    assert "(1, 0) holds no tokens" in refused(model.generate, input_ids=empty, max_new_tokens=2)


def test_one_channel_pixel_values(model, inputs):
    grey = inputs["pixel_values"][:, :1]
    message = refused(model, **{**inputs, "pixel_values": grey})
    assert f"pixel_values of shape {tuple(grey.shape)}" in message and "3 channels" in message


def test_valid_inputs_still_run(model, inputs):
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.loss is not None


def test_processor_images_without_text():
    processor = tiny.processor()
    message = refused(processor, images=tiny.images(1), text=None)
    assert "text=None" in message and "<image>" in message and "image_processor" in message


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_processor_two_dimensional_array(dtype):
    processor = tiny.processor()
    grey = np.zeros((32, 32), dtype=dtype)
    for images in (grey, [grey]):
        message = refused(processor, images=images, text=tiny.prompt(1))
        assert "(32, 32)" in message and "channels" in message
