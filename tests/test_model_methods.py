"""Every compression method the model runs, through the same forward/generate path, at the same budget."""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.configuration import num_kept_tokens
from test_model import GEN, batch_inputs, greedy_full_recompute

from modeling_deft_llava.compressors.compression_registry import METHODS as REGISTERED

METHODS = tuple(
    REGISTERED
)  # every registered method, DeFT first: a new method is tested here by registering it
# per-method settings the tiny model needs (2 language-model layers: FastV / FiCoCo-L reduce after layer 0)
SETTINGS = {"fastv": {"fastv_layer": 1}, "ficoco_v": {"start_layer": 0}, "ficoco_l": {"ficoco_l_layer": 1}}


def method_settings(method: str) -> dict:
    return dict(
        use_deft=True,
        deft_retention_ratio=0.25,
        compression_method=method,
        compression_settings=SETTINGS.get(method),
    )


@pytest.mark.parametrize("method", METHODS)
def test_method_in_forward_and_generate(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    k = num_kept_tokens(tiny.NUM_PATCHES, 0.25)  # the budget: visual tokens the language model keeps
    placeholders = model.config.num_kept_tokens(tiny.NUM_PATCHES)  # K, or N where the model decides
    assert k == 4 and placeholders in (k, tiny.NUM_PATCHES)
    assert ((inputs["input_ids"] == 4).sum(1) == placeholders).all()  # the processor agrees with the model
    out = model(**inputs)
    for kept in out.kept_indices:
        assert len(kept) == k and bool((kept.diff() > 0).all()) and int(kept.max()) < tiny.NUM_PATCHES
    generated = model.generate(**inputs, **GEN)
    # reference: every step re-runs the whole forward without a cache, deciding on the prompt only
    prompt = dict(inputs, deft_prompt_length=inputs["input_ids"].shape[1])
    assert torch.equal(generated, greedy_full_recompute(model, prompt, 4))
    assert torch.equal(generated, model.generate(**inputs, **GEN, use_cache=False))
    for b, question in enumerate(("what is in the picture ?", "a ?")):  # batch rows = single runs
        single = processor(
            images=tiny.images(2)[b : b + 1], text=[tiny.prompt(1, question)], return_tensors="pt"
        )
        assert torch.equal(model.generate(**single, **GEN)[0, -4:], generated[b, -4:])


@pytest.mark.parametrize("method", ["fastv", "ficoco_l"])
def test_in_llm_methods_refuse_renumbered_positions(method):
    # before: accepted and silently ignored (outputs bit-identical to original positions)
    with pytest.raises(ValueError, match="deft_keep_original_positions=False would change nothing"):
        tiny.config(**method_settings(method), deft_keep_original_positions=False)


def test_bad_method_settings_fail_at_config_time():
    with pytest.raises(ValueError, match="not a perfect square"):
        tiny.config(use_deft=True, deft_retention_ratio=0.3, compression_method="deco")
    with pytest.raises(ValueError, match="cannot run inside the model"):
        tiny.config(use_deft=True, compression_method="ficoco_x")
    with pytest.raises(ValueError, match="unknown settings"):
        tiny.config(use_deft=True, compression_method="visionzip", compression_settings={"bogus": 1})
    with pytest.raises(ValueError, match=r"fastv_layer must be in \[1, 1\]"):
        tiny.config(use_deft=True, compression_method="fastv")  # default 2 needs 3+ layers
    with pytest.raises(ValueError, match=r"ficoco_l_layer must be in \[1, 1\]"):
        tiny.config(use_deft=True, compression_method="ficoco_l")  # default 2 needs 3+ layers
    with pytest.raises(ValueError, match="ficoco_l_layer must be an int"):
        tiny.config(use_deft=True, compression_method="ficoco_l", compression_settings={"ficoco_l_layer": 0})
    with pytest.raises(ValueError, match="smallest reachable count is 4"):
        tiny.config(use_deft=True, deft_retention_ratio=0.0625, compression_method="tome")
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 1\]"):
        tiny.config(use_deft=True, compression_method="ficoco_v")  # default 12 needs 13+ layers
    with pytest.raises(ValueError, match="ficoco_v cannot reach 4 of 16 tokens"):
        tiny.config(
            use_deft=True,
            deft_retention_ratio=0.25,
            compression_method="ficoco_v",
            compression_settings={"start_layer": 1},
        )


@pytest.mark.parametrize("method", METHODS)
def test_method_with_beams_and_in_bfloat16(method):
    # every registered method: beam search (the features are expanded per beam) and bf16
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    beams = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    assert beams.shape[0] == 4 and beams.shape[1] <= inputs["input_ids"].shape[1] + 3
    half = model.to(torch.bfloat16)
    inputs = dict(inputs, pixel_values=inputs["pixel_values"].to(torch.bfloat16))
    with torch.no_grad():
        assert torch.isfinite(half(**inputs).logits.float()).all()
    cached, uncached = half.generate(**inputs, **GEN), half.generate(**inputs, **GEN, use_cache=False)
    # the prefill is the same computation; later steps may differ by bf16 rounding (cache vs recompute), as in
    # stock LLaVA: the exact cached = uncached check is the float32 test above
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, : prompt + 1], uncached[:, : prompt + 1])


HALF_RATIO = 4.5 / 16  # N * ratio = 4.5 on the tiny model: round half up keeps 5, round half to even 4


@pytest.mark.parametrize("method", [m for m in METHODS if m != "deco"])  # DeCo: K must be a perfect square
def test_every_method_rounds_a_half_budget_up(method):
    # one budget rule (`num_kept_tokens`, round half up) for the processor and every method; the official
    # FastV and DivPrune code round half to even, which would keep 4 here
    settings = dict(method_settings(method), deft_retention_ratio=HALF_RATIO)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    assert num_kept_tokens(tiny.NUM_PATCHES, HALF_RATIO) == 5 != round(4.5)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    assert ((inputs["input_ids"] == 4).sum(1) == model.config.num_kept_tokens(tiny.NUM_PATCHES)).all()
    with torch.no_grad():
        out = model(**inputs)
    assert [len(kept) for kept in out.kept_indices] == [5, 5]
