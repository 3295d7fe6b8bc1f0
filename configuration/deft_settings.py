"""The DeFT hyper-parameters: one typed record, their defaults, and their validation.

This file is the single source of every DeFT default. `DeftLlavaConfig` (the model config) and
`DeFTModule` (the seed's standalone module) both read their defaults from `DeftSettings`, so a value
changed here changes everywhere, and so is the one rounding rule of the budget (`num_kept_tokens`). It is data
only: it imports nothing of the project, so every layer may import it. Method names, placeholder policies and the
method checks live above it (`modeling_deft_llava/compressors/placeholder_policy.py`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields

MODALITIES = ("image", "video", "text")
INFERENCE_MODES = ("fast", "hybrid", "adaptive")
# the score components of FGCS, in the order of the score mixer's `mixture_logits`
SCORE_COMPONENTS = ("semantic", "feedback", "group")
# how the scorer learns from the feedback score `s_fb` (training only): the seed's per-token MSE, or ListNet
RANKING_LOSSES = ("mse", "listnet")


@dataclass(frozen=True)
class DeftSettings:
    """DeFT hyper-parameters (seed README table, plus what the model needs).

    Args:
        use_deft: compress visual tokens inside the model's forward pass.
        deft_semantic_dim: width of the shared semantic space of SAM (seed: 512).
        deft_retention_ratio: share of tokens kept by top-k, in (0, 1]; k = max(1, floor(ratio * N + 0.5)).
        deft_enable_rtd: build the Recoverable Token Dictionary (needed by `hybrid` and `adaptive`).
        deft_alpha_var: variance penalty of the feedback score, `||g|| * exp(-alpha_var * Var(g))`.
        deft_rtd_bottleneck_ratio: RTD code width is `token_dim // ratio` (seed: d/4).
        deft_inference_mode: `fast` (kept tokens only), `hybrid` (plus reconstructed uncertain tokens) or
            `adaptive` (per sample: reconstruct everything pruned, or nothing, by the model's uncertainty).
        deft_rtd_entropy_threshold: a distribution is *uncertain* when its entropy divided by log(vocab)
            (so in [0, 1]) is above this value.
        deft_rtd_confidence_threshold: a distribution is *unconfident* when its largest probability is
            below this value. RTD reconstructs when uncertain OR unconfident.
        deft_saliency_hidden_dim: hidden width of the 3-layer saliency MLP.
        deft_group_image_neighbors: 8 (8-connected grid) or 4 (4-connected) spatial neighbours for images.
        deft_group_video_window: temporal window of the video group score (seed: +-2 frames).
        deft_group_text_neighbors: number of semantic neighbours of the text group score (seed: 5).
        deft_keep_original_positions: kept visual tokens and the text after them keep the position ids they
            had before compression (gaps stay). Turn off only for a model fine-tuned on renumbered sequences.
        deft_feedback_loss_weight: weight of the loss that pulls the learned saliency towards the feedback
            score (training only).
        deft_rtd_loss_weight: weight of the RTD reconstruction loss (training only).
        deft_text_retention_ratio: share of a sample's CONTEXT text tokens kept (the tokens between the context
            markers, `config.context_start_token_index` .. `context_end_token_index`), in (0, 1]; None (default):
            the context is not compressed. The question and the chat template are never compressed. Only
            methods that compress text (`"text" in modalities`: DeFT) take it.
        deft_score_components: the score components the mixture may use, a list of distinct names among
            "semantic" (`s_sem`), "feedback" (`s_fb`) and "group" (`s_group`); None (default): every component
            present in the call. The softmax of the learned mixture is taken over the listed components that
            are present, so `["group"]` ranks by the group score alone (an ablation; the weights are unchanged).
            A call in which no listed component is present (`["feedback"]` without task-loss gradients, i.e. at
            inference) raises a ValueError.
        deft_question_aware: the saliency of each visual token depends on the prompt's text: the language
            model's input embeddings of the question modulate the saliency MLP (FiLM, `question_conditioning.py`).
            The visual tokens are then selected once the prompt is known. False (default): the seed's
            question-blind saliency.
        deft_position_aware: the saliency MLP also reads each token's place in the patch grid (sinusoidal
            features of its row and column, normalised to [0, 1], so any grid size works). False (default): the
            seed, which sees positions only through the encoder's features.
        deft_ranking_loss: how the scores learn from the feedback score in training: `"mse"` (default, the
            seed: per-token MSE between min-max normalised scores) or `"listnet"` (cross-entropy between the
            softmax of the normalised feedback score and that of the normalised scores, both divided by
            `deft_ranking_temperature`: a listwise ranking loss, which weighs the top of the ranking most).
        deft_ranking_temperature: temperature of `"listnet"` (> 0; smaller puts more weight on the top tokens).
        deft_coverage_weight: redundancy penalty of the selection, in [0, 1): 0 (default) keeps the top-k
            scores (the seed); above 0 the k tokens are picked greedily by maximal marginal relevance,
            `(1 - w) * score_i - w * max(0, max_{j kept} cos(z_i, z_j))` on SAM's semantic tokens `z`.
    """

    use_deft: bool = False
    deft_semantic_dim: int = 512
    deft_retention_ratio: float = 0.482
    deft_enable_rtd: bool = True
    deft_alpha_var: float = 0.1
    deft_rtd_bottleneck_ratio: int = 4
    deft_inference_mode: str = "fast"
    deft_rtd_entropy_threshold: float = 0.6
    deft_rtd_confidence_threshold: float = 0.3
    deft_saliency_hidden_dim: int = 256
    deft_group_image_neighbors: int = 8
    deft_group_video_window: int = 2
    deft_group_text_neighbors: int = 5
    deft_keep_original_positions: bool = True
    deft_feedback_loss_weight: float = 1.0
    deft_rtd_loss_weight: float = 1.0
    deft_text_retention_ratio: float | None = None
    deft_score_components: tuple[str, ...] | list[str] | None = None
    deft_question_aware: bool = False
    deft_position_aware: bool = False
    deft_ranking_loss: str = "mse"
    deft_ranking_temperature: float = 0.1
    deft_coverage_weight: float = 0.0

    def __post_init__(self):
        validate_deft_settings(**asdict(self))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _check_type(name, value, types, what):
    # bool is an int subclass: refuse True where a number is expected, and 1 where a bool is expected
    if isinstance(value, bool) and bool not in types:
        raise TypeError(f"{name} must be {what}, got the bool {value!r}")
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}")


def validate_retention_ratio(value, name="deft_retention_ratio"):
    _check_type(name, value, (int, float), "a number in (0, 1]")
    if not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def validate_inference_mode(value, name="deft_inference_mode"):
    if value not in INFERENCE_MODES:
        raise ValueError(f"{name} must be one of {INFERENCE_MODES}, got {value!r}")


def validate_score_components(value, name="deft_score_components"):
    """None, or a non-empty list/tuple of distinct names of `SCORE_COMPONENTS`."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be None or a list of component names among {list(SCORE_COMPONENTS)}, got {value!r} "
            f"of type {type(value).__name__}"
        )
    if not value:
        raise ValueError(
            f"{name} must name at least one of {list(SCORE_COMPONENTS)} (None: all), got {value!r}"
        )
    unknown = [c for c in value if c not in SCORE_COMPONENTS]
    if unknown:
        raise ValueError(f"{name} has unknown component(s) {unknown}; valid: {list(SCORE_COMPONENTS)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} lists a component twice: {list(value)}")


