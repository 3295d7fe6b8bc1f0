"""DeFT-LLaVA-NeXT (issue 27): stock equivalence with compression off, AnyRes budget semantics (per image or per
view, the image_newline setting, original positions), DeFT's group score inside each view, batch rows equal
single runs, cached equals uncached, refusals, Auto classes and save/load. Tiny random models, CPU, seconds."""

from __future__ import annotations

import pytest
import tiny_next as T
import torch
from modeling_deft_llava.commands.convert import convert
from modeling_deft_llava.configuration.anyres_settings import AnyResLayout
from modeling_deft_llava.configuration.deft_settings import DEFT_RECIPE, num_kept_tokens
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextForConditionalGeneration,
)

from modeling_deft_llava import DeftLlavaNextConfig, DeftLlavaNextForConditionalGeneration
from modeling_deft_llava.deft.group_scorer import group_scores

GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[4])  # never emit <image>
FEATURE_METHODS = ["deft", "random", "uniform", "divprune", "cdpruner"]
QUARTER = dict(use_deft=True, deft_retention_ratio=0.25)


def on(method="deft", **overrides):
    settings = {**QUARTER, "compression_method": method, **overrides}
    return T.model(**settings), T.processor(**settings)


# ----------------------------------------------------------------------------- compression off = stock
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_compression_off_equals_stock_llava_next(attention):
    model = T.model(use_deft=False)
    stock = T.stock_twin(model)
    model.set_attn_implementation(attention)
    stock.set_attn_implementation(attention)
    stock_processor, processor = T.processor(stock=True), T.processor()
    for sizes in ([s] for s in T.SIZES):
        ours, theirs = T.inputs(processor, sizes), T.inputs(stock_processor, sizes)
        assert torch.equal(ours["input_ids"], theirs["input_ids"]), sizes  # the stock placeholder count
        with torch.no_grad():
            torch.testing.assert_close(model(**ours).logits, stock(**theirs).logits, rtol=0, atol=0)
    batch = T.inputs(processor, T.SIZES[:3])  # three sizes, three N, one batch
    for cache in ("dynamic", "static"):
        ours = model.generate(**batch, **GEN, cache_implementation=cache)
        assert torch.equal(ours, stock.generate(**batch, **GEN, cache_implementation=cache)), cache
    flags = dict(output_hidden_states=True, output_attentions=attention == "eager")
    with torch.no_grad():
        a, b = model(**batch, **flags), stock(**batch, **flags)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(x, y)
    if attention == "eager":
        for x, y in zip(a.attentions, b.attentions):
            assert torch.equal(x, y)
    # a second generate on the returned cache
    first = model.generate(**batch, **GEN, return_dict_in_generate=True)
    first_stock = stock.generate(**batch, **GEN, return_dict_in_generate=True)
    follow = dict(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences))
    mask = torch.cat(
        [batch["attention_mask"], torch.ones_like(first.sequences[:, batch["input_ids"].shape[1] :])], 1
    )
    follow["attention_mask"] = mask
    again = model.generate(**follow, past_key_values=first.past_key_values, **GEN)
    again_stock = stock.generate(
        input_ids=first_stock.sequences,
        attention_mask=mask,
        past_key_values=first_stock.past_key_values,
        **GEN,
    )
    assert torch.equal(again, again_stock)


def test_is_a_llava_next_model_with_its_own_model_type():
    model = T.model(use_deft=False)
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert model.config.model_type == "deft_llava_next"
    config = AutoConfig.for_model("deft_llava_next", **T.stock_fields())
    assert isinstance(config, DeftLlavaNextConfig)
    assert type(AutoModelForImageTextToText.from_config(config)) is DeftLlavaNextForConditionalGeneration


# ----------------------------------------------------------------------------- budget semantics
def test_layout_counts_follow_the_budget_and_newline_settings():
    layout = AnyResLayout((4, 4), (4, 8))  # 16 base + 32 grid + 4 newlines
    assert layout.num_tokens == 52
    assert layout.newline_indices() == [24, 33, 42, 51]
    assert layout.count(0.25, "image", "keep") == num_kept_tokens(48, 0.25) + 4 == 16
    assert layout.count(0.25, "view", "keep") == num_kept_tokens(16, 0.25) + num_kept_tokens(32, 0.25) + 4
    assert layout.count(0.25, "image", "compress") == num_kept_tokens(52, 0.25) == 13
    assert layout.count(0.25, "view", "compress") == num_kept_tokens(16, 0.25) + num_kept_tokens(36, 0.25)
    sets, always = layout.token_sets("image", "compress")
    assert always == [] and sets[0][1] == ((4, 4), (4, 9)) and sets[0][0] == list(range(52))
    with pytest.raises(ValueError, match="anyres_budget must be one of"):
        layout.count(0.25, "tile", "keep")


