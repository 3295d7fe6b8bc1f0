"""Processing: `DeftLlavaProcessor` (writes as many placeholders as the model keeps) and tokenizer helpers.

Installed as `modeling_deft_llava.processing`. Imports transformers and `configuration/`.
"""
