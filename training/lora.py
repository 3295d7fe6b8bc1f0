"""Which parts of DeFT-LLaVA train: LoRA on the language model only, DeFT modules and projector in full.

PEFT full-matches a string `target_modules` against module names (DESIGN-NOTES, "PEFT / Trainer"); a plain
list such as `["q_proj"]` matches by suffix and would also hit the CLIP vision tower. So LoRA gets a regex
that requires `.language_model.` in the name: the vision tower (`model.vision_tower...`), the projector and
the DeFT modules can never be targeted. New trainable modules (`model.deft`, `model.multi_modal_projector`)
go in `modules_to_save`: trained in full and saved with the adapter. Everything else is frozen.
"""

from __future__ import annotations

import contextlib
import re
import warnings

from peft import LoraConfig, get_peft_model

# the linear layers of Llama/Mistral/Qwen2 decoder blocks
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def peft_reads_deprecated_attribute():
    """peft builds its model by reading `model.is_gradient_checkpointing`, which transformers 5 deprecates: a
    FutureWarning on every run that the user cannot act on. Silenced around the two peft calls that raise it
    (`get_peft_model`, `PeftModel.from_pretrained`), and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def language_model_target_regex(names=DEFAULT_LORA_TARGETS) -> str:
    """A `target_modules` regex that full-matches `names` inside the language model only.

    >>> bool(re.fullmatch(language_model_target_regex(["q_proj"]), "model.language_model.layers.0.self_attn.q_proj"))
    True
    >>> bool(re.fullmatch(language_model_target_regex(["q_proj"]), "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"))
    False
    """
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ValueError("LoRA needs at least one target module name, got none")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad:
        raise ValueError(f"LoRA target module names must be plain attribute names, got {bad}")
    return r"(.*\.)?language_model\.(.*\.)?(" + "|".join(names) + r")"


def full_modules(model, train_deft_modules: bool = True, train_projector: bool = True) -> list[str]:
    """Names (attribute names under `model.model`) of the modules trained in full."""
    inner = model.model
    names = []
    if train_deft_modules and getattr(inner, "deft", None) is not None:
        names.append("deft")
    if train_deft_modules and getattr(inner, "compressor", None) is not None:
        if any(True for _ in inner.compressor.parameters()):
            names.append("compressor")
    if train_projector:
        names.append("multi_modal_projector")
    return names


def prepare_model_for_finetuning(
    model,
    use_lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules=DEFAULT_LORA_TARGETS,
    train_deft_modules: bool = True,
    train_projector: bool = True,
):
    """Freeze a `DeftLlavaForConditionalGeneration` except the chosen parts.

    Returns a `peft.PeftModel` (LoRA on the language model, `modules_to_save` = DeFT modules and/or the
    projector) when `use_lora`, else the model itself with only the full modules trainable.
    """
    fulls = full_modules(model, train_deft_modules, train_projector)
    if not use_lora:
        if not fulls:
            raise ValueError("nothing to train: use_lora, train_deft_modules and train_projector are all off")
        model.requires_grad_(False)
        for name in fulls:
            getattr(model.model, name).requires_grad_(True)
        return model
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=language_model_target_regex(lora_target_modules),
        modules_to_save=fulls or None,
        task_type="CAUSAL_LM",
    )
    with peft_reads_deprecated_attribute():
        peft_model = get_peft_model(model, config)
    hit = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "language_model" not in n]
    if hit:  # cannot happen with the regex; a guard against a future rename of the inner modules
        raise ValueError(f"LoRA reached modules outside the language model: {hit[:5]}")
    return peft_model


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "peft_reads_deprecated_attribute",
    "full_modules",
    "language_model_target_regex",
    "prepare_model_for_finetuning",
]
