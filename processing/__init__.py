"""Processing: `DeftLlavaProcessor` (writes as many placeholders as the model keeps), `image_depth.py` (16-bit
images scaled to 8 bits, not clipped, before the RGB conversion) and tokenizer helpers.

Installed as `modeling_deft_llava.processing`. Imports transformers and `configuration/`.
"""
