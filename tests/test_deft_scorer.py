"""DeFT's question- and position-aware scorer, the ranking loss and the coverage selection (issue 23).

The seed's behaviour stays the default (`DeftSettings`); `DEFT_RECIPE` turns the new pieces on.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.configuration.deft_settings import DEFAULTS, DEFT_RECIPE

from modeling_deft_llava import DeftLlavaConfig, DeFTModule
from modeling_deft_llava.compressors.compression_method import PromptBatch
from modeling_deft_llava.deft.question_conditioning import grid_position_features
from modeling_deft_llava.deft.ranking_loss import ranking_loss
from modeling_deft_llava.deft.topk_selector import select_topk, select_with_coverage

RECIPE_MODULE = dict(question_aware=True, position_aware=True, ranking_loss="listnet")


def module(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DeFTModule(token_dim=32, semantic_dim=16, saliency_hidden_dim=8, retention_ratio=0.25, **kwargs)


def perturb(m, seed=1):
    """Give the zero-initialised output layers of the question and position inputs some weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m.question_encoder.film, m.position_encoding.proj):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.5)


def test_defaults_are_the_seed():
    assert (DEFAULTS.deft_question_aware, DEFAULTS.deft_position_aware, DEFAULTS.deft_ranking_loss) == (
        False,
        False,
        "mse",
    )
    assert DEFAULTS.deft_coverage_weight == 0.0
    m = module()
    assert m.question_encoder is None and m.position_encoding is None
    assert not any(k.startswith(("question_encoder", "position_encoding")) for k in m.state_dict())


def test_untrained_new_inputs_score_exactly_as_the_seed():
    """Zero-initialised output layers: a recipe module scores as the seed module with the same weights."""
    seed_module, recipe = module(), module(**RECIPE_MODULE)
    recipe.load_state_dict(seed_module.state_dict(), strict=False)
    tokens = torch.randn(2, 16, 32)
    question = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    a = seed_module(tokens=tokens, spatial_shape=(4, 4))
    b = recipe(tokens=tokens, spatial_shape=(4, 4), question_embeds=question, question_mask=mask)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.kept_indices, b.kept_indices)


def test_question_changes_the_scores_and_a_row_without_question_reads_none():
    m = module(**RECIPE_MODULE)
    perturb(m)
    tokens = torch.randn(1, 16, 32).expand(3, -1, -1)
    question = torch.randn(3, 4, 32)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = m(tokens=tokens, spatial_shape=(4, 4), question_embeds=question, question_mask=mask)
    assert not torch.allclose(out.scores[0], out.scores[1])
    no_question = m(tokens=tokens[:1], spatial_shape=(4, 4))
    torch.testing.assert_close(out.scores[2:], no_question.scores)  # an empty question = no question
    # padding of the question changes nothing
    padded = torch.cat([question[1:2, :2], torch.randn(1, 3, 32)], dim=1)
    pad_mask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    alone = m(tokens=tokens[:1], spatial_shape=(4, 4), question_embeds=padded, question_mask=pad_mask)
    torch.testing.assert_close(alone.scores, out.scores[1:2])


def test_question_word_order_matters():
    """`[e_t ; e_{t-1}]`: "row 2 column 3" and "row 3 column 2" hold the same words and score differently."""
    m = module(**RECIPE_MODULE)
    perturb(m)
    words = torch.randn(4, 32)  # row, column, 2, 3
    a = torch.stack([words[0], words[2], words[1], words[3]])
    b = torch.stack([words[0], words[3], words[1], words[2]])
    tokens = torch.randn(1, 16, 32).expand(2, -1, -1)
    out = m(
        tokens=tokens,
        spatial_shape=(4, 4),
        question_embeds=torch.stack([a, b]),
        question_mask=torch.ones(2, 4, dtype=torch.bool),
    )
    assert not torch.allclose(out.scores[0], out.scores[1])


