"""Serving DeFT-LLaVA beyond `generate` (installed as `modeling_deft_llava.serving`).

- `handler.py`: `EndpointHandler` for Hugging Face Inference Endpoints; `hub_card/export.py` copies it into every
  exported folder as `handler.py`. It imports only transformers' Auto classes (the folder's `auto_map`).
- `vllm_plugin.py`: the `vllm.general_plugins` entry point (`pip install .[vllm]`); registers
  `vllm_model.DeftLlavaVllmForConditionalGeneration` with vLLM's `ModelRegistry` for the architecture name
  `DeftLlavaForConditionalGeneration`, so `vllm serve <DeFT-LLaVA folder>` runs the model with compression.
- `vllm_model.py` / `vllm_processing.py`: the vLLM model class and its multimodal processor.

May import: `modeling_deft_llava`'s public names, transformers, torch, PIL; vLLM only in the `vllm_*` files.
"""
