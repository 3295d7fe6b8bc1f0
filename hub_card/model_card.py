"""`build_model_card`: the Hub README of a DeFT-LLaVA model, from its config and (optionally) measured results.

The card is `template.md` filled in: YAML metadata, a usage snippet (`trust_remote_code=True`, pinned
revision), every DeFT setting of the config with its value, a results table only when results are given (no
numbers are ever made up), limitations and the DeFT citation.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Number
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..compressors.placeholder_policy import placeholder_count
from ..configuration.deft_settings import DeftSettings
from ..configuration.supported_versions import PEFT_BELOW, PEFT_MIN, supported_transformers_range

TEMPLATE_PATH = Path(__file__).with_name("template.md")
TAGS = ("deft", "llava", "token-compression", "image-text-to-text", "custom_code")
# config fields shown with the DeftSettings ones: which compressor runs, and its settings
EXTRA_FIELDS = {
    "compression_method": "which token compressor runs when `use_deft=True` (`deft` is the DeFT pipeline).",
    "compression_settings": "typed settings of a baseline compressor (None for `deft`).",
}
# seed README (DeFT), "Citation"
CITATION = """@article{deft2024,
  title={DeFT: Decoupled and Feedback-Guided Tokenization for Efficient Multimodal Long-Context Modeling},
  author={Anonymous},
  journal={CVPR},
  year={2024}
}"""
REPO_ID_PLACEHOLDER = "your-namespace/your-deft-llava"
REVISION_PLACEHOLDER = "main"


def setting_meanings() -> dict[str, str]:
    """`{field: meaning}` parsed from the `Args:` section of the `DeftSettings` docstring."""
    meanings: dict[str, str] = {}
    current = None
    in_args = False
    for line in (DeftSettings.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args or not stripped:
            continue
        match = re.match(r"(\w+): (.*)", stripped)
        if match and match.group(1) in DeftSettings.field_names():
            current = match.group(1)
            meanings[current] = match.group(2)
        elif current is not None:
            meanings[current] += " " + stripped
    return {name: text.replace("|", "\\|") for name, text in meanings.items()}


def settings_rows(config) -> list[dict]:
    """One row per DeFT field of `config`: name, value (JSON, as written in config.json) and meaning."""
    meanings = {**setting_meanings(), **EXTRA_FIELDS}
    rows = []
    for name in (*DeftSettings.field_names(), *EXTRA_FIELDS):
        if not hasattr(config, name):
            raise ValueError(f"config has no DeFT field {name!r}; build the card from a DeftLlavaConfig")
        value = json.dumps(getattr(config, name), sort_keys=True).replace("|", "\\|")
        rows.append({"name": name, "value": value, "meaning": meanings.get(name, "")})
    return rows


def compression_summary(config) -> str:
    """One sentence with the visual-token budget per image, from the vision config's image and patch size."""
    if not config.use_deft:
        return "Compression is off in this configuration (`use_deft=False`): every visual token is kept."
    vision = getattr(config, "vision_config", None)
    image_size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not image_size or not patch:
        return f"Compression is on (`compression_method={config.compression_method!r}`)."
    num_tokens = (image_size // patch) ** 2  # patch tokens per image, CLS dropped
    kept = placeholder_count(
        num_tokens,
        config.use_deft,
        config.deft_retention_ratio,
        config.deft_inference_mode,
        config.compression_method,
        config.compression_settings,
    )
    if kept == num_tokens:
        return (
            f"Compression is on (`compression_method={config.compression_method!r}`, "
            f"`deft_inference_mode={config.deft_inference_mode!r}`): the number of visual tokens kept per "
            f"{image_size}x{image_size} image depends on its content (at most {num_tokens})."
        )
    return (
        f"Compression is on (`compression_method={config.compression_method!r}`): each {image_size}x{image_size} "
        f"image gives {num_tokens} patch tokens, of which the language model sees {kept}."
    )


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows for `results`: `{metric: value}` (two columns) or `{row: {column: value}}`."""
    if not isinstance(results, dict) or not results:
        raise ValueError(f"results must be a non-empty dict, got {results!r}")
    if all(isinstance(v, dict) for v in results.values()):
        columns: list[str] = []
        for values in results.values():
            columns += [c for c in values if c not in columns]
        header = ["", *map(str, columns)]
        rows = [[str(name), *(_format_value(v.get(c, "")) for c in columns)] for name, v in results.items()]
        return header, rows
    if any(isinstance(v, dict) for v in results.values()):
        raise ValueError("results must be all {metric: value} or all {row: {column: value}}, not a mix")
    return ["Metric", "Value"], [[str(name), _format_value(value)] for name, value in results.items()]


def _format_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"refusing to publish a non-finite value {value!r}")
    if isinstance(value, bool) or not isinstance(value, Number):
        return str(value).replace("|", "\\|")
    return repr(value)  # exactly the given number, no rounding


def build_model_card(
    config,
    results: dict | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """The model card (README.md) of a DeFT-LLaVA model.

    Args:
        config: the model's `DeftLlavaConfig`.
        results: measured results to publish: `{metric: value}` or `{row: {column: value}}`; None: the card
            says that no measured results are attached.
        base_model: Hub id of the model this one was converted or fine-tuned from (YAML `base_model`).
        license: a Hub license identifier.
        repo_id: the repository the usage snippet loads (default: a placeholder to replace).
        revision: the commit the usage snippet pins (default `"main"`, with advice to pin a sha).
        model_name: the card's title (default: the repo name, or "DeFT-LLaVA").

    Returns:
        A `huggingface_hub.ModelCard`; `str(card)` is the README text, `card.data` the metadata.
    """
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=base_model,
        tags=list(TAGS),
    )
    header, rows = results_table(results) if results is not None else ([], [])
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name or (repo_id.split("/")[-1] if repo_id else "DeFT-LLaVA"),
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        revision=revision or REVISION_PLACEHOLDER,
        base_model=base_model,
        compression_summary=compression_summary(config),
        settings_rows=settings_rows(config),
        results_header=header,
        results_rows=rows,
        citation=CITATION,
        transformers_range=supported_transformers_range(),
        peft_range=f">={PEFT_MIN},<{PEFT_BELOW}",
    )


__all__ = ["CITATION", "TAGS", "build_model_card", "settings_rows"]