@pytest.mark.parametrize("newline", ["keep", "compress"])
@pytest.mark.parametrize("budget", ["image", "view"])
def test_kept_tokens_keep_original_positions_and_the_processor_count(budget, newline):
    model, processor = on("deft", anyres_budget=budget, anyres_image_newline=newline)
    sizes = [T.SIZES[0], T.SIZES[2]]  # different N per image
    batch = T.inputs(processor, sizes)
    with torch.no_grad():
        out = model(**batch)
    image_token = model.config.image_token_index
    for row, (size, kept) in enumerate(zip(sizes, out.kept_indices)):
        layout = model.model.anyres_layout(list(size))
        assert (
            len(kept)
            == layout.count(0.25, budget, newline)
            == int((batch["input_ids"][row] == image_token).sum())
        )
        assert torch.equal(kept, kept.sort().values)
        newlines = torch.tensor(layout.newline_indices())
        if newline == "keep":
            assert torch.isin(newlines, kept).all()
        if budget == "view":
            assert int((kept < 16).sum()) == num_kept_tokens(16, 0.25) + (
                newline == "keep" and layout.grid_shape is None
            )
        # positions: kept token j sits at start + its packed index; the text after at start + N
        ids, positions = batch["input_ids"][row], out.deft_position_ids[row]
        where = (ids == image_token).nonzero().flatten()
        start = int(positions[where[0]]) - int(kept[0])
        assert torch.equal(positions[where], start + kept)
        assert int(positions[where[-1] + 1]) == start + layout.num_tokens


def test_deft_group_score_uses_neighbours_inside_each_view_only():
    torch.manual_seed(0)
    semantic, saliency = torch.randn(1, 16 + 8, 6), torch.rand(1, 24)
    kw = dict(image_neighbors=8, video_window=2, text_neighbors=5)
    views = group_scores(semantic, saliency, "image", ((4, 4), (2, 4)), None, **kw)
    alone = [
        group_scores(semantic[:, :16], saliency[:, :16], "image", (4, 4), None, **kw),
        group_scores(semantic[:, 16:], saliency[:, 16:], "image", (2, 4), None, **kw),
    ]
    torch.testing.assert_close(views, torch.cat(alone, 1))
    # one 6x4 grid would make the base view's last row and the tile grid's first row neighbours
    single = group_scores(semantic, saliency, "image", (6, 4), None, **kw)
    assert not torch.allclose(single[:, 12:20], views[:, 12:20])


def test_deft_sees_the_views_and_a_sequence_method_one_token_set():
    seen = {}
    for method in ("deft", "random"):
        model, processor = on(method)
        compress = type(model.model.active_method).compress_features

        def spy(self, features, visual, compress=compress, method=method):
            seen[method] = visual.spatial_shape
            return compress(self, features, visual)

        type(model.model.active_method).compress_features = spy
        try:
            with torch.no_grad():
                model(**T.inputs(processor, [T.SIZES[0]]))
        finally:
            type(model.model.active_method).compress_features = compress
    assert seen == {"deft": ((4, 4), (4, 8)), "random": (1, 48)}


