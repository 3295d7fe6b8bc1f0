"""Misspelt DeFT settings are refused with the closest valid name, wherever they are given (issue 13 A).

Before: `DeftLlavaConfig(use_deft=True, deft_retension_ratio=0.25)` stored the typo and ran at the default ratio.
"""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from modeling_deft_llava.configuration import validate_deft_settings

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration
from modeling_deft_llava.compressors.placeholder_policy import placeholder_count

TYPOS = [
    ("deft_retension_ratio", 0.25, "deft_retention_ratio"),
    ("deft_retention", 0.25, "deft_retention_ratio"),
    ("def_retention_ratio", 0.25, "deft_retention_ratio"),  # outside the namespace, but a near miss
    ("retention_ratio", 0.25, "deft_retention_ratio"),  # DeFTModule's name for it
    ("inference_mode", "hybrid", "deft_inference_mode"),
    ("Use_Deft", True, "use_deft"),
    ("deft_group_image_neighbours", 4, "deft_group_image_neighbors"),
    ("compression_methd", "random", "compression_method"),
    ("compression_setings", {"a": 1}, "compression_settings"),
]


@pytest.mark.parametrize("key, value, closest", TYPOS)
def test_config_refuses_misspelt_setting(key, value, closest):
    with pytest.raises(ValueError, match=rf"unknown setting '{key}'; did you mean '{closest}'"):
        tiny.config(use_deft=True, **{key: value})


def test_config_keeps_unrelated_extra_keys():
    assert tiny.config(use_deft=True, my_experiment_tag="a").my_experiment_tag == "a"


def test_config_refuses_compression_settings_for_deft():
    with pytest.raises(ValueError, match="compression_method='deft' would ignore them"):
        tiny.config(use_deft=True, compression_settings={"deft_retention_ratio": 0.25})


def test_validate_deft_settings_refuses_unknown_keys():
    with pytest.raises(ValueError, match="did you mean 'deft_retention_ratio'"):
        validate_deft_settings(deft_retension_ratio=0.25)
    with pytest.raises(ValueError, match="did you mean 'deft_inference_mode'"):
        validate_deft_settings(inference_mode="fast")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deft")
    tiny.model(use_deft=True, deft_retention_ratio=0.25).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("cls", [DeftLlavaConfig, DeftLlavaForConditionalGeneration])
def test_from_pretrained_refuses_misspelt_override(saved, cls):
    # before: the config returned the key as unused (silently); the model failed with a bare TypeError
    with pytest.raises(
        ValueError, match="unknown setting 'deft_retension_ratio'; did you mean 'deft_retention_ratio'"
    ):
        cls.from_pretrained(saved, deft_retension_ratio=0.5)
    with pytest.raises(ValueError, match="did you mean 'compression_method'"):
        cls.from_pretrained(saved, compression_methd="random")


def test_config_json_with_misspelt_key_fails_to_load(saved, tmp_path):
    values = json.loads((saved / "config.json").read_text())
    values["deft_retension_ratio"] = values.pop("deft_retention_ratio")
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="did you mean 'deft_retention_ratio'"):
        DeftLlavaConfig.from_pretrained(tmp_path)


def test_misspelt_setting_on_a_built_model_fails_at_the_next_call(saved):
    model = DeftLlavaForConditionalGeneration.from_pretrained(saved)
    model.config.deft_retension_ratio = 0.5
    inputs = tiny.processor(use_deft=True, deft_retention_ratio=0.25)(
        images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt"
    )
    with pytest.raises(ValueError, match="did you mean 'deft_retention_ratio'"), torch.no_grad():
        model(**inputs)


def test_unknown_method_names_the_closest():
    with pytest.raises(ValueError, match="valid: 'deft' or one of .*did you mean 'random'"):
        tiny.config(use_deft=True, compression_method="randm")
    # the processor counts its placeholders with placeholder_count: an unknown method fails there, it no
    # longer writes K placeholders for a method the model cannot run
    with pytest.raises(ValueError, match="did you mean 'fastv'"):
        placeholder_count(16, True, 0.25, "fast", "fast_v")
    with pytest.raises(ValueError, match="compression_method 'bogus' cannot run inside the model"):
        tiny.processor(use_deft=True, compression_method="bogus")  # now refused when built


def test_processor_refuses_misspelt_deft_keys_and_unknown_methods_at_construction(tmp_path):
    """Before: `DeftLlavaProcessor(..., deft_retension_ratio=...)` was kept silently in **kwargs, and
    `compression_method="bogus"` was accepted until the first call."""
    import tiny

    with pytest.raises(ValueError, match="deft_retention_ratio"):
        tiny.processor(use_deft=True, deft_retension_ratio=0.25)
    with pytest.raises(ValueError, match="compression_method"):
        tiny.processor(use_deft=True, compression_method="bogus")
    tiny.processor(use_deft=True).save_pretrained(tmp_path)
    from modeling_deft_llava import DeftLlavaProcessor

    with pytest.raises(ValueError, match="deft_retention_ratio"):
        DeftLlavaProcessor.from_pretrained(tmp_path, deft_retension_ratio=0.25)
    with pytest.raises(ValueError, match="compression_method"):
        DeftLlavaProcessor.from_pretrained(tmp_path, compression_method="bogus")
