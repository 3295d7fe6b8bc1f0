"""The Inference Endpoints `handler.py`: exported with the model, loaded from the exported folder the way the
toolkit loads it (by file path), answers the main job's questions as `generate` does, refuses bad payloads."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest
import torch
from modeling_deft_llava.hub_card.code_audit import audit_published_code, audit_source
from modeling_deft_llava.hub_card.export import HANDLER_FILE, export_for_hub
from PIL import Image

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/
from benchmarks.digits.common import TEST_SEED  # noqa: E402
from benchmarks.digits.data import chat_messages, make_split  # noqa: E402

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "digits-deft-llava")
N_QUESTIONS = 8  # the main job's default


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = DeftLlavaForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    processor = DeftLlavaProcessor.from_pretrained(CHECKPOINT)
    folder = export_for_hub(model, processor, tmp_path_factory.mktemp("endpoint") / "digits")
    return folder, model, processor


@pytest.fixture(scope="module")
def handler(exported):
    folder = exported[0]
    # huggingface-inference-toolkit: spec_from_file_location on <repository>/handler.py, then EndpointHandler(path)
    spec = importlib.util.spec_from_file_location("handler", folder / HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(folder))


@pytest.fixture(scope="module")
def samples():
    return make_split("test", N_QUESTIONS, seed=TEST_SEED)


def test_handler_is_exported_and_passes_the_audit(exported):
    folder = exported[0]
    assert (folder / HANDLER_FILE).is_file()
    assert audit_published_code(folder) == []
    # the handler's extra names (loading, in-memory image decoding) are granted to handler.py only
    source = (folder / HANDLER_FILE).read_text()
    problems = audit_source(source, "modeling_extra.py", set())
    assert any("from_pretrained" in p for p in problems) and any("'io'" in p for p in problems)


def test_handler_answers_equal_generate(exported, handler, samples):
    _, model, processor = exported
    kept = model.config.num_kept_tokens(64)
    for sample in samples:
        prompt = processor.apply_chat_template(chat_messages(sample.question), add_generation_prompt=True)
        inputs = processor(images=[sample.image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        expected = processor.tokenizer.decode(
            generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        payload = {
            "inputs": {
                "prompt": prompt,
                "images": [base64.b64encode(_png_bytes(sample.pil_image())).decode()],
            },
            "parameters": {"max_new_tokens": 2},
        }
        (out,) = handler(payload)
        assert out["generated_text"] == expected
        assert out["num_visual_tokens"] == kept == 16
        assert out["num_visual_tokens_per_image"] == [16] and out["num_source_tokens_per_image"] == [64]
    # every accepted image form gives the same answer
    sample = samples[0]
    prompt = processor.apply_chat_template(chat_messages(sample.question), add_generation_prompt=True)
    raw = _png_bytes(sample.pil_image())
    answers = {
        handler({"inputs": {"prompt": prompt, "image": image}, "parameters": {"max_new_tokens": 2}})[0][
            "generated_text"
        ]
        for image in (
            raw,
            "data:image/png;base64," + base64.b64encode(raw).decode(),
            sample.pil_image(),
        )
    }
    assert len(answers) == 1
    # an image/* request body: the toolkit passes the decoded image as `inputs`, the text in parameters
    (out,) = handler({"inputs": sample.pil_image(), "parameters": {"prompt": prompt, "max_new_tokens": 2}})
    assert out["generated_text"] in answers


def test_plain_text_prompt_uses_the_chat_template(handler, samples):
    sample = samples[0]
    image = base64.b64encode(_png_bytes(sample.pil_image())).decode()
    # the digits model was trained with the question before the image
    (out,) = handler(
        {
            "inputs": {"prompt": sample.question, "images": [image]},
            "parameters": {"max_new_tokens": 2, "image_position": "after"},
        }
    )
    assert out["generated_text"] == sample.answer


@pytest.mark.parametrize(
    "payload, error, message",
    [
        ("not a dict", TypeError, "JSON object"),
        ({"inputs": ["x"]}, TypeError, "'inputs' must be an object"),
        ({"inputs": {"prompt": "q"}}, ValueError, "no 'images'"),
        ({"inputs": {"prompt": "q", "images": []}}, ValueError, "'images' is empty"),
        ({"inputs": {"prompt": "q", "images": "abc"}}, TypeError, "'images' must be a list, got str"),
        ({"inputs": {"prompt": 3, "images": ["aGk="]}}, TypeError, "'prompt' must be a string, got int"),
        ({"inputs": {"prompt": " ", "images": ["aGk="]}}, ValueError, "'prompt' is empty"),
        ({"inputs": {"prompt": "q", "images": [12]}}, TypeError, "images[0] must be a base64 string"),
        ({"inputs": {"prompt": "q", "images": ["%%%"]}}, ValueError, "images[0] is not valid base64"),
        ({"inputs": {"prompt": "q", "images": ["aGVsbG8="]}}, ValueError, "images[0] does not decode"),
        ({"inputs": {"prompt": "q", "images": ["https://x.org/a.png"]}}, ValueError, "images[0] is a URL"),
        ({"inputs": {"prompt": "q", "image": "a", "images": ["a"]}}, ValueError, "not both"),
        ({"inputs": {"prompt": "q", "imgs": ["a"]}}, ValueError, "unknown field(s) ['imgs']"),
    ],
)
def test_bad_payloads_are_refused_with_the_value(handler, payload, error, message):
    with pytest.raises(error) as caught:
        handler(payload)
    assert message in str(caught.value)


def test_bad_parameters_and_image_counts(handler, samples):
    image = base64.b64encode(_png_bytes(samples[0].pil_image())).decode()
    good = {"prompt": "q", "images": [image]}
    with pytest.raises(ValueError, match="unknown parameter 'max_tokens'"):
        handler({"inputs": good, "parameters": {"max_tokens": 3}})
    with pytest.raises(TypeError, match="'max_new_tokens' must be int, got '3'"):
        handler({"inputs": good, "parameters": {"max_new_tokens": "3"}})
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 1024\], got 0"):
        handler({"inputs": good, "parameters": {"max_new_tokens": 0}})
    with pytest.raises(ValueError, match="image_position"):
        handler({"inputs": good, "parameters": {"image_position": "middle"}})
    with pytest.raises(ValueError, match=r"holds 2 '<image>' token\(s\) but 1 image\(s\)"):
        handler({"inputs": {"prompt": "<image> <image> q", "images": [image]}})


def _grey16_png(sample) -> bytes:
    """The sample as a 16-bit grey PNG (Pillow opens it as `I;16`): grey levels * 257."""
    import numpy as np

    grey = np.asarray(sample.pil_image().convert("L"), dtype=np.uint16) * 257
    return _png_bytes(Image.fromarray(grey))


def test_a_16_bit_grey_png_is_read_as_the_processor_reads_it(exported, handler, samples):
    """Before: the handler's `convert("RGB")` clipped the 16-bit levels before the processor's own scaling ran
    (5 of 8 answers differed from `generate` on the same file)."""
    _, model, processor = exported
    for sample in samples:
        raw = _grey16_png(sample)
        opened = Image.open(io.BytesIO(raw))
        assert opened.mode == "I;16"
        prompt = processor.apply_chat_template(chat_messages(sample.question), add_generation_prompt=True)
        inputs = processor(images=[opened], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        expected = processor.tokenizer.decode(
            generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        for image in (base64.b64encode(raw).decode(), raw, Image.open(io.BytesIO(raw))):
            payload = {"inputs": {"prompt": prompt, "images": [image]}, "parameters": {"max_new_tokens": 2}}
            assert handler(payload)[0]["generated_text"] == expected


def test_line_wrapped_base64_is_accepted(handler, samples):
    """Before: refused as "not valid base64" (76-character lines, what MIME encoders emit)."""
    raw = _png_bytes(samples[0].pil_image())
    wrapped = base64.encodebytes(raw).decode()  # 76-character lines, "\n" after each
    assert "\n" in wrapped.strip()
    crlf = wrapped.replace("\n", "\r\n")
    answers = {
        handler({"inputs": {"prompt": samples[0].question, "images": [image]}})[0]["generated_text"]
        for image in (base64.b64encode(raw).decode(), wrapped, crlf, "data:image/png;base64," + crlf)
    }
    assert len(answers) == 1
    with pytest.raises(ValueError, match=r"images\[0\] is not valid base64"):
        handler({"inputs": {"prompt": "q", "images": ["aGVs\nbG8=%"]}})


def test_the_reply_says_where_the_images_went(handler, samples):
    """A plain-text prompt is wrapped with the images before the text unless `image_position` says "after":
    the reply names the order used (the digits model was trained question first), "prompt" when the prompt
    placed the images itself."""
    image = base64.b64encode(_png_bytes(samples[0].pil_image())).decode()
    question = samples[0].question
    assert handler({"inputs": {"prompt": question, "images": [image]}})[0]["image_position"] == "before"
    after = {"inputs": {"prompt": question, "images": [image]}, "parameters": {"image_position": "after"}}
    assert handler(after)[0]["image_position"] == "after"
    full = {"inputs": {"prompt": f"USER: {question} <image>\n ASSISTANT:", "images": [image]}}
    assert handler(full)[0]["image_position"] == "prompt"