# ----------------------------------------------------------------------------- compression on: generate
@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_generate_batch_rows_equal_single_runs_and_cached_equals_uncached(method):
    model, processor = on(method)
    sizes = [T.SIZES[0], T.SIZES[1], T.SIZES[4]]
    batch = T.inputs(processor, sizes)
    out = model.generate(**batch, **GEN)
    assert torch.equal(out, model.generate(**batch, **GEN, use_cache=False))
    new = out[:, batch["input_ids"].shape[1] :]
    for i, size in enumerate(sizes):
        single = T.inputs(processor, [size], seed=i)
        assert torch.equal(model.generate(**single, **GEN)[0, -new.shape[1] :], new[i]), (method, size)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "settings, reason",
    [
        (dict(compression_method="visionzip"), "CLS token"),
        (dict(compression_method="tome"), "inside the vision encoder"),
        (
            dict(compression_method="fastv", compression_settings={"fastv_layer": 1}),
            "inside the decoder layers",
        ),
        (dict(compression_method="deco"), "feature_space='vision'"),
        (
            dict(
                compression_method="deco",
                compression_settings={"feature_space": "projected"},
                anyres_budget="view",
            ),
            "no square",
        ),
        (
            dict(compression_method="ficoco_l", compression_settings={"ficoco_l_layer": 1}),
            "inside the decoder layers",
        ),
        (dict(anyres_budget="tile"), "anyres_budget must be one of"),
        (dict(anyres_image_newline="drop"), "anyres_image_newline must be one of"),
    ],
)
def test_methods_that_cannot_run_on_anyres_are_refused_with_the_reason(settings, reason):
    with pytest.raises(ValueError, match=reason) as error:
        T.config(**{**QUARTER, **settings})
    if "compression_method" in settings and "anyres" not in reason:
        assert "cannot compress LLaVA-NeXT" in str(error.value) and "'random'" in str(error.value)