def test_position_features_are_resolution_free_and_repeat_per_frame():
    f = grid_position_features((4, 4), 32, "cpu")  # two frames of 4x4
    assert f.shape == (32, 24)
    assert not torch.allclose(f[:16], f[16:])  # the frame is encoded
    assert not torch.allclose(f[0], f[5])
    # normalised coordinates: the centre cell of a 3x3 grid and of a 5x5 grid get the same features
    torch.testing.assert_close(
        grid_position_features((3, 3), 9, "cpu")[4], grid_position_features((5, 5), 25, "cpu")[12]
    )
    with pytest.raises(ValueError, match="whole number of 4x4 grids"):
        grid_position_features((4, 4), 20, "cpu")
    m = module(position_aware=True)
    perturb_proj = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.position_encoding.proj.weight.copy_(
            torch.randn(m.position_encoding.proj.weight.shape, generator=perturb_proj)
        )
    video = m(tokens=torch.randn(1, 32, 32), modality="video", spatial_shape=(4, 4))
    text = m(tokens=torch.randn(1, 7, 32), modality="text")  # no grid: no position features, no error
    assert video.kept_indices.shape == (1, 8) and text.kept_indices.shape == (1, 2)


def test_bad_question_inputs_are_named():
    m = module(**RECIPE_MODULE)
    tokens = torch.randn(2, 16, 32)
    with pytest.raises(ValueError, match="question_embeds must be a"):
        m(tokens=tokens, spatial_shape=(4, 4), question_embeds=torch.randn(2, 32), question_mask=None)
    with pytest.raises(ValueError, match=r"batch_size=2, T, token_dim=32"):
        m(tokens=tokens, spatial_shape=(4, 4), question_embeds=torch.randn(2, 3, 8), question_mask=None)
    with pytest.raises(ValueError, match="question_mask must be a bool tensor of shape"):
        m(
            tokens=tokens,
            spatial_shape=(4, 4),
            question_embeds=torch.randn(2, 3, 32),
            question_mask=torch.ones(2, 3),
        )


# ------------------------------------------------------------------------------------------- ranking loss
def test_listnet_prefers_the_target_ranking_and_ignores_padding():
    target = torch.tensor([[1.0, 0.5, 0.0, 0.2]])
    good = torch.tensor([[3.0, 2.0, 0.0, 1.0]])
    bad = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    for kind in ("mse", "listnet"):
        assert ranking_loss(good, target, None, kind) < ranking_loss(bad, target, None, kind)
    mask = torch.tensor([[True, True, True, False]])
    a = ranking_loss(torch.tensor([[3.0, 2.0, 0.0, -5.0]]), target, mask, "listnet")
    b = ranking_loss(torch.tensor([[3.0, 2.0, 0.0, 99.0]]), target, mask, "listnet")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="ranking loss must be one of"):
        ranking_loss(good, target, None, "pairwise")


def test_feedback_loss_uses_the_ranking_loss_setting():
    tokens = torch.randn(2, 16, 32)
    grads = torch.randn(2, 16, 32)
    losses = {}
    for kind in ("mse", "listnet"):
        m = module(ranking_loss=kind)
        losses[kind] = m(tokens=tokens, spatial_shape=(4, 4), token_gradients=grads).feedback_loss
    assert losses["mse"] < 1.0 < losses["listnet"]  # listnet: a cross-entropy over 16 tokens (>= entropy)


# ------------------------------------------------------------------------------------------- coverage
def test_coverage_zero_is_topk_and_coverage_avoids_duplicates():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 16, generator=g)
    semantic = torch.randn(3, 16, 8, generator=g)
    a = select_topk(scores, 0.25)
    b = select_with_coverage(scores, semantic, 0.25, 0.0)
    assert torch.equal(a[0], b[0]) and bool(b[1].all())
    # tokens 0 and 1 are the same vector with the two best scores: coverage keeps one of them
    semantic[:, 1] = semantic[:, 0]
    scores[:, :2] = torch.tensor([1.0, 0.99])
    kept, _ = select_with_coverage(scores, semantic, 0.25, 0.5)
    assert not ((kept == 0).any(1) & (kept == 1).any(1)).any()
    # padding is never kept and short rows mark their unused slots
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[0, 4:] = False
    kept, kept_mask = select_with_coverage(scores, semantic, 0.25, 0.3, mask)
    assert kept_mask[0].sum() == 1 and kept[0][kept_mask[0]].lt(4).all() and kept_mask[1:].all()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(deft_ranking_loss="pairwise"), "deft_ranking_loss must be one of"),
        (dict(deft_ranking_temperature=0.0), "deft_ranking_temperature must be a finite number > 0"),
        (dict(deft_coverage_weight=1.0), r"deft_coverage_weight must be in \[0, 1\)"),
        (dict(deft_question_aware=1), "deft_question_aware must be True or False"),
    ],
)
def test_bad_settings_are_named(settings, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DeftLlavaConfig(**settings)


# ------------------------------------------------------------------------------------------- in the model
def test_prompt_questions_read_text_before_and_after_the_image():
    """The question of an image is its row's prompt text on either side (before: read nothing)."""
    seq = 8
    placeholders = torch.zeros(2, seq, dtype=torch.bool)
    placeholders[0, 4:6] = True  # question before the image
    placeholders[1, 1:3] = True  # question after it
    text = ~placeholders
    text[:, 0] = False  # padding
    prompt = PromptBatch(torch.zeros(2, seq, 4), placeholders, text, prompt_length=7)
    row, question = prompt.questions(2)
    assert row.tolist() == [0, 1]
    assert question[0].tolist() == [False, True, True, True, False, False, True, False]
    assert question[1].tolist() == [False, False, False, True, True, True, True, False]


def recipe_model(**extra):
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25, **DEFT_RECIPE, **extra)
    perturb(model.model.deft, seed=3)
    return model


