"""Videos through the same forward/generate path as images (issue 16): DeFT's temporal mode and image methods
applied frame by frame keep the image guarantees (batch rows equal single runs, cached equals uncached and a
full recompute, static cache equals dynamic), the processor and the model agree on the placeholder count, and
bad input is a clear error."""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.configuration import num_kept_tokens
from test_model import GEN, greedy_full_recompute
from test_model_methods import method_settings

from modeling_deft_llava.compressors.compression_registry import METHODS
from modeling_deft_llava.compressors.placeholder_policy import video_capable_methods, video_placeholder_count

FRAMES = 3
N = tiny.NUM_PATCHES  # 16 patches per frame
VIDEO_ID = 5
QUESTIONS = ("what is in the picture ?", "a ?")
# image methods that compress each image alone: a video is compressed frame by frame
PER_FRAME = ("random", "uniform", "deco", "divprune", "visionzip", "tome", "ficoco_v", "prunesid")
# methods that need the prompt or the decoder (or write all N placeholders): no video
NO_VIDEO = ("recoverable", "cdpruner", "fastv", "ficoco_l")


def prompt(question: str) -> str:
    return "USER: <video>\n" + question + " ASSISTANT:"


def videos(n: int, seed: int = 0) -> list:
    return [tiny.images(FRAMES, seed=seed + 10 * i) for i in range(n)]


def video_inputs(processor, questions=QUESTIONS, seed=0):
    return processor(
        videos=videos(len(questions), seed),
        text=[prompt(q) for q in questions],
        return_tensors="pt",
        padding=True,
    )


def test_every_method_is_classified():
    assert set(PER_FRAME) | set(NO_VIDEO) | {"deft"} == set(METHODS)
    config = tiny.config(**method_settings("deft"))
    assert video_capable_methods(config) == [m for m in METHODS if m == "deft" or m in PER_FRAME]


