"""After training: load the adapter back, or merge it into a full DeFT-LLaVA Hub folder.

The adapter folder (`trainer.save_model`) holds `adapter_config.json`, `adapter_model.safetensors` (the LoRA
weights plus the fully trained DeFT modules and projector, PEFT `modules_to_save`) and the processor. Its
`base_model_name_or_path` is the training's `model_name_or_path`, so reloading needs that folder; for
`AutoPeftModelForCausalLM.from_pretrained(adapter, trust_remote_code=True)` it must be a flat Hub folder
(`export_for_hub`), which has the `auto_map` the Auto classes need.
"""

from __future__ import annotations

import json
from pathlib import Path

from modeling_deft_llava.hub_card.export import export_for_hub
from modeling_deft_llava.training.lora import peft_reads_deprecated_attribute
from peft import PeftModel

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor


def adapter_base_path(adapter_dir) -> str:
    """`base_model_name_or_path` recorded in an adapter folder."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} holds no adapter_config.json (not a PEFT adapter folder)"
        )
    base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path} names no base_model_name_or_path; pass base_model explicitly")
    return base


def load_finetuned(adapter_dir, base_model: str | None = None, **from_pretrained_kwargs) -> PeftModel:
    """The base DeFT-LLaVA with the trained adapter and DeFT modules, as a `PeftModel` (eval mode)."""
    base = DeftLlavaForConditionalGeneration.from_pretrained(
        base_model or adapter_base_path(adapter_dir), **from_pretrained_kwargs
    )
    with peft_reads_deprecated_attribute():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def merge_and_export(adapter_dir, folder, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Merge the LoRA weights (`merge_and_unload`) and write a full DeFT-LLaVA Hub folder.

    The trained DeFT modules and projector replace the base ones; the processor saved with the adapter goes
    with it. Returns the folder (written atomically by `export_for_hub`)."""
    merged = load_finetuned(adapter_dir, base_model).merge_and_unload()
    processor = DeftLlavaProcessor.from_pretrained(str(adapter_dir))
    return export_for_hub(merged, processor, folder, overwrite=overwrite)


__all__ = ["adapter_base_path", "load_finetuned", "merge_and_export"]