def test_save_and_load_keep_the_settings(tmp_path):
    model, processor = on("uniform", anyres_budget="view", anyres_image_newline="compress")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DeftLlavaNextForConditionalGeneration
    assert (loaded.config.anyres_budget, loaded.config.anyres_image_newline) == ("view", "compress")
    assert (loaded_processor.anyres_budget, loaded_processor.anyres_image_newline) == ("view", "compress")
    batch = T.inputs(loaded_processor, [T.SIZES[3]])
    assert torch.equal(batch["input_ids"], T.inputs(processor, [T.SIZES[3]])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- convert
def _stock_folders(tmp_path):
    """A tiny stock LLaVA-NeXT (stock `save_pretrained`) and the same weights in the transformers 5 key layout."""
    from safetensors.torch import save_file

    stock = T.stock_model(seed=1)
    legacy = tmp_path / "legacy"
    stock.save_pretrained(legacy)
    T.processor(stock=True).save_pretrained(legacy)
    v5 = tmp_path / "v5"
    v5.mkdir()
    (v5 / "config.json").write_text((legacy / "config.json").read_text())
    state = {k: v.contiguous() for k, v in stock.state_dict().items()}  # model.language_model.* names
    save_file(state, v5 / "model.safetensors", metadata={"format": "pt"})
    T.processor(stock=True).save_pretrained(v5)
    return stock, legacy, v5


def test_convert_a_stock_llava_next_folder_and_generate_with_every_method(tmp_path):
    stock, legacy, v5 = _stock_folders(tmp_path)
    stock_processor = T.processor(stock=True)
    sizes = [T.SIZES[0], T.SIZES[2], T.SIZES[3]]
    for source in (legacy, v5):
        out = tmp_path / f"deft-{source.name}"
        new = convert(str(source), str(out), use_deft=True, deft_retention_ratio=0.25)
        assert new and all(k.startswith("model.deft.") for k in new)
        model = AutoModelForImageTextToText.from_pretrained(out).eval()
        processor = AutoProcessor.from_pretrained(out)
        assert type(model) is DeftLlavaNextForConditionalGeneration
        assert type(processor).__name__ == "DeftLlavaNextProcessor" and processor.deft_retention_ratio == 0.25
        assert model.config.deft_question_aware and model.config.deft_position_aware  # the recipe
        assert torch.equal(model.model.image_newline, stock.model.image_newline)
        # compression off: the stock model's logits and generate
        off = AutoModelForImageTextToText.from_pretrained(out, use_deft=False).eval()
        theirs = T.inputs(stock_processor, sizes)
        with torch.no_grad():
            torch.testing.assert_close(off(**theirs).logits, stock(**theirs).logits, rtol=0, atol=0)
        assert torch.equal(off.generate(**theirs, **GEN), stock.generate(**theirs, **GEN))
    for method in FEATURE_METHODS:
        model = AutoModelForImageTextToText.from_pretrained(out, compression_method=method).eval()
        processor = AutoProcessor.from_pretrained(out, compression_method=method)
        batch = T.inputs(processor, sizes)
        with torch.no_grad():  # each image keeps fewer tokens than N (CDPruner writes N placeholders)
            kept = [len(k) for k in model(**batch).kept_indices]
        n = (theirs["input_ids"] == model.config.image_token_index).sum(1).tolist()
        assert all(a < b for a, b in zip(kept, n)), (method, kept, n)
        generated = model.generate(**batch, **GEN)
        assert torch.equal(generated, model.generate(**batch, **GEN, use_cache=False)), method
        for i, size in enumerate(sizes):
            single = T.inputs(processor, [size], seed=i)
            assert torch.equal(model.generate(**single, **GEN)[0, -4:], generated[i, -4:]), (method, size)


def test_convert_command_line_writes_the_anyres_settings(tmp_path):
    _, legacy, _ = _stock_folders(tmp_path)
    from modeling_deft_llava.commands.convert import main

    main(
        [str(legacy), str(tmp_path / "out"), "--anyres-budget", "view", "--anyres-image-newline", "compress"]
    )
    config = DeftLlavaNextConfig.from_pretrained(tmp_path / "out")
    assert (config.anyres_budget, config.anyres_image_newline, config.use_deft) == ("view", "compress", True)


@pytest.mark.parametrize("question_aware", [False, True])
def test_beam_search_with_compression_equals_each_image_alone(question_aware):
    model, processor = recipe() if question_aware else on("deft")
    beams = dict(GEN, num_beams=2, num_return_sequences=2)
    batch = T.inputs(processor, [T.SIZES[0], T.SIZES[3]], prompts=QUESTIONS)
    out = model.generate(**batch, **beams)
    for i, size in enumerate([T.SIZES[0], T.SIZES[3]]):
        alone = model.generate(**T.inputs(processor, [size], prompts=[QUESTIONS[i]], seed=i), **beams)
        assert torch.equal(alone[:, -4:], out[2 * i : 2 * i + 2, -4:])


def test_speed_benchmark_runs_on_a_tiny_anyres_shape(tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import speed_llava_next

    shape = tmp_path / "tiny_next.json"
    shape.write_text(json.dumps(T.stock_fields()))
    out = tmp_path / "speed.json"
    speed_llava_next.main(
        ["--shape", str(shape), "--ratios", "0.25", "--repeats", "1", "--no-cpu-memory", "--dtype", "float32"]
        + ["--out", str(out)]
    )
    runs = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    # 672x672 -> the 32x32 pinpoint: 2x2 tiles, an 8x8 grid + 8 row markers after the 4x4 base view
    assert runs["none"]["visual_tokens"] == 16 + 8 * 9
    assert runs["deft"]["visual_tokens"] == num_kept_tokens(16 + 64, 0.25) + 8
    tokens = speed_llava_next.TEXT_TOKENS
    assert runs["deft"]["kv_ratio"] == (tokens + runs["deft"]["visual_tokens"]) / (tokens + 88)
    assert runs["deft"]["ideal_speedup"] > 1 and "| deft |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- question-aware DeFT, hybrid, adaptive
def recipe(**overrides):
    """The shipped recipe (question- and position-aware) with the zero-started question and position inputs
    given some weight, so the question and the grid change the choice."""
    model, processor = on("deft", **DEFT_RECIPE, **overrides)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        deft = model.model.deft
        for layer in (deft.question_encoder.film, deft.position_encoding.proj):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)
    return model, processor


QUESTIONS = [
    "USER: <image>\nwhat is in the picture ? ASSISTANT:",
    "USER: a cat <image>\nand a dog ASSISTANT:",
]


def test_question_aware_deft_selects_by_each_rows_question():
    model, processor = recipe()
    size = T.SIZES[0]
    kept = {}
    for question in QUESTIONS:
        batch = T.inputs(processor, [size], prompts=[question])
        with torch.no_grad():
            out = model(**batch)
        layout = model.model.anyres_layout(list(size))
        assert len(out.kept_indices[0]) == layout.count(0.25, "image", "keep")  # K + the row markers
        assert torch.isin(torch.tensor(layout.newline_indices()), out.kept_indices[0]).all()
        kept[question] = out.compression_scores[0]
    assert not torch.allclose(*kept.values())  # the question changed the scores
    # two rows, two questions, two sizes: each row scores as it does alone
    sizes = [T.SIZES[0], T.SIZES[2]]
    batch = T.inputs(processor, sizes, prompts=QUESTIONS)
    with torch.no_grad():
        together = model(**batch)
    for i, size in enumerate(sizes):
        with torch.no_grad():
            alone = model(**T.inputs(processor, [size], prompts=[QUESTIONS[i]], seed=i))
        assert torch.equal(alone.kept_indices[0], together.kept_indices[i])
        n = model.model.anyres_layout(list(size)).num_tokens
        torch.testing.assert_close(alone.compression_scores[0, :n], together.compression_scores[i, :n])


def test_position_aware_deft_encodes_each_views_own_grid():
    from modeling_deft_llava.deft.question_conditioning import grid_position_features

    views = grid_position_features(((4, 4), (4, 8)), 48, "cpu")
    alone = [grid_position_features((4, 4), 16, "cpu"), grid_position_features((4, 8), 32, "cpu")]
    torch.testing.assert_close(views, torch.cat(alone))


@pytest.mark.parametrize(
    "settings",
    [
        dict(DEFT_RECIPE),
        dict(deft_inference_mode="hybrid", deft_enable_rtd=True),
        dict(DEFT_RECIPE, deft_inference_mode="adaptive", deft_enable_rtd=True),
    ],
    ids=["question-aware", "hybrid", "adaptive-question-aware"],
)
def test_prompt_and_content_dependent_deft_batch_rows_equal_single_runs_and_cache(settings):
    model, processor = on("deft", **settings)
    sizes = [T.SIZES[0], T.SIZES[1], T.SIZES[4]]
    batch = T.inputs(processor, sizes, prompts=[QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]])
    writes_all = settings.get("deft_inference_mode", "fast") != "fast"
    image_token = model.config.image_token_index
    for row, size in enumerate(sizes):  # N placeholders for the content-dependent modes, K + markers else
        layout = model.model.anyres_layout(list(size))
        expected = layout.num_tokens if writes_all else layout.count(0.25, "image", "keep")
        assert int((batch["input_ids"][row] == image_token).sum()) == expected
    out = model.generate(**batch, **GEN)
    assert torch.equal(out, model.generate(**batch, **GEN, use_cache=False))
    new = out[:, batch["input_ids"].shape[1] :]
    for i, size in enumerate(sizes):
        single = T.inputs(processor, [size], prompts=[batch_prompt(i)], seed=i)
        assert torch.equal(model.generate(**single, **GEN)[0, -new.shape[1] :], new[i]), size


