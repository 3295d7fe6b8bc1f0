"""`DeftLlavaConfig`: `LlavaConfig` plus the DeFT settings (defaults from `deft_settings.DeftSettings`)."""

from __future__ import annotations

from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from ..compressors.placeholder_policy import placeholder_count, validate_method
from .deft_settings import (
    DEFAULTS,
    DEFT_METHOD,
    DeftSettings,
    check_unknown_deft_keys,
    validate_deft_settings,
)
from .supported_versions import check_transformers_version
from .vision_towers import check_one_feature_per_patch

check_transformers_version()  # a clear ImportError outside the tested range (also in a Hub folder)

# every setting of the DeFT namespace this config knows ("deft" is the DeFT pipeline, other methods are baselines)
DEFT_CONFIG_KEYS = (*DeftSettings.field_names(), "compression_method", "compression_settings")


@strict
class DeftLlavaConfig(LlavaConfig):
    r"""Configuration of `DeftLlavaForConditionalGeneration`.

    Every field of `LlavaConfig`, plus the DeFT settings documented in `DeftSettings` (same names, same
    defaults), plus:

    video_token_index (`int`, *optional*): id of the `<video>` placeholder; None disables video input.
    context_start_token_index, context_end_token_index (`int`, *optional*): ids of the `<context>` and
        `</context>` markers around a long text context (`text_context.py`); None (both) disables them.
    compression_method (`str`, defaults to `"deft"`): which compression method runs when `use_deft=True`, a
        name of the registry (`modeling_deft_llava/compressors/compression_registry.py`).
    compression_settings (`dict`, *optional*): typed settings of a baseline method (see its settings class).

    Two seed names read wider than they sound, and stay for the seed's contract and old checkpoints:
    `use_deft` switches compression on for whichever `compression_method` is set, and
    `deft_retention_ratio` is the budget of every method (K = `num_kept_tokens(N, deft_retention_ratio)`).

    Example:

    ```python
    >>> from modeling_deft_llava import DeftLlavaConfig
    >>> config = DeftLlavaConfig(use_deft=True, deft_retention_ratio=0.25)
    >>> config.num_kept_tokens(576)
    144
    ```
    """

    model_type = "deft_llava"
    stock_model_type = "llava"  # the stock class whose folders this one loads (see `get_config_dict`)
    attribute_map = {"image_token_id": "image_token_index", "video_token_id": "video_token_index"}

    use_deft: bool = DEFAULTS.use_deft
    deft_semantic_dim: int = DEFAULTS.deft_semantic_dim
    deft_retention_ratio: float = DEFAULTS.deft_retention_ratio
    deft_enable_rtd: bool = DEFAULTS.deft_enable_rtd
    deft_alpha_var: float = DEFAULTS.deft_alpha_var
    deft_rtd_bottleneck_ratio: int = DEFAULTS.deft_rtd_bottleneck_ratio
    deft_inference_mode: str = DEFAULTS.deft_inference_mode
    deft_rtd_entropy_threshold: float = DEFAULTS.deft_rtd_entropy_threshold
    deft_rtd_confidence_threshold: float = DEFAULTS.deft_rtd_confidence_threshold
    deft_saliency_hidden_dim: int = DEFAULTS.deft_saliency_hidden_dim
    deft_group_image_neighbors: int = DEFAULTS.deft_group_image_neighbors
    deft_group_video_window: int = DEFAULTS.deft_group_video_window
    deft_group_text_neighbors: int = DEFAULTS.deft_group_text_neighbors
    deft_keep_original_positions: bool = DEFAULTS.deft_keep_original_positions
    deft_feedback_loss_weight: float = DEFAULTS.deft_feedback_loss_weight
    deft_rtd_loss_weight: float = DEFAULTS.deft_rtd_loss_weight
    deft_text_retention_ratio: float | None = DEFAULTS.deft_text_retention_ratio
    deft_score_components: tuple[str, ...] | list[str] | None = DEFAULTS.deft_score_components
    deft_question_aware: bool = DEFAULTS.deft_question_aware
    deft_position_aware: bool = DEFAULTS.deft_position_aware
    deft_ranking_loss: str = DEFAULTS.deft_ranking_loss
    deft_ranking_temperature: float = DEFAULTS.deft_ranking_temperature
    deft_coverage_weight: float = DEFAULTS.deft_coverage_weight
    video_token_index: int | None = None
    context_start_token_index: int | None = None
    context_end_token_index: int | None = None
    compression_method: str = DEFT_METHOD
    compression_settings: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # a stock llava config.json loaded into this class must be saved back as deft_llava, never as llava
        # (a "llava" folder would silently load as the stock class and drop the DeFT weights); subclasses
        # (`DeftLlavaNextConfig`) keep their own
        self.model_type = type(self).model_type
        self.validate_deft()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.get_config_dict`, reading a stock folder of the parent class (`stock_model_type`:
        `llava`, or `llava_next` for `DeftLlavaNextConfig`) as this class's type: loading a stock llava-hf
        folder with DeFT overrides is supported, so transformers' warning about a different model type (printed
        on every such load) does not apply. Other model types still get it."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == cls.stock_model_type:
            config_dict = dict(config_dict, model_type=cls.model_type)
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`, refusing override keys that look like a misspelt DeFT setting
        (`from_pretrained(folder, deft_retension_ratio=0.25)`): the library would return them as unused, and a
        model's `from_pretrained` would fail on them with a bare TypeError."""
        check_unknown_deft_keys(kwargs, DEFT_CONFIG_KEYS, f"{cls.__name__}.from_pretrained")
        return super().from_dict(config_dict, **kwargs)

    def validate_deft(self) -> None:
        """Every DeFT and compression-method check. Runs at construction, again when a model is built
        (`from_pretrained(folder, **overrides)` sets overrides after construction, past `__post_init__`), and at
        every call of a built model (settings may be changed on `model.config`)."""
        # a constructor keyword that is not a field is kept as an attribute: refuse misspelt DeFT settings
        declared = {f.name for f in fields(self)}
        check_unknown_deft_keys(
            [key for key in vars(self) if key not in declared and not key.startswith("_")],
            DEFT_CONFIG_KEYS,
            type(self).__name__,
        )
        validate_deft_settings(**self.deft_settings_dict())
        if not isinstance(self.compression_method, str) or not self.compression_method:
            raise ValueError(f"compression_method must be a method name, got {self.compression_method!r}")
        n = self.patch_tokens_per_image()
        validate_method(self, n, self.num_kept_tokens(n) if n is not None and self.use_deft else None)
        if self.use_deft:
            check_one_feature_per_patch(self.vision_config, self.vision_feature_select_strategy)
        check_context_markers(self)

    def patch_tokens_per_image(self) -> int | None:
        """Encoder tokens per image from the vision config (CLS dropped by the "default" strategy)."""
        vision = self.vision_config
        size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if not isinstance(size, int) or not isinstance(patch, int) or patch < 1:
            return None
        return (size // patch) ** 2

    def deft_settings_dict(self) -> dict:
        return {name: getattr(self, name) for name in DeftSettings.field_names()}

    def num_kept_tokens(self, num_tokens: int) -> int:
        """Placeholders per image (or video) of `num_tokens` encoder tokens that this configuration produces."""
        return placeholder_count(
            num_tokens,
            self.use_deft,
            self.deft_retention_ratio,
            self.deft_inference_mode,
            self.compression_method,
            self.compression_settings,
        )


def check_context_markers(config) -> None:
    """The context markers (`context_start_token_index`, `context_end_token_index`): both None, or two distinct
    non-negative ints that are not a placeholder id; `deft_text_retention_ratio` needs them (without markers
    no token is context, and the ratio would be ignored without a word).

    Raises:
        ValueError: names the offending field and value.
    """
    start, end = config.context_start_token_index, config.context_end_token_index
    if (start is None) != (end is None):
        raise ValueError(
            f"context_start_token_index={start!r} and context_end_token_index={end!r}: set both (the ids of the "
            "<context> and </context> markers) or neither"
        )
    if start is not None:
        for name, value in (("context_start_token_index", start), ("context_end_token_index", end)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a token id (an int >= 0), got {value!r}")
        placeholders = {
            config.image_token_index: "image_token_index",
            config.video_token_index: "video_token_index",
        }
        for name, value in (("context_start_token_index", start), ("context_end_token_index", end)):
            if value in placeholders:
                raise ValueError(
                    f"{name}={value!r} is also {placeholders[value]}: markers need ids of their own"
                )
        if start == end:
            raise ValueError(f"context_start_token_index and context_end_token_index are both {start!r}")
    if config.use_deft and config.deft_text_retention_ratio is not None and start is None:
        raise ValueError(
            f"deft_text_retention_ratio={config.deft_text_retention_ratio!r} compresses the text between the "
            "context markers, but context_start_token_index is None: set the ids of the <context> and </context> "
            "tokens (context_start_token_index, context_end_token_index) or leave deft_text_retention_ratio=None"
        )


__all__ = ["DeftLlavaConfig"]