# the DeFT namespace: a key that starts with one of these (case and "-" vs "_" ignored) is a DeFT setting or a
# typo of one, never a setting of another library ("deft" also catches "deftretention_ratio")
DEFT_NAMESPACES = ("deft", "use_deft", "compression")
# the same settings under `DeFTModule`'s argument names, which seed users may pass to a config by habit
MODULE_ARGUMENT_NAMES = {
    "semantic_dim": "deft_semantic_dim",
    "retention_ratio": "deft_retention_ratio",
    "enable_rtd": "deft_enable_rtd",
    "alpha_var": "deft_alpha_var",
    "rtd_bottleneck_ratio": "deft_rtd_bottleneck_ratio",
    "inference_mode": "deft_inference_mode",
    "entropy_threshold": "deft_rtd_entropy_threshold",
    "confidence_threshold": "deft_rtd_confidence_threshold",
    "saliency_hidden_dim": "deft_saliency_hidden_dim",
    "image_neighbors": "deft_group_image_neighbors",
    "video_window": "deft_group_video_window",
    "text_neighbors": "deft_group_text_neighbors",
    "feedback_loss_weight": "deft_feedback_loss_weight",
    "rtd_loss_weight": "deft_rtd_loss_weight",
    "score_components": "deft_score_components",
    "question_aware": "deft_question_aware",
    "position_aware": "deft_position_aware",
    "ranking_loss": "deft_ranking_loss",
    "ranking_temperature": "deft_ranking_temperature",
    "coverage_weight": "deft_coverage_weight",
}


