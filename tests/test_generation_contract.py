"""Generation behaves like stock LLaVA wherever compression does not require otherwise (issue 12).

Attention masks that are not 2-D and static caches; eager attention inside the in-LLM methods."""

from __future__ import annotations

import pytest
import tiny
import torch
from test_model import GEN, batch_inputs
from test_model_methods import method_settings

ATTENTION = ("sdpa", "eager")


def _pair(attn):
    model = tiny.model(use_deft=False)
    stock = tiny.stock_twin(model)
    model.set_attn_implementation(attn)
    stock.set_attn_implementation(attn)
    return model, stock


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_compression_off_generates_like_stock_with_every_cache(attn, cache):
    """Before: a static cache made `generate` pass a 4-D mask that `forward` read as 2-D (size mismatch)."""
    model, stock = _pair(attn)
    inputs = batch_inputs(tiny.processor(use_deft=False))  # padded batch
    kw = dict(GEN, cache_implementation=cache, output_scores=True, return_dict_in_generate=True)
    ours, theirs = model.generate(**inputs, **kw), stock.generate(**inputs, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
def test_a_4d_mask_passes_through_when_compression_is_off(attn):
    model, stock = _pair(attn)
    inputs = batch_inputs(tiny.processor(use_deft=False))
    mask = inputs["attention_mask"].bool()
    seq = mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    four_d = (causal & mask[:, None, :])[:, None]  # (batch, 1, seq, seq), True = attend
    four_d = four_d | torch.eye(seq, dtype=torch.bool)  # padding queries see themselves (finite rows)
    additive = torch.zeros(four_d.shape).masked_fill(~four_d, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ours = model(**dict(inputs, attention_mask=additive)).logits
        theirs = stock(**dict(inputs, attention_mask=additive)).logits
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=1e-5)


def test_a_4d_mask_with_compression_is_refused_clearly():
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor)
    seq = inputs["input_ids"].shape[1]
    with pytest.raises(
        ValueError, match=r"attention_mask of shape \(2, 1, \d+, \d+\).*2-D \(batch, sequence\)"
    ):
        model(**dict(inputs, attention_mask=torch.zeros(2, 1, seq, seq)))


@pytest.mark.parametrize("method", ["deft", "random", "tome", "recoverable"])
def test_static_cache_generates_like_the_dynamic_cache(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    model.set_attn_implementation("eager")  # eager always received the 4-D mask
    inputs = batch_inputs(processor)
    dynamic = model.generate(**inputs, **GEN)
    assert torch.equal(model.generate(**inputs, **GEN, cache_implementation="static"), dynamic)
    single = processor(images=tiny.images(2)[:1], text=[tiny.prompt(1)], return_tensors="pt")
    assert torch.equal(
        model.generate(**single, **GEN, cache_implementation="static")[0, -4:], dynamic[0, -4:]
    )


@pytest.mark.parametrize("method", ["fastv", "ficoco_l"])
def test_in_llm_methods_refuse_a_static_cache_with_a_clear_message(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    single = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
    with pytest.raises(ValueError, match=f"{method} prunes tokens inside the language model.*dynamic cache"):
        model.generate(**single, **GEN, cache_implementation="static")


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("method", ["fastv", "ficoco_l"])
def test_in_llm_methods_keeping_every_token_equal_the_uncompressed_model(method, attn):
    """Before: the layer runner's boolean mask was ADDED to the scores under eager attention (nothing masked):
    0.17 logit difference at ratio 1.0 and padded rows changed their answers."""
    settings = dict(method_settings(method), deft_retention_ratio=1.0)
    model, off = tiny.model(**settings), tiny.model(use_deft=False)
    model.set_attn_implementation(attn)
    off.set_attn_implementation(attn)
    inputs = batch_inputs(tiny.processor(**settings))
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits[valid], off(**inputs).logits[valid], rtol=0, atol=1e-5
        )
    assert torch.equal(model.generate(**inputs, **GEN), off.generate(**inputs, **GEN))


# ------------------------------------------------------------------------------------------ numerics
def test_float16_load_keeps_the_mixture_in_float32_and_scores_finite(tmp_path):
    """Before: float16 turned large mixture logits into -inf, the mixture weights and every DeFT score into NaN,
    and top-k kept arbitrary tokens (the shipped checkpoint fell from 98.4% to 53.1%)."""
    from modeling_deft_llava import DeftLlavaForConditionalGeneration

    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    with torch.no_grad():
        model.model.deft.score_mixer.mixture_logits.copy_(torch.tensor([-2.5e23, 3.1e-41, -2.1e23]))
    model.save_pretrained(tmp_path / "m")
    inputs = batch_inputs(processor)
    half = DeftLlavaForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.float16).eval()
    assert half.model.deft.score_mixer.mixture_logits.dtype == torch.float32
    assert half.model.language_model.embed_tokens.weight.dtype == torch.float16
    with torch.no_grad():
        out = half(**dict(inputs, pixel_values=inputs["pixel_values"].half()))
        reference = model(**inputs)
    assert torch.isfinite(out.compression_scores).all()
    assert {k: float(v) for k, v in out.mixture_weights.items()} == {
        k: float(v) for k, v in reference.mixture_weights.items()
    }


