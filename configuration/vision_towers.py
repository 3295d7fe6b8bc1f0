"""What the config checks need to know about a vision tower: does a CLS token come before its patch tokens.

LLaVA's `vision_feature_select_strategy` assumes it: `"default"` drops the first token (CLIP's CLS), `"full"`
keeps every token (a SigLIP tower has no CLS, so every token is a patch). Compression needs exactly one image
feature per patch, and some methods need the CLS token itself. Imports nothing from the project.
"""

from __future__ import annotations

# `vision_config.model_type` -> whether the tower's hidden states start with a CLS token
TOWER_HAS_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


def tower_has_cls(vision_config) -> bool | None:
    """True (CLIP) or False (SigLIP) for a tower type in `TOWER_HAS_CLS`, None for one it does not list."""
    return TOWER_HAS_CLS.get(getattr(vision_config, "model_type", None))


def check_one_feature_per_patch(vision_config, strategy: str) -> None:
    """Raise ValueError when `strategy` does not give one image feature per patch on this tower.

    An unlisted tower type passes here; the model then checks the feature count at the first forward."""
    has_cls = tower_has_cls(vision_config)
    if has_cls is None:
        return
    wanted = "default" if has_cls else "full"
    if strategy != wanted:
        tower = vision_config.model_type
        why = (
            f"a {tower} tower puts a CLS token before its patches and only 'default' drops it"
            if has_cls
            else f"a {tower} tower has no CLS token, so 'default' would drop a patch (the first one)"
        )
        raise ValueError(
            f"use_deft needs one image feature per patch: {why}; set vision_feature_select_strategy={wanted!r}, "
            f"got {strategy!r}"
        )


def check_cls_token(method: str, config, methods_without_cls: tuple[str, ...]) -> None:
    """Raise ValueError when the CLS token that `method` needs is not there to use (`config`: a LLaVA config).

    The method reads the CLS token as token 0 of the one feature layer and ranks the patches after it: that
    holds only with a single int `vision_feature_layer` and `vision_feature_select_strategy="default"` on a
    tower that has a CLS token."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(
            f"compression_method={method!r} reads the CLS token of one feature layer and needs a single int "
            f"vision_feature_layer, got {layer!r}"
        )
    vision_config, strategy = config.vision_config, config.vision_feature_select_strategy
    has_cls = tower_has_cls(vision_config)
    if has_cls is not False and strategy == "default":
        return
    tower = getattr(vision_config, "model_type", None)
    if has_cls is False:
        why = (
            f"a {tower} tower has no CLS token (with vision_feature_select_strategy={strategy!r}); methods that "
            f"work without it: {methods_without_cls}"
        )
    elif has_cls:
        why = (
            f"vision_feature_select_strategy={strategy!r} keeps the {tower} tower's CLS token among the image "
            "features; set 'default', which sets it apart"
        )
    else:
        why = (
            f"vision_feature_select_strategy={strategy!r} sets no CLS token apart on a {tower} tower; set "
            f"'default' if the tower has one, else use a method that works without it: {methods_without_cls}"
        )
    raise ValueError(f"compression_method={method!r} needs the vision tower's CLS token, but {why}")