def batch_prompt(i):
    return [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]][i]


def test_hybrid_keeps_k_and_the_markers_when_nothing_is_uncertain_and_all_when_everything_is():
    size = T.SIZES[3]
    counts = {}
    for name, thresholds in {
        "certain": dict(deft_rtd_entropy_threshold=1.0, deft_rtd_confidence_threshold=0.0),
        "uncertain": dict(deft_rtd_entropy_threshold=0.0, deft_rtd_confidence_threshold=1.0),
    }.items():
        model, processor = on("deft", deft_inference_mode="hybrid", deft_enable_rtd=True, **thresholds)
        with torch.no_grad():
            out = model(**T.inputs(processor, [size]))
        counts[name] = len(out.kept_indices[0])
        assert torch.equal(out.kept_indices[0], out.kept_indices[0].sort().values)
    layout = model.model.anyres_layout(list(size))
    assert counts["certain"] == layout.count(0.25, "image", "keep") < counts["uncertain"]


def test_question_aware_deft_takes_two_images_of_different_sizes_in_one_row():
    model, processor = recipe()
    sizes = [T.SIZES[0], T.SIZES[2]]
    images = [T.image(size, i) for i, size in enumerate(sizes)]
    batch = processor(
        images=images, text=["USER: <image><image>\nwhich is larger ? ASSISTANT:"], return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**batch)
    for kept, size in zip(out.kept_indices, sizes):
        layout = model.model.anyres_layout(list(size))
        assert len(kept) == layout.count(0.25, "image", "keep")
        assert torch.isin(torch.tensor(layout.newline_indices()), kept).all()
    generated = model.generate(**batch, **GEN)
    assert torch.equal(generated, model.generate(**batch, **GEN, use_cache=False))


def test_question_aware_deft_names_placeholders_that_do_not_fit_the_layouts():
    model, _ = recipe()
    stock_inputs = T.inputs(T.processor(stock=True), [T.SIZES[0]])  # N placeholders, the model expects K
    with pytest.raises(ValueError, match=r"image tokens do not match, tokens: 52, features: 16"):
        model(**stock_inputs)
