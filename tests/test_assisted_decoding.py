"""Assisted (`assistant_model=`) and prompt-lookup (`prompt_lookup_num_tokens=`) decoding equal plain greedy
decoding, with compression off (and stock LLaVA's own result) and for every method (issue 25).

Their first forward is the prefill over the prompt and the first drafts; after every verification `generate`
crops the drafts it rejected from the cache. Before: the positions (and the re-packed mask) the model handed back
to `generate` were never cut back with the cache, so every pass after a rejected draft ran at positions too far
(logits off by up to 0.33 here), prompt-dependent methods read the drafts as part of the prompt (FastV's ranking
query), and re-packing methods (Recoverable, CDPruner, DeFT `hybrid`/`adaptive`, a `<context>`) were refused
with a message about a later turn."""

from __future__ import annotations

import pytest
import test_text_context as ctx
import tiny
import torch
from modeling_deft_llava.configuration.deft_settings import DEFT_RECIPE
from test_model import ALWAYS_UNCERTAIN
from test_model_methods import METHODS, method_settings

from modeling_deft_llava.token_layout import read_cache_state

GEN = dict(
    max_new_tokens=8,
    do_sample=False,
    suppress_tokens=[4, 5],
    output_scores=True,
    return_dict_in_generate=True,
)


def draft_model(like):
    """A draft model that disagrees with `like` now and then (other weights, same config)."""
    torch.manual_seed(1)
    return type(like)(like.config).eval()


def assert_same(result, plain):
    assert torch.equal(result.sequences, plain.sequences)
    for a, b in zip(result.scores, plain.scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=1e-6)


def single(processor):
    return processor(images=tiny.images(1), text=[tiny.prompt(1)], return_tensors="pt")


@pytest.mark.parametrize("how", ["assistant", "lookup"])
def test_compression_off_equals_plain_greedy_and_stock(how):
    model = tiny.model(use_deft=False)
    stock = tiny.stock_twin(model)
    inputs = single(tiny.processor(use_deft=False))
    plain = model.generate(**inputs, **GEN)
    assert_same(stock.generate(**inputs, **GEN), plain)
    extra = (
        dict(assistant_model=draft_model(model)) if how == "assistant" else dict(prompt_lookup_num_tokens=3)
    )
    assert_same(model.generate(**inputs, **GEN, **extra), plain)


SETTINGS = {m: method_settings(m) for m in METHODS}
SETTINGS["deft_hybrid"] = dict(method_settings("deft"), deft_inference_mode="hybrid")
SETTINGS["deft_adaptive"] = dict(method_settings("deft"), deft_inference_mode="adaptive", **ALWAYS_UNCERTAIN)
SETTINGS["deft_recipe"] = dict(
    method_settings("deft"), **DEFT_RECIPE
)  # question-aware: selects with the prompt


