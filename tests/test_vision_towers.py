"""Vision towers without a CLS token (SigLIP) and the `"full"` feature strategy.

Every registered method runs on a SigLIP tower, or is refused when the config (or the model) is built: never
at the first forward, and never by silently taking a patch for the CLS token. `use_deft` needs one image
feature per patch, so a tower's strategy is checked at config time too (CLIP: "default", SigLIP: "full").
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tiny
import torch
from modeling_deft_llava.configuration.vision_towers import check_cls_token, check_one_feature_per_patch
from test_model import GEN, batch_inputs
from test_model_methods import method_settings

from modeling_deft_llava import DeftLlavaForConditionalGeneration
from modeling_deft_llava.compressors.compression_registry import BASELINE_METHODS

METHODS = ("deft",) + tuple(BASELINE_METHODS)
# what each of these ranks or protects is the CLS token: VisionZip and FiCoCo-V its attention, Recoverable
# its embedding (or attention), ToMe keeps it out of every merge, PruneSID's NMS ranks by its attention
NEEDS_CLS = ("visionzip", "recoverable", "tome", "ficoco_v", "prunesid")
WITHOUT_CLS = tuple(m for m in METHODS if m not in NEEDS_CLS)


def refusal(**overrides) -> str:
    with pytest.raises(ValueError) as caught:
        tiny.config(**overrides)
    return str(caught.value)


def test_the_registry_flags_the_methods_that_need_cls():
    assert {name for name, cls in BASELINE_METHODS.items() if cls.needs_cls_token} == set(NEEDS_CLS)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_or_is_refused_at_construction_on_siglip(method):
    settings = method_settings(method)
    if method in NEEDS_CLS:
        message = refusal(**tiny.SIGLIP, **settings)
        for part in (method, "siglip_vision_model", "'full'", "no CLS token", *WITHOUT_CLS):
            assert part in message, (part, message)
        return
    model = tiny.model(**tiny.SIGLIP, **settings)
    processor = tiny.processor(**tiny.SIGLIP_PROCESSOR, **settings)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    out = model(**inputs)
    for kept in out.kept_indices:
        assert len(kept) == 4 and bool((kept.diff() > 0).all()) and int(kept.max()) < tiny.NUM_PATCHES
    generated = model.generate(**inputs, **GEN)
    assert torch.equal(generated, model.generate(**inputs, **GEN, use_cache=False))


@pytest.mark.parametrize("method", NEEDS_CLS)
def test_a_cls_method_is_refused_when_the_model_is_built(method):
    # from_pretrained(folder, compression_method=...) sets overrides after the config's own checks
    config = tiny.config(**tiny.SIGLIP)
    config.use_deft, config.compression_method = True, method
    config.compression_settings = method_settings(method)["compression_settings"]
    with pytest.raises(ValueError, match=f"compression_method='{method}' needs the vision tower's CLS token"):
        DeftLlavaForConditionalGeneration(config)


@pytest.mark.parametrize("method", METHODS)
def test_clip_with_the_full_strategy_is_refused_at_construction(method):
    # "full" keeps CLIP's CLS token among the features: N + 1 rows for N patches (before: every method
    # failed at the first forward, "use_deft needs one token per patch")
    message = refusal(vision_feature_select_strategy="full", **method_settings(method))
    assert "clip_vision_model" in message and "'full'" in message and "'default'" in message, message
    if method in NEEDS_CLS:
        assert f"compression_method={method!r} needs the vision tower's CLS token" in message


@pytest.mark.parametrize("method", WITHOUT_CLS)
def test_siglip_with_the_default_strategy_is_refused_at_construction(method):
    # "default" drops the first feature, which on SigLIP is a patch (before: the first forward failed)
    message = refusal(vision_config=tiny.vision_config("siglip_vision_model"), **method_settings(method))
    assert "siglip_vision_model" in message and "'full'" in message and "'default'" in message, message


@pytest.mark.parametrize("tower", [tiny.vision_config(), tiny.vision_config("siglip_vision_model")])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_without_compression_every_tower_and_strategy_stays_stock(tower, strategy):
    # use_deft=False is stock LLaVA: whatever stock accepts is accepted
    config = tiny.config(vision_config=tower, vision_feature_select_strategy=strategy)
    DeftLlavaForConditionalGeneration(config)


def test_an_unlisted_tower_type_is_left_to_the_forward_check():
    unlisted = SimpleNamespace(model_type="some_vision_model")
    # nothing known about it: the model counts the features at the first forward
    check_one_feature_per_patch(unlisted, "full")
    config = SimpleNamespace(
        vision_config=unlisted, vision_feature_layer=-2, vision_feature_select_strategy="default"
    )
    check_cls_token("visionzip", config, WITHOUT_CLS)  # LLaVA's "default" means token 0 is the CLS
    config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="sets no CLS token apart on a some_vision_model tower"):
        check_cls_token("visionzip", config, WITHOUT_CLS)


@pytest.mark.parametrize("method", NEEDS_CLS)
def test_a_cls_method_needs_one_feature_layer_at_construction(method):
    # before: visionzip failed at the first forward, recoverable with a TypeError (a list as an index)
    message = refusal(vision_feature_layer=[-2, -1], **method_settings(method))
    assert f"compression_method={method!r}" in message and "single int vision_feature_layer" in message
