"""DeftLlavaForConditionalGeneration: stock equivalence, compression in forward and generate, positions,
re-packing, RTD modes, video, save/load, processor/model counts and bad input."""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.configuration import num_kept_tokens
from transformers import AutoConfig, AutoModelForImageTextToText

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[4, 5])  # never emit <image>/<video>
NEVER_UNCERTAIN = dict(deft_rtd_entropy_threshold=1.0, deft_rtd_confidence_threshold=0.0)
ALWAYS_UNCERTAIN = dict(deft_rtd_entropy_threshold=0.0, deft_rtd_confidence_threshold=1.0)


def batch_inputs(processor, n_images=(1, 1), questions=("what is in the picture ?", "what is ?"), seed=0):
    imgs = tiny.images(sum(n_images), seed)
    texts = [tiny.prompt(n, q) for n, q in zip(n_images, questions)]
    return processor(images=imgs or None, text=texts, return_tensors="pt", padding=True)


def greedy_full_recompute(model, inputs, steps):
    """Reference decoding: every step re-runs the whole forward (visual inputs included), no cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
            logits[:, [4, 5]] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


# ----------------------------------------------------------------------------- compression off = stock LLaVA
def test_compression_off_matches_stock_llava():
    model = tiny.model(use_deft=False)
    stock = tiny.stock_twin(model)
    inputs = batch_inputs(tiny.processor())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.generate(**inputs, **GEN), stock.generate(**inputs, **GEN))
    assert model.model.deft is None


# ----------------------------------------------------------------------------- fixed budget
@pytest.fixture(scope="module")
def fast():
    return tiny.model(use_deft=True, deft_retention_ratio=0.25), tiny.processor(
        use_deft=True, deft_retention_ratio=0.25
    )


def test_processor_writes_the_kept_count(fast):
    model, processor = fast
    inputs = batch_inputs(processor)
    k = num_kept_tokens(tiny.NUM_PATCHES, 0.25)
    assert ((inputs["input_ids"] == 4).sum(1) == k).all()
    assert model.config.num_kept_tokens(tiny.NUM_PATCHES) == k


def _reference_logits(model, inputs):
    """No-cache reference: stock LLaVA language model fed the kept tokens with hand-built positions."""
    stock = tiny.stock_twin(model)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"])
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = stock.get_input_embeddings()(ids)
        embeds[ids == 4] = torch.cat(feats.pooler_output)
        positions = torch.zeros_like(ids)
        item = 0
        for b in range(ids.shape[0]):
            pos = 0
            t = 0
            while t < ids.shape[1]:
                if not mask[b, t]:
                    t += 1
                    continue
                if ids[b, t] == 4:
                    src = feats.source_indices[item]
                    positions[b, t : t + len(src)] = pos + src
                    pos += feats.num_source_tokens[item]
                    t += len(src)
                    item += 1
                else:
                    positions[b, t] = pos
                    pos += 1
                    t += 1
        out = stock.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return stock.lm_head(out.last_hidden_state), positions


def test_original_positions_against_a_hand_built_reference(fast):
    model, processor = fast
    inputs = batch_inputs(processor, n_images=(2, 1))
    ref_logits, ref_positions = _reference_logits(model, inputs)
    with torch.no_grad():
        out = model(**inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(out.deft_position_ids[valid], ref_positions[valid])
    torch.testing.assert_close(out.logits[valid], ref_logits[valid], rtol=1e-5, atol=1e-5)
    # the text after the last image resumes after the FULL image: 2 images of 16 patches in row 0
    assert int(out.deft_position_ids[0, -1]) == int(valid[0].sum()) - 1 + 2 * (16 - 4)


def test_positions_flag_off_renumbers_contiguously():
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25, deft_keep_original_positions=False)
    inputs = batch_inputs(tiny.processor(use_deft=True, deft_retention_ratio=0.25))
    out = model(**inputs)
    valid = inputs["attention_mask"].bool()
    expect = (valid.long().cumsum(1) - 1).masked_fill(~valid, 0)
    assert torch.equal(out.deft_position_ids, expect)


def test_cached_generation_equals_no_cache_reference(fast):
    model, processor = fast
    inputs = batch_inputs(processor)
    cached = model.generate(**inputs, **GEN)
    assert torch.equal(cached, model.generate(**inputs, **GEN, use_cache=False))
    assert torch.equal(cached, greedy_full_recompute(model, inputs, 4))


def test_batch_rows_equal_single_runs(fast):
    model, processor = fast
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a ?"))
    together = model.generate(**inputs, **GEN)[:, -4:]
    for b in range(2):
        single = processor(
            images=tiny.images(2)[b : b + 1],
            text=[tiny.prompt(1, ["what is in the picture ?", "a ?"][b])],
            return_tensors="pt",
        )
        alone = model.generate(**single, **GEN)[:, -4:]
        assert torch.equal(alone[0], together[b])


def test_generate_sampling_and_beam_search(fast):
    model, processor = fast
    inputs = batch_inputs(processor, n_images=(2, 1))
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5, suppress_tokens=[4, 5])
    assert sampled.shape == (2, inputs["input_ids"].shape[1] + 3)
    beams = model.generate(
        **inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, suppress_tokens=[4, 5]
    )
    assert beams.shape[0] == 4


def test_samples_without_images_in_the_same_batch(fast):
    model, processor = fast
    inputs = processor(
        images=tiny.images(1),
        text=[tiny.prompt(1), "USER: what is the picture ? ASSISTANT:"],
        return_tensors="pt",
        padding=True,
    )
    out = model.generate(**inputs, **GEN)
    text_only = processor(text=["USER: what is the picture ? ASSISTANT:"], return_tensors="pt")
    alone = model.generate(**text_only, **GEN)
    assert torch.equal(out[1, -4:], alone[0, -4:])


def test_labels_give_a_loss_and_gradients_reach_deft(fast):
    model, processor = fast
    model.train()
    try:
        inputs = batch_inputs(processor)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == 4, -100)
        out = model(**inputs, labels=labels)
        out.loss.backward()
        assert out.rtd_loss is not None and torch.isfinite(out.loss)
        for name, param in model.model.deft.named_parameters():
            if "mixture_logits" in name:  # learns from the feedback loss only (tests/test_training.py)
                assert param.grad is None or not param.grad.any(), name
            else:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
    finally:
        model.zero_grad()
        model.eval()


def test_output_carries_compression_details(fast):
    model, processor = fast
    out = model(**batch_inputs(processor, n_images=(2, 1)))
    assert len(out.kept_indices) == 3 and all(len(k) == 4 for k in out.kept_indices)
    assert out.compression_scores.shape == (3, 16)
    assert set(out.mixture_weights) == {"semantic", "group"}


def test_bf16(fast):
    model, processor = fast
    model16 = tiny.model(use_deft=True, deft_retention_ratio=0.25).to(torch.bfloat16)
    inputs = batch_inputs(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out = model16(**inputs)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert model16.generate(**inputs, **GEN).shape[1] == inputs["input_ids"].shape[1] + 4


# ----------------------------------------------------------------------------- variable budgets (RTD)
def test_hybrid_repacks_and_matches_no_cache():
    settings = dict(use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="hybrid", **NEVER_UNCERTAIN)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    assert ((inputs["input_ids"] == 4).sum(1) == 16).all()  # every placeholder is written
    out = model(**inputs)
    assert out.deft_attention_mask is not None
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 12  # 12 of 16 dropped in the longest row
    assert out.num_reconstructed.tolist() == [0, 0]
    assert torch.equal(model.generate(**inputs, **GEN), model.generate(**inputs, **GEN, use_cache=False))
    assert torch.equal(model.generate(**inputs, **GEN), greedy_full_recompute(model, inputs, 4))
    # same kept tokens and positions as the fixed-budget model with the same weights
    fixed = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    fixed.load_state_dict(model.state_dict())
    fixed_inputs = batch_inputs(tiny.processor(use_deft=True, deft_retention_ratio=0.25))
    with torch.no_grad():
        a, b = model(**inputs).logits[:, -1], fixed(**fixed_inputs).logits[:, -1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hybrid_labels_are_repacked_with_the_tokens():
    settings = dict(use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="hybrid", **NEVER_UNCERTAIN)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    labels = inputs["input_ids"].masked_fill(
        (inputs["input_ids"] == 4) | (inputs["attention_mask"] == 0), -100
    )
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


def test_hybrid_reconstructs_when_uncertain():
    settings = dict(
        use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="hybrid", **ALWAYS_UNCERTAIN
    )
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    out = model(**batch_inputs(processor))
    assert out.num_reconstructed.tolist() == [12, 12] and out.deft_attention_mask is None


@pytest.mark.parametrize("thresholds, expect", [(NEVER_UNCERTAIN, 0), (ALWAYS_UNCERTAIN, 12)])
def test_adaptive_both_branches(thresholds, expect):
    settings = dict(use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="adaptive", **thresholds)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    out = model(**inputs)
    assert out.num_reconstructed.tolist() == [expect, expect]
    generated = model.generate(**inputs, **GEN)
    assert torch.equal(generated, model.generate(**inputs, **GEN, use_cache=False))


# ----------------------------------------------------------------------------- video
def test_video_forward_and_generate():
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    frames = [tiny.images(3, seed=1)]
    inputs = processor(videos=frames, text=["USER: <video>\nwhat is ? ASSISTANT:"], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 3, 3, 32, 32)
    assert int((inputs["input_ids"] == 5).sum()) == num_kept_tokens(48, 0.25)
    out = model(**inputs)
    assert out.kept_indices[0].max() < 48
    cached = model.generate(**inputs, **GEN)
    assert torch.equal(cached, greedy_full_recompute(model, inputs, 4))
    assert torch.equal(cached, model.generate(**inputs, **GEN, use_cache=False))


def test_position_gaps_are_not_read_as_packed_sequences(fast):
    # regression: with no attention_mask and no cache, transformers treats a jump in position_ids as the
    # start of a new packed sequence; the model must pass an explicit mask so attention still crosses gaps
    model, processor = fast
    inputs = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
    with torch.no_grad():
        with_mask = model(**inputs, use_cache=False).logits
        without = model(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], use_cache=False
        ).logits
    torch.testing.assert_close(with_mask, without)


# ----------------------------------------------------------------------------- save / load / Auto
def test_save_load_round_trip_and_auto_classes(tmp_path, fast):
    model, processor = fast
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DeftLlavaConfig) and config.deft_retention_ratio == 0.25
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DeftLlavaForConditionalGeneration)
    from modeling_deft_llava import DeftLlavaProcessor

    proc2 = DeftLlavaProcessor.from_pretrained(tmp_path)
    assert proc2.use_deft and proc2.deft_retention_ratio == 0.25
    inputs = batch_inputs(proc2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    override = DeftLlavaProcessor.from_pretrained(tmp_path, deft_retention_ratio=0.5)
    assert ((batch_inputs(override)["input_ids"] == 4).sum(1) == 8).all()


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.482, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["fast", "hybrid"])
def test_processor_and_model_counts_agree(ratio, mode):
    settings = dict(use_deft=True, deft_retention_ratio=ratio, deft_inference_mode=mode)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"])
    assert sum(len(r) for r in feats.pooler_output) == int((inputs["input_ids"] == 4).sum())


# ----------------------------------------------------------------------------- bad input
def test_placeholder_mismatch_is_a_clear_error(fast):
    model, _ = fast
    stock_processor = tiny.processor()  # writes 16 placeholders, the model keeps 4
    with pytest.raises(ValueError, match="16 <image> placeholders but the 1 image"):
        model(**stock_processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt"))


def test_bad_pixel_values_and_config():
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.model.get_image_features(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="deft_retention_ratio"):
        tiny.config(use_deft=True, deft_retention_ratio=0.0)
    with pytest.raises(ValueError, match="deft_enable_rtd=True"):
        tiny.config(use_deft=True, deft_inference_mode="hybrid", deft_enable_rtd=False)


# ----------------------------------------------------------------------------- from stock llava-hf folders
def test_stock_llava_folder_loads_with_deft_overrides(tmp_path):
    base = tiny.model(use_deft=False)
    stock = tiny.stock_twin(base)
    stock.save_pretrained(tmp_path / "stock")  # stock LLaVA writes the older llava-hf key layout
    model, info = DeftLlavaForConditionalGeneration.from_pretrained(
        tmp_path / "stock", use_deft=True, deft_retention_ratio=0.25, output_loading_info=True
    )
    assert all(
        key.startswith("model.deft.") for key in info["missing_keys"]
    )  # only the new weights, reported
    assert info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.lm_head.weight, stock.lm_head.weight)
    model.save_pretrained(tmp_path / "deft")
    assert AutoConfig.from_pretrained(tmp_path / "deft").model_type == "deft_llava"
    reloaded = DeftLlavaForConditionalGeneration.from_pretrained(tmp_path / "deft")
    torch.testing.assert_close(
        reloaded.model.deft.score_mixer.mixture_logits, model.model.deft.score_mixer.mixture_logits
    )


def test_truncated_weights_file_fails_loudly(tmp_path, fast):
    model, _ = fast
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        DeftLlavaForConditionalGeneration.from_pretrained(tmp_path)


def test_from_pretrained_overrides_are_validated(tmp_path, fast):
    # regression: overrides are set after the config's __post_init__, so they escaped validation
    model, _ = fast
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="deft_retention_ratio"):
        DeftLlavaForConditionalGeneration.from_pretrained(tmp_path, deft_retention_ratio=1.5)
    with pytest.raises(ValueError, match="fastv_layer"):
        DeftLlavaForConditionalGeneration.from_pretrained(
            tmp_path, compression_method="fastv", compression_settings={"fastv_layer": 7}
        )
