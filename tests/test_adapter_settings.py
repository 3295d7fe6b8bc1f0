"""A run-time setting (`model.config.deft_retention_ratio = ...`) reaches every copy of the DeFT module: each LoRA
adapter's `modules_to_save` copy and the base one (issue 25).

Before: only the active adapter's copy followed; switching to the other adapter, or disabling adapters, kept the
old budget ("Image features and image tokens do not match, tokens: 16, features: 8")."""

from __future__ import annotations

import tiny
import torch
from modeling_deft_llava.training.lora import language_model_target_regex
from peft import LoraConfig, get_peft_model

from modeling_deft_llava.compressors.compression_method import CompressionMethod


def lora(seed):
    torch.manual_seed(seed)
    return LoraConfig(
        r=2,
        target_modules=language_model_target_regex(["q_proj", "v_proj"]),
        modules_to_save=["deft", "multi_modal_projector"],
        init_lora_weights=False,
    )


def test_a_run_time_ratio_reaches_every_adapter_and_the_base():
    base = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    model = get_peft_model(base, lora(0), adapter_name="first")
    model.add_adapter("second", lora(1))
    model.eval()
    copies = [m for m in model.modules() if isinstance(m, CompressionMethod)]
    assert len(copies) == 3  # the base module and one copy per adapter
    model.config.deft_retention_ratio = 0.5
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.5)
    inputs = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
    kept = tiny.NUM_PATCHES // 2
    with torch.no_grad():
        model.set_adapter("first")
        assert all(len(k) == kept for k in model(**inputs).kept_indices)  # the change is applied here
        model.set_adapter("second")
        assert all(len(k) == kept for k in model(**inputs).kept_indices)
        with model.disable_adapter():
            assert all(len(k) == kept for k in model(**inputs).kept_indices)
    assert all(m.retention_ratio == 0.5 for m in copies)
