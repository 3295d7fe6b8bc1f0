"""A long text context compressed inside the model (`text_context.py`, `deft_text_retention_ratio`, issue 16).

The context is marked `<context> ... </context>` (a chat-template item `{"type": "context", "text": ...}`); DeFT
keeps `deft_text_retention_ratio` of each sample's context tokens; the question, the template and the markers'
neighbours are never dropped; kept tokens keep their original positions; the markers never reach the model."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from modeling_deft_llava.configuration import num_kept_tokens
from modeling_deft_llava.processing.word_tokenizer import build_word_tokenizer

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration

WORDS = tiny.WORDS + ["fact", "red", "blue", "green", "x", "y", "z"]
TOKENIZER = build_word_tokenizer(WORDS, context=True)
START, END = TOKENIZER.convert_tokens_to_ids("<context>"), TOKENIZER.convert_tokens_to_ids("</context>")
MARKERS = dict(context_start_token_index=START, context_end_token_index=END)
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[4, 5, START, END])
TEXT = dict(use_deft=True, deft_retention_ratio=0.25, deft_text_retention_ratio=0.5)
CONTEXTS = ("fact red x fact blue y fact green z a dog and a cat", "red blue green")
QUESTIONS = ("what is x ?", "what is in the picture ?")


def model(seed=0, markers=True, **settings) -> DeftLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = tiny.config(
        text_config=tiny.text_config(len(TOKENIZER)), **(MARKERS if markers else {}), **settings
    )
    return DeftLlavaForConditionalGeneration(cfg).eval()


def processor(**settings):
    settings = {
        k: v for k, v in settings.items() if k in ("use_deft", "deft_retention_ratio", "compression_method")
    }
    return tiny.processor(tokenizer=TOKENIZER, **settings)


def conversation(context, question, image=True):
    content = [{"type": "image"}] if image else []
    content += [{"type": "context", "text": context}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def inputs_for(proc, contexts=CONTEXTS, questions=QUESTIONS, image=True, marked=True):
    """A padded batch; `marked=False`: the same tokens without the two markers (left padding again)."""
    texts = [
        proc.apply_chat_template(conversation(c, q, image), add_generation_prompt=True)
        for c, q in zip(contexts, questions)
    ]
    images = tiny.images(len(texts)) if image else None
    inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
    if not marked:
        ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
        rows = [row[keep] for row, keep in zip(ids, valid & (ids != START) & (ids != END))]
        width = max(len(r) for r in rows)
        inputs["input_ids"] = torch.stack([F.pad(r, (width - len(r), 0)) for r in rows])
        inputs["attention_mask"] = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    return inputs


def greedy_full_recompute(model, inputs, steps):
    """Reference decoding: every step re-runs the whole forward (context compressed again), no cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
            logits[:, GEN["suppress_tokens"]] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def context_mask(input_ids):
    """`(batch, seq)` bool, the tokens between the markers (markers excluded)."""
    depth = (input_ids == START).long().cumsum(1) - (input_ids == END).long().cumsum(1)
    return (depth == 1) & (input_ids != START)


@pytest.fixture(scope="module")
def deft():
    return model(**TEXT), processor(**TEXT)


# ------------------------------------------------------------------------------------------ the template
def test_apply_chat_template_wraps_the_context_in_markers():
    text = processor().apply_chat_template(
        conversation("a dog", "what ?", image=False), add_generation_prompt=True
    )
    assert text == "USER: <context>a dog</context>what ? ASSISTANT:"


# ------------------------------------------------------------------------------------------ what is dropped
@pytest.mark.parametrize("image", [True, False])
def test_context_tokens_are_dropped_to_the_budget_and_nothing_else(deft, image):
    model, proc = deft
    inputs = inputs_for(proc, image=image)
    with torch.no_grad():
        out = model(**inputs)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    context = context_mask(ids) & valid
    markers = (ids == START) | (ids == END)
    for b in range(ids.shape[0]):
        seen = out.deft_gather_index[b][out.deft_gather_index[b] >= 0]  # input positions the model saw
        n = int(context[b].sum())
        kept = out.text_kept_indices[b]
        assert len(kept) == num_kept_tokens(n, TEXT["deft_text_retention_ratio"])
        assert bool(context[b, kept].all())
        # everything outside the context (template, question, image rows) is seen; markers never are
        outside = (valid[b] & ~context[b] & ~markers[b]).nonzero().flatten()
        assert torch.equal(seen, torch.cat([outside, kept]).sort().values)


