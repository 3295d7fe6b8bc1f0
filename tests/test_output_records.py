"""What compression reports is one set of fields, read by the outer forward in one step; what a method carries
through `generate` is one opaque record (`deft_generation_state`) that no forward signature spells out."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

from modeling_deft_llava import (
    DeftLlavaCausalLMOutputWithPast,
    DeftLlavaForConditionalGeneration,
    DeftLlavaModel,
    DeftLlavaNextForConditionalGeneration,
    DeftLlavaNextModel,
)
from modeling_deft_llava.modeling_outputs_deft_llava import (
    COMPRESSION_REPORT_FIELDS,
    DeftLlavaModelOutputWithPast,
    compression_report,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/

from benchmarks.code_structure import module_files  # noqa: E402


@pytest.mark.parametrize(
    "cls",
    [
        DeftLlavaModel,
        DeftLlavaForConditionalGeneration,
        DeftLlavaNextModel,
        DeftLlavaNextForConditionalGeneration,
    ],
)
def test_no_forward_signature_names_one_methods_state(cls):
    parameters = inspect.signature(cls.forward).parameters
    assert "deft_layer_gather_index" not in parameters
    assert "deft_generation_state" in parameters


def test_fastv_state_is_named_in_fastv_only():
    holders = sorted(
        name for name, path in module_files().items() if "deft_layer_gather_index" in path.read_text()
    )
    assert holders == ["modeling_deft_llava.compressors.method_fastv"]


def test_both_outputs_carry_the_report_under_the_same_names():
    inner = set(DeftLlavaModelOutputWithPast.__dataclass_fields__)
    outer = set(DeftLlavaCausalLMOutputWithPast.__dataclass_fields__)
    assert set(COMPRESSION_REPORT_FIELDS) <= inner & outer
    out = DeftLlavaModelOutputWithPast(kept_indices=[torch.arange(3)], mixture_weights={"semantic": 1.0})
    report = compression_report(out)
    assert report["mixture_weights"] == {"semantic": 1.0} and report["compression_scores"] is None


@pytest.mark.parametrize(
    "old, new",
    [
        ("deft_kept_indices", "kept_indices"),
        ("deft_num_reconstructed", "num_reconstructed"),
        ("deft_compression_scores", "compression_scores"),
        ("deft_text_kept_indices", "text_kept_indices"),
    ],
)
def test_renamed_inner_fields_still_work_with_a_warning(old, new):
    out = DeftLlavaModelOutputWithPast()
    value = torch.ones(2)
    with pytest.warns(FutureWarning, match=f"{old} is deprecated; use .{new}"):
        setattr(out, old, value)
    assert getattr(out, new) is value
    with pytest.warns(FutureWarning, match=old):
        assert getattr(out, old) is value