def test_a_float16_mixture_that_overflowed_is_refused_clearly():
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    with torch.no_grad():
        model.model.deft.score_mixer.mixture_logits.copy_(torch.tensor([-2.5e23, 0.0, -2.1e23]))
    model.half()  # a plain cast: the logits overflow to -inf
    inputs = batch_inputs(processor)
    with pytest.raises(ValueError, match="mixture_logits .* are not finite"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"].half()))


def test_non_finite_scores_never_reach_the_top_k():
    from modeling_deft_llava import DeFTModule

    deft = DeFTModule(token_dim=16, semantic_dim=8, saliency_hidden_dim=8, retention_ratio=0.5)
    tokens = torch.randn(2, 16, 16)
    gradients = torch.randn(2, 16, 16)
    gradients[1, 3, 0] = float("nan")  # refused on input, with its position
    with pytest.raises(ValueError, match=r"token_gradients contain 1 non-finite gradient\(s\).*\[\[1, 3\]\]"):
        deft(tokens=tokens, modality="image", spatial_shape=(4, 4), token_gradients=gradients)
    gradients[1, 3, 0] = 3e38  # finite, but its squared norm overflows float32: the score is NaN
    with pytest.raises(ValueError, match=r"DeFT scores are not finite \(component\(s\) \['feedback'\]"):
        deft(tokens=tokens, modality="image", spatial_shape=(4, 4), token_gradients=gradients)


# ------------------------------------------------------------------------------------- settings after load
@pytest.mark.parametrize(
    "method", ["deft", "random", "divprune", "tome", "fastv", "visionzip", "recoverable"]
)
def test_a_budget_changed_on_the_config_takes_effect_for_every_method(method):
    """Before: random/divprune/tome/fastv kept 8 of 16 after `config.deft_retention_ratio = 0.5`, DeFT still
    kept 4 and then blamed the (correct) inputs for a placeholder mismatch."""
    model = tiny.model(**method_settings(method))  # built at 0.25
    model.config.deft_retention_ratio = 0.5
    processor = tiny.processor(**dict(method_settings(method), deft_retention_ratio=0.5))
    out = model(**batch_inputs(processor))
    assert [len(k) for k in out.kept_indices] == [8, 8]


def test_other_call_time_settings_are_read_from_the_config():
    model = tiny.model(**method_settings("deft"))
    model.config.deft_group_image_neighbors = 4
    model.config.deft_alpha_var = 0.7
    model(**batch_inputs(tiny.processor(**method_settings("deft"))))
    assert model.model.deft.image_neighbors == 4 and model.model.deft.alpha_var == 0.7
    model.config.deft_group_image_neighbors = (
        5  # invalid: refused at the next call, with the config's message
    )
    with pytest.raises(ValueError, match="deft_group_image_neighbors"):
        model(**batch_inputs(tiny.processor(**method_settings("deft"))))


@pytest.mark.parametrize(
    ("key", "value"),
    [("deft_semantic_dim", 32), ("compression_method", "random"), ("deft_enable_rtd", False)],
)
def test_structural_settings_cannot_change_on_a_built_model(key, value):
    model = tiny.model(**method_settings("deft"))
    setattr(model.config, key, value)
    with pytest.raises(ValueError, match=f"config.{key} was .* and is now {value!r}.*from_pretrained"):
        model(**batch_inputs(tiny.processor(**method_settings("deft"))))


def test_use_deft_can_be_switched_off_but_not_on():
    model = tiny.model(**method_settings("deft"))
    model.config.use_deft = False
    out = model(**batch_inputs(tiny.processor(use_deft=False)))
    assert [len(k) for k in out.kept_indices] == [16, 16]
    plain = tiny.model(use_deft=False)
    plain.config.use_deft = True
    with pytest.raises(ValueError, match="config.use_deft was False .* and is now True"):
        plain(**batch_inputs(tiny.processor(**method_settings("deft"))))


# ------------------------------------------------------------------------------ a later turn reuses the cache
def _turn_two(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
    first = model.generate(**inputs, **GEN, return_dict_in_generate=True)
    follow = processor.tokenizer(" what is ?", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([first.sequences, follow], dim=1)
    from modeling_deft_llava.transformers_compat import cache_of

    return model, inputs, ids, cache_of(first)


@pytest.mark.parametrize("method", ["deft", "random", "tome", "fastv", "ficoco_l"])
def test_a_later_turn_continues_the_cached_layout(method):
    """Before: the new tokens of turn 2 were numbered from the attention mask, N - K positions too early
    (17.. instead of 29.. here), and FastV/FiCoCo-L refused the continuation (the gather index of the prefill
    was only in generate's own state)."""
    model, inputs, ids, cache = _turn_two(method)
    prompt_length = inputs["input_ids"].shape[1]
    cached = cache.get_seq_length(0)
    with torch.no_grad():
        continued = model(
            input_ids=ids[:, cached:], attention_mask=torch.ones_like(ids), past_key_values=cache
        )
        full = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=inputs["pixel_values"],
            deft_prompt_length=prompt_length,  # decide on turn 1's prompt, as the cached prefill did
            use_cache=False,
        )
    torch.testing.assert_close(continued.logits, full.logits[:, cached:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["deft", "fastv"])
def test_generate_continues_a_returned_cache(method):
    model, inputs, ids, cache = _turn_two(method)
    again = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **GEN)
    assert again.shape[1] == ids.shape[1] + GEN["max_new_tokens"]


def test_a_re_packed_cache_refuses_a_later_turn_clearly():
    from test_model import NEVER_UNCERTAIN

    settings = dict(use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="hybrid", **NEVER_UNCERTAIN)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")
    first = model.generate(**inputs, **GEN, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, torch.tensor([[7, 8]])], dim=1)
    from modeling_deft_llava.transformers_compat import cache_of

    with pytest.raises(ValueError, match="re-packed tokens .* cannot reuse it.*without past_key_values"):
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache_of(first), **GEN
        )