def test_positions_are_the_original_ones(deft):
    """Each seen token sits where the unmarked prompt (all context tokens, no markers) puts it."""
    model, proc = deft
    inputs = inputs_for(proc, image=False)
    with torch.no_grad():
        out = model(**inputs)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    markers = (ids == START) | (ids == END)
    counted = valid & ~markers
    expected = counted.long().cumsum(1) - 1  # (batch, seq): position in the unmarked prompt
    for b in range(ids.shape[0]):
        index = out.deft_gather_index[b]
        real = index >= 0
        assert torch.equal(out.deft_position_ids[b][real], expected[b, index[real]])
    # the question resumes after the FULL context: its last token sits at the unmarked prompt's last position
    assert torch.equal(out.deft_position_ids[:, -1], counted.sum(1) - 1)


# ------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize(
    "settings",
    [
        dict(use_deft=True, deft_retention_ratio=0.25),  # DeFT, text compression off
        dict(use_deft=True, deft_retention_ratio=0.25, compression_method="random"),  # a baseline
        dict(use_deft=False),
    ],
    ids=["deft-text-off", "random", "use_deft-off"],
)
def test_a_context_kept_whole_equals_the_unmarked_prompt(settings):
    """The markers are invisible: same logits and generations as the same prompt without them."""
    ours, proc = model(**settings), processor(**settings)
    marked, plain = inputs_for(proc), inputs_for(proc, marked=False)
    torch.manual_seed(1)  # `random` draws its tokens
    with torch.no_grad():
        out = ours(**marked)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = ours(**plain)
    seen = out.deft_attention_mask.bool()
    torch.testing.assert_close(
        out.logits[seen], ref.logits[plain["attention_mask"].bool()], rtol=1e-5, atol=1e-5
    )
    torch.manual_seed(1)
    a = ours.generate(**marked, **GEN)[:, -4:]
    torch.manual_seed(1)
    assert torch.equal(a, ours.generate(**plain, **GEN)[:, -4:])


def test_text_compression_off_or_unmarked_input_gives_todays_logits():
    """Without markers in the input, the context settings change nothing (today's model, same weights)."""
    today = model(markers=False, use_deft=True, deft_retention_ratio=0.25)
    text_on = model(**TEXT)
    proc = processor(**TEXT)
    inputs = inputs_for(proc, marked=False)
    with torch.no_grad():
        assert torch.equal(text_on(**inputs).logits, today(**inputs).logits)


# ------------------------------------------------------------------------------------------ generation
def test_cached_generate_equals_a_full_recompute(deft):
    model, proc = deft
    for image in (True, False):
        inputs = inputs_for(proc, image=image)
        cached = model.generate(**inputs, **GEN)
        assert torch.equal(cached, model.generate(**inputs, **GEN, use_cache=False))
        assert torch.equal(cached, greedy_full_recompute(model, inputs, 4))
        assert torch.equal(cached, model.generate(**inputs, **GEN, cache_implementation="static"))


def test_batch_rows_equal_single_runs(deft):
    model, proc = deft
    batch = inputs_for(proc)
    together = model.generate(**batch, **GEN)[:, -4:]
    with torch.no_grad():
        out = model(**batch)
    padding = batch["input_ids"].shape[1] - batch["attention_mask"].sum(1)  # (batch,) left padding
    for b in range(2):
        single = inputs_for(proc, CONTEXTS[b : b + 1], QUESTIONS[b : b + 1])
        single["pixel_values"] = batch["pixel_values"][b : b + 1]
        assert torch.equal(model.generate(**single, **GEN)[0, -4:], together[b])
        with torch.no_grad():
            alone = model(**single)
        assert torch.equal(out.text_kept_indices[b] - padding[b], alone.text_kept_indices[0])


def test_beam_search_and_sampling_run(deft):
    model, proc = deft
    inputs = inputs_for(proc)
    beams = model.generate(**inputs, **dict(GEN, num_beams=3, num_return_sequences=2))
    assert beams.shape[0] == 4
    torch.manual_seed(0)
    sampled = model.generate(**inputs, **dict(GEN, do_sample=True, top_k=5))
    assert sampled.shape[0] == 2