@pytest.mark.parametrize("method", ("deft", *PER_FRAME))
def test_video_in_forward_and_generate(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = video_inputs(processor)
    k = num_kept_tokens(FRAMES * N, 0.25)  # 12 = 3 frames x 4: the same total either way here
    assert ((inputs["input_ids"] == VIDEO_ID).sum(1) == k).all()
    assert inputs["pixel_values_videos"].shape == (2, FRAMES, 3, 32, 32)
    out = model(**inputs)
    for kept in out.kept_indices:
        assert len(kept) == k and bool((kept.diff() > 0).all()) and int(kept.max()) < FRAMES * N
        if method != "deft":  # frame by frame: K of each frame
            assert torch.bincount(kept // N, minlength=FRAMES).tolist() == [k // FRAMES] * FRAMES
    generated = model.generate(**inputs, **GEN)
    prompt_only = dict(inputs, deft_prompt_length=inputs["input_ids"].shape[1])
    assert torch.equal(generated, greedy_full_recompute(model, prompt_only, 4))
    assert torch.equal(generated, model.generate(**inputs, **GEN, use_cache=False))
    static = model.generate(**inputs, **GEN, cache_implementation="static")
    assert torch.equal(generated, static)
    for b, question in enumerate(QUESTIONS):  # batch rows = single runs
        single = processor(videos=videos(2)[b : b + 1], text=[prompt(question)], return_tensors="pt")
        assert torch.equal(model.generate(**single, **GEN)[0, -4:], generated[b, -4:])
        with torch.no_grad():
            alone = model(**single).logits[0, -1]
            together = model(**inputs).logits[b, -1]
        torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", PER_FRAME)
def test_frame_by_frame_is_the_image_method_on_each_frame(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = video_inputs(processor)
    pixels = inputs["pixel_values_videos"]
    with torch.no_grad():
        video = model.model.get_video_features(pixels)
        frames = model.model.get_image_features(pixels.flatten(0, 1))
    for v in range(2):
        rows = torch.cat(frames.pooler_output[v * FRAMES : (v + 1) * FRAMES])
        sources = torch.cat([frames.source_indices[v * FRAMES + f] + f * N for f in range(FRAMES)])
        torch.testing.assert_close(video.pooler_output[v], rows)
        assert torch.equal(video.source_indices[v], sources)
        assert video.num_source_tokens[v] == FRAMES * N


@pytest.mark.parametrize("ratio", [0.125, 0.3, 0.482])
@pytest.mark.parametrize("method", ["deft", "divprune"])
def test_processor_and_model_agree_on_video_counts(method, ratio):
    settings = dict(method_settings(method), deft_retention_ratio=ratio)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = video_inputs(processor)
    with torch.no_grad():
        rows = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    assert [len(r) for r in rows] == (inputs["input_ids"] == VIDEO_ID).sum(1).tolist()
    expected = num_kept_tokens(FRAMES * N, ratio) if method == "deft" else FRAMES * num_kept_tokens(N, ratio)
    assert len(rows[0]) == expected
    assert video_placeholder_count(N, FRAMES, True, ratio, "fast", method) == expected


def test_frame_by_frame_budget_differs_from_the_video_budget_only_by_rounding():
    # 0.3 x 16 = 4.8 -> 5 per frame, 15 in all; the whole video: 0.3 x 48 = 14.4 -> 14
    assert video_placeholder_count(N, FRAMES, True, 0.3, "fast", "random") == 15
    assert video_placeholder_count(N, FRAMES, True, 0.3, "fast", "deft") == 14
    assert video_placeholder_count(N, FRAMES, False, 0.3, "fast", "random") == FRAMES * N


@pytest.mark.parametrize("method", NO_VIDEO)
def test_methods_without_video_refuse_it_clearly(method):
    settings = method_settings(method)
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = video_inputs(processor, questions=QUESTIONS[:1])
    with pytest.raises(
        ValueError, match=rf"compression_method='{method}' supports images only, not video.*'deft'"
    ):
        model(**inputs)


def test_deft_video_feedback_gradients_reach_the_scorer():
    """Before: `forward(deft_token_gradients=...)` passed the gradients to images only, so a video's feedback
    score was silently skipped (no `feedback_loss`)."""
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = video_inputs(processor, questions=QUESTIONS[:1])
    model.train()
    grads = [torch.randn(FRAMES * N, model.config.text_config.hidden_size)]
    out = model(**inputs, deft_token_gradients=grads)
    assert out.feedback_loss is not None and torch.isfinite(out.feedback_loss)
    out.feedback_loss.backward()
    saliency = [p.grad for n, p in model.named_parameters() if "saliency" in n and p.grad is not None]
    assert saliency and any(bool(g.abs().sum() > 0) for g in saliency)


def test_feedback_gradients_of_a_video_batch():
    # the one feedback pass of the trainer and the benchmarks (`training.trainer.feedback_gradients`) takes videos
    from modeling_deft_llava.training.trainer import feedback_gradients

    settings = method_settings("deft")
    model, full_processor = tiny.model(**settings), tiny.processor(use_deft=False)
    full = video_inputs(full_processor)
    full["labels"] = full["input_ids"].clone()
    before = [p.detach().clone() for p in model.parameters()]
    grads = feedback_gradients(model, full, pixel_values_videos=full["pixel_values_videos"])
    assert [tuple(g.shape) for g in grads] == [(FRAMES * N, model.config.text_config.hidden_size)] * 2
    assert all(bool(g.abs().sum() > 0) for g in grads)
    assert all(p.grad is None for p in model.parameters())  # only the rows get a gradient
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="needs pixel_values and/or pixel_values_videos"):
        feedback_gradients(model, full)


def mixed_batch(processor):
    """Row 0: an image; row 1: a video (one batch, both modalities)."""
    return processor(
        images=tiny.images(1),
        videos=videos(1),
        text=["USER: <image>\n" + QUESTIONS[0] + " ASSISTANT:", prompt(QUESTIONS[1])],
        return_tensors="pt",
        padding=True,
    )


def test_a_mixed_batch_trains_on_its_images_and_its_videos():
    """Before: the RTD and feedback losses of a batch with images and videos were the images' alone (the first
    modality's), so the videos of a mixed batch never trained DeFT."""
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = mixed_batch(processor)
    model.train()
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(0)
    image_grad, video_grad = torch.randn(N, hidden), torch.randn(FRAMES * N, hidden)
    out = model(**inputs, deft_token_gradients=[image_grad, video_grad])
    other = model(**inputs, deft_token_gradients=[image_grad, 100 * torch.randn(FRAMES * N, hidden)])
    assert not torch.allclose(out.feedback_loss, other.feedback_loss)  # the video's feedback counts
    # the per-item mean over both modalities: the image alone and the video alone, weighted one item each
    image_only = processor(images=tiny.images(1), text=["USER: <image>\n" + QUESTIONS[0] + " ASSISTANT:"],
                           return_tensors="pt")  # fmt: skip
    video_only = video_inputs(processor, questions=QUESTIONS[1:])
    alone = [
        model(**image_only, deft_token_gradients=[image_grad]),
        model(**video_only, deft_token_gradients=[video_grad]),
    ]
    for name in ("rtd_loss", "feedback_loss"):
        want = (getattr(alone[0], name) + getattr(alone[1], name)) / 2
        torch.testing.assert_close(getattr(out, name), want, rtol=1e-5, atol=1e-6)


def test_a_gradient_list_that_misses_an_item_is_refused():
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    hidden = model.config.text_config.hidden_size
    with pytest.raises(ValueError, match=r"1 image\(s\) \+ 1 video\(s\), got 1"):
        model(**mixed_batch(processor), deft_token_gradients=[torch.randn(N, hidden)])


def test_the_trainer_computes_feedback_for_videos(tmp_path):
    """Before: `DeftLlavaTrainer.compute_loss` ran the feedback pass only when the batch had `pixel_values`."""
    from modeling_deft_llava.training.trainer import DeftLlavaTrainer
    from transformers import TrainingArguments

    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = dict(video_inputs(processor))
    inputs["labels"] = inputs["input_ids"].clone()
    full = video_inputs(tiny.processor(use_deft=False))
    inputs.update({f"full_{k}": v for k, v in full.items() if k != "pixel_values_videos"})
    inputs["full_labels"] = full["input_ids"].clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False
    )
    trainer = DeftLlavaTrainer(model=model, args=args, feedback_every_n_steps=1)
    model.train()
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True)
    assert out.feedback_loss is not None and torch.isfinite(out.feedback_loss)


