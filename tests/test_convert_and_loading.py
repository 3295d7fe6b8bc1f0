"""Stock llava-hf folders (both key layouts) -> DeFT-LLaVA, big-model loading options, the chat template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors.torch import save_file

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.convert import convert


def _stock_folders(tmp_path):
    """The same tiny LLaVA in the older llava-hf key layout and in the transformers 5 layout."""
    base = tiny.model(use_deft=False)
    stock = tiny.stock_twin(base)
    legacy = tmp_path / "legacy"
    stock.save_pretrained(legacy)  # stock save_pretrained writes language_model.model.* keys
    tiny.processor().save_pretrained(legacy)
    v5 = tmp_path / "v5"
    v5.mkdir()
    (v5 / "config.json").write_text((legacy / "config.json").read_text())
    state = {k: v.contiguous() for k, v in stock.state_dict().items()}  # model.language_model.* names
    save_file(state, v5 / "model.safetensors", metadata={"format": "pt"})
    tiny.processor().save_pretrained(v5)
    return stock, legacy, v5


def test_convert_both_layouts(tmp_path):
    stock, legacy, v5 = _stock_folders(tmp_path)
    assert any(
        k.startswith("language_model.model.")
        for k in json.loads(
            (legacy / "model.safetensors").read_bytes()[
                8 : 8 + int.from_bytes((legacy / "model.safetensors").read_bytes()[:8], "little")
            ]
        )
    )
    for source in (legacy, v5):
        out = tmp_path / f"deft-{source.name}"
        new = convert(str(source), str(out), use_deft=True, deft_retention_ratio=0.25)
        assert new and all(k.startswith("model.deft.") for k in new)
        model = DeftLlavaForConditionalGeneration.from_pretrained(out).eval()
        processor = DeftLlavaProcessor.from_pretrained(out)
        assert (
            model.config.model_type == "deft_llava"
            and processor.use_deft
            and processor.deft_retention_ratio == 0.25
        )
        assert torch.equal(
            model.model.multi_modal_projector.linear_1.weight,
            stock.model.multi_modal_projector.linear_1.weight,
        )
        inputs = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
        assert int((inputs["input_ids"] == 4).sum()) == 4
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_convert_refuses_to_overwrite_and_bad_folders(tmp_path):
    _, legacy, _ = _stock_folders(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        convert(str(legacy), str(out), use_deft=True)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="no config.json"):
        convert(str(tmp_path / "missing"), str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="unknown DeFT settings"):
        convert(str(legacy), str(tmp_path / "o3"), deft_retention=0.2)


def test_convert_command(tmp_path):
    _, legacy, _ = _stock_folders(tmp_path)
    out = tmp_path / "cmd"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_deft_llava.convert",
            str(legacy),
            str(out),
            "--deft-retention-ratio",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["deft_retention_ratio"] == 0.5


def test_big_model_loading_options(tmp_path):
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    model.save_pretrained(tmp_path)
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    inputs = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
    with torch.no_grad():
        expect = model(**inputs).logits
    # on a CPU-only machine accelerate places everything on the CPU (stock LLaVA behaves the same); what
    # a multi-GPU split needs from the class is the no-split list, checked below
    mapped = DeftLlavaForConditionalGeneration.from_pretrained(
        tmp_path, device_map="auto", low_cpu_mem_usage=True
    )
    assert {"DeFTModule", "CLIPEncoderLayer", "LlamaDecoderLayer"} <= set(mapped._no_split_modules)
    with torch.no_grad():
        torch.testing.assert_close(mapped(**inputs).logits, expect)
    half = DeftLlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.config._attn_implementation == "sdpa"
    assert "DeFTModule" in DeftLlavaForConditionalGeneration._no_split_modules


def test_chat_template_through_the_processor():
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture ?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("USER: <image>") and prompt.endswith("ASSISTANT:")
    inputs = processor(images=tiny.images(1), text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == 4).sum()) == 4


def test_num_multimodal_tokens_follow_the_budget():
    # regression: MultiModalData is a dataclass, not a dict (item assignment raised TypeError)
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    data = processor._get_num_multimodal_tokens(image_sizes=[[32, 32], [32, 32]])
    assert data.num_image_tokens == [4, 4]