# ------------------------------------------------------------------------------------------ training
def test_training_labels_follow_the_repacked_layout_and_reach_deft():
    trained = model(**TEXT).train()
    inputs = inputs_for(processor(**TEXT))
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    out = trained(**inputs, labels=labels)
    index = out.deft_gather_index
    assert index is not None
    repacked = labels.gather(1, index.clamp(min=0)).masked_fill(index < 0, -100)
    assert not bool(((repacked == START) | (repacked == END)).any())  # markers left the labels too
    shift_logits, shift_labels = out.logits[:, :-1], repacked[:, 1:]
    expected = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected)  # `loss` adds the visual RTD loss in training
    out.loss.backward()
    grad = trained.model.deft.semantic_abstraction.fc1.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)  # the straight-through gate reaches SAM


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_a_clear_value_error(deft):
    ours, proc = deft
    bad = TOKENIZER(["USER: <context>a dog what ? ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"sample 0 of input_ids has a <context> that is never closed"):
        ours(**bad)
    bad = TOKENIZER(["USER: a </context> <context>dog</context> ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"sample 0 .* a </context> without an opening <context>"):
        ours(**bad)
    with pytest.raises(ValueError, match=r"deft_text_retention_ratio must be in \(0, 1\], got 1.5"):
        DeftLlavaConfig(**MARKERS, deft_text_retention_ratio=1.5)
    with pytest.raises(
        ValueError, match=r"deft_text_retention_ratio=0.5: compression_method='random' does not"
    ):
        tiny.config(**MARKERS, use_deft=True, compression_method="random", deft_text_retention_ratio=0.5)
    with pytest.raises(
        ValueError, match=r"deft_text_retention_ratio=0.5 compresses .* context_start_token_index"
    ):
        tiny.config(use_deft=True, deft_text_retention_ratio=0.5)
    with pytest.raises(ValueError, match=r"context_start_token_index=12 and context_end_token_index=None"):
        tiny.config(context_start_token_index=12)
    with pytest.raises(ValueError, match=r"context_start_token_index=4 is also image_token_index"):
        tiny.config(context_start_token_index=4, context_end_token_index=END)
    with pytest.raises(ValueError, match=r"needs context markers in the tokenizer"):
        tiny.processor().apply_chat_template(conversation("a", "b"))
    with pytest.raises(ValueError, match=r"a context item needs a str 'text'"):
        proc.apply_chat_template(conversation(None, "b"))


def test_fastv_refuses_a_context():
    fastv = model(
        use_deft=True,
        deft_retention_ratio=0.25,
        compression_method="fastv",
        compression_settings={"fastv_layer": 1},
    )
    inputs = inputs_for(processor(use_deft=True, deft_retention_ratio=0.25, compression_method="fastv"))
    with pytest.raises(ValueError, match=r"'fastv' runs the decoder layers on the input layout"):
        fastv(**inputs)


def test_a_context_in_a_call_that_continues_a_cache_is_refused(deft):
    ours, proc = deft
    inputs = inputs_for(proc, CONTEXTS[:1], QUESTIONS[:1], image=False)
    with torch.no_grad():
        out = ours(**inputs, use_cache=True)
    later = TOKENIZER(["<context>red</context>what ?"], return_tensors="pt")["input_ids"]
    mask = torch.ones(1, inputs["input_ids"].shape[1] + later.shape[1], dtype=torch.long)
    with pytest.raises(ValueError, match=r"context markers .* continues a cache"):
        ours(input_ids=later, past_key_values=out.past_key_values, attention_mask=mask)


def test_pipeline_takes_a_context_item(deft):
    from transformers import pipeline

    ours, proc = deft
    image = tiny.images(1)[0]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                *conversation(CONTEXTS[0], QUESTIONS[0], False)[0]["content"],
            ],
        }
    ]
    answer = pipeline("image-text-to-text", model=ours, processor=proc)(
        text=messages, generate_kwargs=dict(GEN)
    )[0]["generated_text"][-1]["content"]
    inputs = proc(
        images=[image],
        text=[proc.apply_chat_template(conversation(CONTEXTS[0], QUESTIONS[0]), add_generation_prompt=True)],
        return_tensors="pt",
    )
    new = ours.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :]
    assert answer.strip() == TOKENIZER.decode(new, skip_special_tokens=True).strip()


def test_generated_text_never_holds_a_context_marker(deft):
    """A model whose head prefers a marker: `generate` keeps the markers out by default (it stopped with "input_ids
    hold context markers ... continues a cache" at the second step); a call's own `suppress_tokens` is kept."""
    model, proc = deft
    inputs = inputs_for(proc)
    with torch.no_grad():
        original = model.lm_head.weight.clone()
        model.lm_head.weight[START] += 100 * model.lm_head.weight.abs().max()  # the marker wins every argmax
    try:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        assert not ((new == START) | (new == END)).any()
        with pytest.raises(ValueError, match="continues a cache"):  # the caller's own list is respected
            model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[4, 5])
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(original)
