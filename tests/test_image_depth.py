"""16-bit grey images (PIL `I;16`/`I`, 16-bit PNG files, uint16 arrays) keep their grey levels: they are scaled
to 8 bits (value / 257) before the RGB conversion, in the processor, in the training data and in the Hub
validation; PIL's own `convert("RGB")` clips them to 0..255 and keeps a handful of levels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch
from modeling_deft_llava.training.data import ConversationDataset
from PIL import Image

SIZE = tiny.IMAGE_SIZE


def grey16() -> np.ndarray:
    """A `(32, 32)` uint16 ramp over the whole 16-bit range: 1024 levels."""
    return np.linspace(0, 65535, SIZE * SIZE).round().astype(np.uint16).reshape(SIZE, SIZE)


def grey8(values: np.ndarray) -> Image.Image:
    """What a 16-bit image should become: value / 257, rounded, as an RGB image."""
    return Image.fromarray((values.astype(np.float64) / 257).round().astype(np.uint8)).convert("RGB")


def sixteen_bit_inputs(tmp_path) -> dict:
    values = grey16()
    png = tmp_path / "grey16.png"
    Image.fromarray(values).save(png)
    opened = Image.open(png)
    assert opened.mode == "I;16"  # how Pillow reads a 16-bit grey PNG
    return {
        "I;16": Image.fromarray(values),
        "16-bit PNG file": opened,
        "I": Image.fromarray(values.astype(np.int32)),
        "uint16 array": np.stack([values] * 3, axis=-1),  # (height, width, 3): 2-D arrays are no image
    }


@pytest.mark.parametrize("kind", ["I;16", "16-bit PNG file", "I", "uint16 array"])
def test_the_processor_keeps_the_grey_levels_of_16_bit_images(tmp_path, kind):
    image = sixteen_bit_inputs(tmp_path)[kind]
    processor = tiny.processor(use_deft=True)
    got = processor(images=[image], text=[tiny.prompt()], return_tensors="pt")["pixel_values"]
    want = processor(images=[grey8(grey16())], text=[tiny.prompt()], return_tensors="pt")["pixel_values"]
    assert torch.unique(want).numel() > 200
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_video_frames_of_16_bits_keep_their_grey_levels():
    processor = tiny.processor(use_deft=True)
    prompt = "USER: <video>\nwhat ? ASSISTANT:"
    frames = [Image.fromarray(grey16()), Image.fromarray(grey16()[::-1].copy())]
    want_frames = [grey8(grey16()), grey8(grey16()[::-1].copy())]
    got = processor(videos=[frames], text=[prompt], return_tensors="pt")["pixel_values_videos"]
    want = processor(videos=[want_frames], text=[prompt], return_tensors="pt")["pixel_values_videos"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_training_data_keeps_the_grey_levels_of_16_bit_pngs(tmp_path):
    Image.fromarray(grey16()).save(tmp_path / "grey16.png")
    row = {
        "image": "grey16.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "a ramp"}],
    }
    (tmp_path / "d.json").write_text(json.dumps([row]))
    (image,) = ConversationDataset(tmp_path / "d.json")[0]["images"]
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(grey8(grey16())))


def test_eight_bit_and_colour_images_are_left_as_they_are():
    from modeling_deft_llava.processing.image_depth import to_eight_bit

    rgb = tiny.images(1)[0]
    assert to_eight_bit(rgb) is rgb
    grey = rgb.convert("L")
    assert to_eight_bit(grey) is grey
    array = np.asarray(rgb)
    assert to_eight_bit(array) is array


def test_a_mode_i_image_of_8_bit_values_is_read_as_8_bits():
    """Mode `I` says 32-bit integers, not the range: 0..255 values are an 8-bit picture (it became nearly black)."""
    values = (np.arange(SIZE * SIZE) % 256).astype(np.uint8).reshape(SIZE, SIZE)
    processor = tiny.processor(use_deft=True)
    got = processor(
        images=[Image.fromarray(values.astype(np.int32))], text=[tiny.prompt()], return_tensors="pt"
    )
    want = processor(
        images=[Image.fromarray(values).convert("RGB")], text=[tiny.prompt()], return_tensors="pt"
    )
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["array", "tensor"])
def test_a_float_image_in_0_1_reads_as_its_8_bit_twin(kind):
    eight = np.asarray(tiny.images(1)[0])  # (H, W, 3) uint8
    unit = eight.astype(np.float32) / 255
    image = unit if kind == "array" else torch.from_numpy(unit).permute(2, 0, 1)
    processor = tiny.processor(use_deft=True)
    got = processor(images=[image], text=[tiny.prompt()], return_tensors="pt")["pixel_values"]
    want = processor(images=[eight], text=[tiny.prompt()], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # a float image in 0..255 is left as it is
    scaled = eight.astype(np.float32)
    from modeling_deft_llava.processing.image_depth import to_eight_bit

    assert to_eight_bit(scaled) is scaled