@pytest.mark.parametrize("how", ["assistant", "lookup"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_method_equals_plain_greedy(name, how):
    settings = SETTINGS[name]
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    if (
        name == "deft_recipe"
    ):  # give the zero-started question input weight, so the question changes the choice
        with torch.no_grad():
            film = model.model.deft.question_encoder.film
            film.weight.copy_(torch.randn(film.weight.shape, generator=torch.Generator().manual_seed(3)))
    inputs = single(processor)
    plain = model.generate(**inputs, **GEN)
    extra = (
        dict(assistant_model=draft_model(model)) if how == "assistant" else dict(prompt_lookup_num_tokens=3)
    )
    assert_same(model.generate(**inputs, **GEN, **extra), plain)


def verification_passes(model, inputs, **generate_kwargs) -> list[tuple[int, list[int]]]:
    """`(cached tokens, position ids)` of every language-model pass of one `generate` call."""
    seen = []
    original = model.model.language_model.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        held = cache.get_seq_length() if cache is not None else 0
        seen.append((held, kwargs["position_ids"][0].tolist()))
        return original(*args, **kwargs)

    model.model.language_model.forward = spy
    try:
        model.generate(**inputs, **generate_kwargs)
    finally:
        del model.model.language_model.forward
    return seen


@pytest.mark.parametrize("sample", [False, True])
def test_drafts_were_rejected_and_positions_followed_the_cache(sample):
    """The tests above mean something: drafts were rejected, and each verification pass starts at the next
    cached position (a prefill that kept 4 of 16 patches: cached tokens + 12). Sampling too (fixed seed)."""
    settings = method_settings("uniform")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    draft = draft_model(model)
    torch.manual_seed(1)  # a seed whose sampled run rejects a draft
    seen = verification_passes(
        model,
        single(processor),
        max_new_tokens=8,
        do_sample=sample,
        suppress_tokens=[4, 5],
        assistant_model=draft,
    )
    prefill_positions = seen[0][1]
    gap = prefill_positions[-1] + 1 - len(prefill_positions)  # the pruned patches' gap
    assert gap == tiny.NUM_PATCHES - 4
    for held, positions in seen[1:]:
        assert positions == list(range(held + gap, held + gap + len(positions)))
    rejected = sum(held + len(p) - held_next for (held, p), (held_next, _) in zip(seen, seen[1:]))
    assert rejected > 0


def test_a_text_context_equals_plain_greedy():
    """Before: refused as "a later turn cannot reuse it ... without past_key_values" in a single call."""
    model, proc = ctx.model(**ctx.TEXT), ctx.processor(**ctx.TEXT)
    inputs = ctx.inputs_for(proc, contexts=ctx.CONTEXTS[:1], questions=ctx.QUESTIONS[:1])
    gen = dict(GEN, suppress_tokens=ctx.GEN["suppress_tokens"])
    plain = model.generate(**inputs, **gen)
    assert_same(model.generate(**inputs, **gen, prompt_lookup_num_tokens=3), plain)
    # the draft reads the markers as plain tokens: a draft with a compressed context would hold a re-packed cache,
    # which transformers' draft-model loop crops by token count
    draft = ctx.model(seed=1, markers=False, use_deft=True, deft_retention_ratio=0.25)
    assert_same(model.generate(**inputs, **gen, assistant_model=draft), plain)


def test_a_later_turn_on_a_repacked_cache_is_refused_naming_the_positions():
    """The refusal that remains (a re-packed cache continued with positions that do not follow it) says which
    positions were given and which were expected."""
    settings = method_settings("recoverable")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = single(processor)
    out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    assert read_cache_state(cache)["repacked"]
    seq = inputs["input_ids"].shape[1]
    with pytest.raises(
        ValueError, match=r"position ids \[\[\d+\]\] do not continue it \(the next positions are"
    ):
        model(
            input_ids=torch.tensor([[9]]),
            attention_mask=torch.ones(1, seq + 1, dtype=torch.long),
            position_ids=torch.tensor([[seq + 3]]),  # not where the cache ends
            past_key_values=cache,
        )


@pytest.mark.parametrize("method", ["uniform", "fastv", "recoverable"])
def test_beam_search_with_a_draft_model_equals_beam_search(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = single(processor)
    beams = dict(max_new_tokens=6, num_beams=2, do_sample=False, suppress_tokens=[4, 5])
    plain = model.generate(**inputs, **beams)
    assert torch.equal(model.generate(**inputs, **beams, assistant_model=draft_model(model)), plain)
    assert torch.equal(model.generate(**inputs, **beams, prompt_lookup_num_tokens=3), plain)


def test_sampling_with_a_draft_model_equals_stock_when_off():
    model = tiny.model(use_deft=False)
    stock = tiny.stock_twin(model)
    inputs = single(tiny.processor(use_deft=False))
    sample = dict(max_new_tokens=8, do_sample=True, suppress_tokens=[4, 5])
    draft = draft_model(model)
    stock_draft = tiny.stock_twin(draft)
    torch.manual_seed(1)
    ours = model.generate(**inputs, **sample, assistant_model=draft)
    torch.manual_seed(1)
    theirs = stock.generate(**inputs, **sample, assistant_model=stock_draft)
    assert torch.equal(ours, theirs)