def looks_like_deft_key(key: str, valid: tuple[str, ...] = ()) -> bool:
    """True for a key in the DeFT namespace (`deft_*`, `use_deft*`, `compression_*`), a `DeFTModule` argument
    name, or a near miss of one of `valid` (`def_retention_ratio`): a key that must not be kept silently."""
    normal = key.lower().replace("-", "_")
    return (
        normal.startswith(DEFT_NAMESPACES)
        or normal in MODULE_ARGUMENT_NAMES
        or bool(difflib.get_close_matches(normal, valid, n=1, cutoff=0.9))
    )


def check_unknown_deft_keys(keys, valid: tuple[str, ...], where: str, *, every_key: bool = False) -> None:
    """Raise `ValueError` for the first of `keys` that is not one of `valid` and looks like a DeFT setting
    (`looks_like_deft_key`; any unknown key with `every_key=True`), naming the closest valid key: a typo such
    as `deft_retension_ratio=0.25` would otherwise be stored and ignored, and the model would run at the
    default ratio without a word.

    Args:
        keys: the keys given (constructor keywords, `from_pretrained` overrides, extra config attributes).
        valid: the settings `where` knows.
        where: who was given the keys, for the message (`"DeftLlavaConfig"`).
    """
    for key in keys:
        if key in valid:
            continue
        if not isinstance(key, str):
            raise TypeError(
                f"{where} got a setting named {key!r} of type {type(key).__name__}; names are str"
            )
        if not every_key and not looks_like_deft_key(key, valid):
            continue
        guess = MODULE_ARGUMENT_NAMES.get(key.lower().replace("-", "_"))
        if guess not in valid:
            guess = difflib.get_close_matches(key.lower(), valid, n=1, cutoff=0.0)[0]
        raise ValueError(
            f"{where} got the unknown setting {key!r}; did you mean {guess!r}? (an unknown setting would be "
            f"ignored and the default used). Valid settings: {sorted(valid)}"
        )