def test_deft_video_uses_the_temporal_group_score():
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = video_inputs(processor, questions=QUESTIONS[:1])
    with torch.no_grad():
        base = model(**inputs).kept_indices[0]
        model.config.deft_group_video_window = 1  # the window changes the group score, so the choice may move
        model(**inputs)
    assert len(base) == num_kept_tokens(FRAMES * N, 0.25)


# ----------------------------------------------------------------------------- bad input
def test_bad_video_tensors_are_clear_errors():
    model = tiny.model(**method_settings("deft"))
    with pytest.raises(ValueError, match=r"pixel_values_videos must be a \(num_videos, frames, channels"):
        model.model.get_video_features(torch.randn(3, 3, 32, 32))  # 4-D: an image batch
    with pytest.raises(ValueError, match=r"pixel_values_videos must be"):
        model.model.get_video_features([torch.randn(3, 3, 32, 32)])
    with pytest.raises(ValueError, match=r"at least one video of at least one frame"):
        model.model.get_video_features(torch.randn(1, 0, 3, 32, 32))


def test_frame_count_mismatch_is_a_clear_error():
    settings = method_settings("deft")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    with pytest.raises(ValueError, match=r"same, non-zero number of frames, got \[2, 3\]"):
        processor(videos=[tiny.images(2), tiny.images(3)], text=[prompt("a ?"), prompt("a ?")])
    inputs = video_inputs(processor, questions=QUESTIONS[:1])
    fewer = inputs["pixel_values_videos"][:, :2]  # 2 frames for placeholders written for 3
    with pytest.raises(
        ValueError, match=r"Video features and video tokens do not match, tokens: 12, features: 8"
    ):
        model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values_videos=fewer
        )


def test_video_without_placeholder_and_placeholder_without_video():
    settings = method_settings("divprune")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    with pytest.raises(ValueError, match=r"videos need a text prompt with one <video> placeholder per video"):
        processor(videos=videos(1), return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"Found 0 <video> tokens in the text but 1 videos|number of <video> tokens"
    ):
        processor(videos=videos(1), text=["USER: a ? ASSISTANT:"], return_tensors="pt")
    inputs = video_inputs(processor, questions=QUESTIONS[:1])
    text_only = processor(text=["USER: a ? ASSISTANT:"], return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"Video features and video tokens do not match, tokens: 0, features: 12"
    ):
        model(**text_only, pixel_values_videos=inputs["pixel_values_videos"])
    with pytest.raises(ValueError, match=r"config.video_token_index is None"):
        no_video = tiny.model(**settings, video_token_index=None)
        no_video(**text_only, pixel_values_videos=inputs["pixel_values_videos"])
