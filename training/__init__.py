"""Training: LoRA/PEFT fine-tuning with `transformers.Trainer`, feedback-guided scoring and RTD losses.

Installed as `modeling_deft_llava.training`. May import everything else in the project.
"""