@pytest.mark.parametrize("method", ["fastv", "ficoco_l"])
def test_a_plain_forward_returns_a_cache_as_the_config_asks(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    from modeling_deft_llava.transformers_compat import cache_of

    out = model(**processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt"))
    assert model.config.text_config.use_cache and cache_of(out) is not None


# ----------------------------------------------------------------------------------------- output flags
@pytest.mark.parametrize("where", ["call", "config"])
@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
@pytest.mark.parametrize("method", ["off", "deft", "tome", "recoverable", "fastv", "ficoco_l"])
def test_output_flags_are_honoured_or_refused_loudly(method, flag, where):
    """Before: FastV/FiCoCo-L refused the flags on the call but silently dropped them when set in the config."""
    settings = dict(use_deft=False) if method == "off" else method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    model.set_attn_implementation("eager")  # attention weights need eager attention
    inputs = batch_inputs(processor)
    if where == "config":
        setattr(model.config, flag, True)
        setattr(model.config.text_config, flag, True)
    call = {flag: True} if where == "call" else {}
    if method in ("fastv", "ficoco_l"):
        with pytest.raises(ValueError, match=f"does not return .*{flag}"):
            model(**inputs, **call)
        return
    out = model(**inputs, **call)
    values = getattr(out, flag[len("output_") :])
    assert values is not None and len(values) == model.config.text_config.num_hidden_layers + (
        flag == "output_hidden_states"
    )
    assert isinstance(model(**inputs, **call, return_dict=False), tuple)


@pytest.mark.parametrize("method", ["recoverable", "deft_hybrid"])
def test_re_packed_methods_generate_with_renumbered_positions(method):
    """Before: with deft_keep_original_positions=False a re-packed cache recorded no next position, so its own
    decoding steps were refused as a 'later turn' (found by the renumbered-positions benchmark)."""
    from test_feature_space import renumbered_repacking_model

    model, processor = renumbered_repacking_model(method)
    inputs = batch_inputs(processor)
    cached = model.generate(**inputs, **GEN)
    assert torch.equal(cached, model.generate(**inputs, **GEN, use_cache=False))
