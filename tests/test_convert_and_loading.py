"""Stock llava-hf folders (both key layouts) -> DeFT-LLaVA, big-model loading options, the chat template."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors.torch import save_file

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from modeling_deft_llava.commands.convert import convert


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
    with pytest.raises(ValueError, match="does not exist"):
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
            "modeling_deft_llava.commands.convert",
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
    assert "new DeFT weights were initialised" in result.stdout
    # converting the DeFT folder again initialises nothing, and says so (it printed "0 new DeFT weights ...")
    again = subprocess.run(
        [sys.executable, "-m", "modeling_deft_llava.commands.convert", str(out), str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "none initialised" in again.stdout and "0 new" not in again.stdout


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


def test_new_deft_weights_are_defined_and_identical_on_every_load(tmp_path):
    """transformers 5 allocates parameters a checkpoint lacks empty and relies on `_init_weights`: before, the
    mixture logits held leftover memory (1e23, 1e-41, ...) and the Linear layers came from the global RNG, so
    two loads of one stock folder kept different tokens."""
    _, legacy, _ = _stock_folders(tmp_path)
    loads = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # the global RNG must not matter
        model = DeftLlavaForConditionalGeneration.from_pretrained(legacy, use_deft=True)
        loads.append({k: v.clone() for k, v in model.model.deft.state_dict().items()})
    assert loads[0].keys() == loads[1].keys() and loads[0]
    for key in loads[0]:
        assert torch.equal(loads[0][key], loads[1][key]), key
        assert torch.isfinite(loads[0][key]).all(), key
    assert torch.equal(loads[0]["score_mixer.mixture_logits"], torch.zeros(3))  # equal weights, 1/3 each
    fc1 = loads[0]["semantic_abstraction.fc1.weight"]
    bound = 1 / fc1.shape[1] ** 0.5  # PyTorch's default Linear scheme: |w| <= 1/sqrt(fan_in)
    assert fc1.abs().max() <= bound and fc1.std() > bound / 4
    # a freshly built model draws the same values
    fresh = DeftLlavaForConditionalGeneration(model.config)
    for key, value in fresh.model.deft.state_dict().items():
        assert torch.equal(value, loads[0][key]), key


def test_a_truncated_weights_file_is_named_in_the_error(tmp_path):
    """Before: safetensors' own error ("incomplete metadata, file not fully covered") named no file."""
    tiny.model(use_deft=True).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        OSError, match=f"cannot read the safetensors weights of '{tmp_path / 'm'}'.*truncated"
    ):
        DeftLlavaForConditionalGeneration.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("next_model", [False, True])
def test_a_stock_folder_loads_without_the_model_type_warning(tmp_path, next_model):
    """Loading a stock llava-hf folder with DeFT overrides is a supported route: transformers' warning that
    a `llava` (or `llava_next`) checkpoint instantiates another model type was printed on every such load."""
    import tiny_next
    from transformers.utils import logging as hf_logging

    from modeling_deft_llava import DeftLlavaNextConfig

    stock = tiny_next.stock_model() if next_model else tiny.stock_twin(tiny.model())
    config_class = DeftLlavaNextConfig if next_model else DeftLlavaConfig
    stock.save_pretrained(tmp_path)
    logger = hf_logging.get_logger("transformers.configuration_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        config = config_class.from_pretrained(tmp_path, use_deft=True)
    finally:
        logger.removeHandler(handler)
    assert config.model_type == config_class.model_type and config.use_deft
    assert not [m for m in seen if "model of type" in m], seen
