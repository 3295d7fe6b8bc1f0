"""vLLM plugin entry point: `pip install .[vllm]`, then `vllm serve <DeFT-LLaVA folder>` or `vllm.LLM(<folder>)`.

vLLM calls `register()` in every process it starts (out-of-tree model registration through the
`vllm.general_plugins` entry point, see vLLM's "Registering a model" docs and `vllm/plugins/__init__.py`).
It registers:

- the vLLM model class for the architecture name `DeftLlavaForConditionalGeneration` (the `architectures` entry
  of every DeFT-LLaVA `config.json`), lazily, by import path (`vllm_model.py`);
- `DeftLlavaVllmConfig` as transformers' `AutoConfig` class for `model_type="deft_llava"` in vLLM's processes:
  `DeftLlavaConfig` whose text config declares an M-RoPE section `[head_dim // 2, 0, 0]`. That switches on vLLM's
  per-request position interface (`get_mrope_input_positions`), which the model class needs to give kept tokens
  their original position ids; with every rotary frequency on the first position row, the rotation is the
  checkpoint's standard RoPE. The files on disk are not changed.
"""

from __future__ import annotations

from modeling_deft_llava import DeftLlavaConfig

ARCHITECTURE = "DeftLlavaForConditionalGeneration"
MODEL_CLASS_PATH = "modeling_deft_llava.serving.vllm_model:DeftLlavaVllmForConditionalGeneration"


class DeftLlavaVllmConfig(DeftLlavaConfig):
    """`DeftLlavaConfig` with an M-RoPE section on the language model's standard RoPE (vLLM processes only)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope = dict(getattr(text, "rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        rope["mrope_section"] = [head_dim // 2, 0, 0]
        text.rope_parameters = rope


def register() -> None:
    """The `vllm.general_plugins` entry point (idempotent)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    AutoConfig.register("deft_llava", DeftLlavaVllmConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)


__all__ = ["ARCHITECTURE", "DeftLlavaVllmConfig", "register"]