def validate_deft_settings(**values) -> None:
    """Raise `TypeError`/`ValueError` naming the first invalid DeFT setting (unknown keys included)."""
    check_unknown_deft_keys(values, DeftSettings.field_names(), "the DeFT settings", every_key=True)
    for name in (
        "use_deft",
        "deft_enable_rtd",
        "deft_keep_original_positions",
        "deft_question_aware",
        "deft_position_aware",
    ):
        if name in values:
            _check_type(name, values[name], (bool,), "True or False")
    for name in (
        "deft_semantic_dim",
        "deft_rtd_bottleneck_ratio",
        "deft_saliency_hidden_dim",
        "deft_group_text_neighbors",
    ):
        if name in values:
            _check_type(name, values[name], (int,), "a positive int")
            if values[name] < 1:
                raise ValueError(f"{name} must be a positive int, got {values[name]!r}")
    if "deft_group_video_window" in values:
        _check_type("deft_group_video_window", values["deft_group_video_window"], (int,), "an int >= 0")
        if values["deft_group_video_window"] < 0:
            raise ValueError(
                f"deft_group_video_window must be >= 0, got {values['deft_group_video_window']!r}"
            )
    if "deft_group_image_neighbors" in values and values["deft_group_image_neighbors"] not in (4, 8):
        raise ValueError(
            f"deft_group_image_neighbors must be 4 or 8, got {values['deft_group_image_neighbors']!r}"
        )
    if "deft_retention_ratio" in values:
        validate_retention_ratio(values["deft_retention_ratio"])
    if values.get("deft_text_retention_ratio") is not None:
        validate_retention_ratio(values["deft_text_retention_ratio"], name="deft_text_retention_ratio")
    if "deft_inference_mode" in values:
        validate_inference_mode(values["deft_inference_mode"])
    if values.get("deft_score_components") is not None:
        validate_score_components(values["deft_score_components"])
    for name in ("deft_rtd_entropy_threshold", "deft_rtd_confidence_threshold"):
        if name in values:
            _check_type(name, values[name], (int, float), "a number in [0, 1]")
            if not 0.0 <= float(values[name]) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {values[name]!r}")
    if "deft_ranking_loss" in values and values["deft_ranking_loss"] not in RANKING_LOSSES:
        raise ValueError(
            f"deft_ranking_loss must be one of {RANKING_LOSSES}, got {values['deft_ranking_loss']!r}"
        )
    if "deft_ranking_temperature" in values:
        value = values["deft_ranking_temperature"]
        _check_type("deft_ranking_temperature", value, (int, float), "a finite number > 0")
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"deft_ranking_temperature must be a finite number > 0, got {value!r}")
    if "deft_coverage_weight" in values:
        value = values["deft_coverage_weight"]
        _check_type("deft_coverage_weight", value, (int, float), "a number in [0, 1)")
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"deft_coverage_weight must be in [0, 1), got {value!r}")
    for name in ("deft_alpha_var", "deft_feedback_loss_weight", "deft_rtd_loss_weight"):
        if name in values:
            _check_type(name, values[name], (int, float), "a finite number >= 0")
            if not (math.isfinite(float(values[name])) and float(values[name]) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {values[name]!r}")


def num_kept_tokens(num_tokens: int, retention_ratio: float) -> int:
    """Tokens kept by top-k: `max(1, floor(retention_ratio * num_tokens + 0.5))` (round half up).

    The one budget rule of the project: the processor (placeholders) and every method use it. The official
    FastV and DivPrune code round half to even (`round(0.5 * 9) = 4`, here 5); DeFT's seed names no rule.

    >>> num_kept_tokens(576, 0.25), num_kept_tokens(256, 0.482), num_kept_tokens(64, 0.125)
    (144, 123, 8)
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return max(1, min(num_tokens, int(math.floor(retention_ratio * num_tokens + 0.5))))


DEFAULTS = DeftSettings()

# The recipe of the shipped DeFT checkpoints and of `convert`'s new DeFT folders: a question-aware,
# position-aware scorer trained with a ranking loss (measured in docs/results.md, "DeFT ablation"). The defaults above
# stay the seed's, so `DeFTModule(...)` called the seed's way and folders saved before these settings existed
# behave as they did.
DEFT_RECIPE = {
    "deft_question_aware": True,
    "deft_position_aware": True,
    "deft_ranking_loss": "listnet",
}

# the default `compression_method`: DeFT itself. The names of every method live in one place, the registry
# (`modeling_deft_llava/compressors/compression_registry.py`); the placeholder policy and the method checks that
# ask it live in `modeling_deft_llava/compressors/placeholder_policy.py`, above this file.
DEFT_METHOD = "deft"
