"""Every compression method the model runs, through the same forward/generate path, at the same budget."""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.configuration.method_validation import MODEL_METHODS
from test_model import GEN, batch_inputs, greedy_full_recompute

METHODS = ("deft",) + MODEL_METHODS


@pytest.mark.parametrize("method", METHODS)
def test_method_in_forward_and_generate(method):
    settings = dict(use_deft=True, deft_retention_ratio=0.25, compression_method=method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    k = model.config.num_kept_tokens(tiny.NUM_PATCHES)
    assert k == 4 and ((inputs["input_ids"] == 4).sum(1) == k).all()  # budget respected, processor agrees
    out = model(**inputs)
    for kept in out.kept_indices:
        assert len(kept) == k and bool((kept.diff() > 0).all()) and int(kept.max()) < tiny.NUM_PATCHES
    generated = model.generate(**inputs, **GEN)
    assert torch.equal(generated, greedy_full_recompute(model, inputs, 4))
    for b, question in enumerate(("what is in the picture ?", "a ?")):  # batch rows = single runs
        single = processor(
            images=tiny.images(2)[b : b + 1], text=[tiny.prompt(1, question)], return_tensors="pt"
        )
        assert torch.equal(model.generate(**single, **GEN)[0, -4:], generated[b, -4:])


def test_bad_method_settings_fail_at_config_time():
    with pytest.raises(ValueError, match="not a perfect square"):
        tiny.config(use_deft=True, deft_retention_ratio=0.3, compression_method="deco")
    with pytest.raises(ValueError, match="cannot run inside the model"):
        tiny.config(use_deft=True, compression_method="fastv")
    with pytest.raises(ValueError, match="unknown settings"):
        tiny.config(use_deft=True, compression_method="visionzip", compression_settings={"bogus": 1})