def test_question_aware_model_selects_by_question_wherever_it_stands():
    model = recipe_model()
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    image = tiny.images(1)
    kept = {}
    for question in ("what is in the picture ?", "a cat and a dog"):
        for before in (True, False):
            text = f"USER: {question} <image>\n ASSISTANT:" if before else tiny.prompt(1, question)
            inputs = processor(images=image, text=[text], return_tensors="pt")
            with torch.no_grad():
                kept[question, before] = model(**inputs).compression_scores[0]
    for before in (True, False):  # the question was read on either side of the image
        assert not torch.allclose(kept["what is in the picture ?", before], kept["a cat and a dog", before])


def test_training_never_reads_the_answer_as_the_question():
    """A training forward (prompt + answer, labels on the answer) keeps what the generation prefill keeps."""
    model = recipe_model()
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    image = tiny.images(1)
    prompt = tiny.prompt(1, "what is in the picture ?")
    full = processor(images=image, text=[prompt + " a cat"], return_tensors="pt")
    labels = full["input_ids"].clone()
    labels[:, :-2] = -100
    with torch.no_grad():
        trained = model(**full, labels=labels).compression_scores
        prefill = model(**processor(images=image, text=[prompt], return_tensors="pt")).compression_scores
        unlabelled = model(**full).compression_scores  # without labels the answer words are read as text
    torch.testing.assert_close(trained, prefill)
    assert not torch.allclose(unlabelled, prefill)  # the test can tell them apart


def test_question_aware_generate_equals_full_recompute():
    from test_model import greedy_full_recompute

    model = recipe_model()
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    inputs = processor(
        images=tiny.images(2),
        text=[tiny.prompt(1, "what is in the picture ?"), tiny.prompt(1, "a dog")],
        return_tensors="pt",
        padding=True,
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[4, 5])
    assert torch.equal(out, greedy_full_recompute(model, inputs, 4))


def test_question_aware_beam_search_equals_each_sample_alone():
    """Beam search expands the N rows that wait for the question by the K placeholders each image fills (the
    expansion grouped them by their N rows before, and no image reached the prefill)."""
    model = recipe_model()
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    prompts = [tiny.prompt(1, "what is in the picture ?"), tiny.prompt(1, "a dog")]
    images = tiny.images(2)
    beams = dict(
        max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, suppress_tokens=[4, 5]
    )
    out = model.generate(**processor(images=images, text=prompts, return_tensors="pt", padding=True), **beams)
    for i in range(2):
        alone = model.generate(
            **processor(images=[images[i]], text=[prompts[i]], return_tensors="pt"), **beams
        )
        assert torch.equal(alone[:, -3:], out[2 * i : 2 * i + 2, -3:])


def test_vllm_refuses_question_aware_with_the_way_out():
    pytest.importorskip("vllm")
    from modeling_deft_llava.serving.vllm_model import serving_refusal

    message = serving_refusal(tiny.config(use_deft=True, deft_retention_ratio=0.25, **DEFT_RECIPE))
    assert "deft_question_aware" in message and "hf_overrides={'deft_question_aware': False}" in message
    assert serving_refusal(tiny.config(use_deft=True, deft_retention_ratio=0.25)) is None
