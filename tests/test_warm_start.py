"""Label-free warm start of DeFT's scorer (`training/warm_start.py`, `commands/warm_start.py`) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch
from modeling_deft_llava.commands import warm_start as command
from modeling_deft_llava.training.warm_start import (
    LOG_FILE,
    WarmStartArguments,
    list_images,
    listwise_loss,
    rank_scores,
    teacher_agreement,
    topk_overlap,
    warm_start,
)
from PIL import Image
from transformers import AutoModelForImageTextToText

from modeling_deft_llava import DeftLlavaForConditionalGeneration


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on a shared 2-core machine run far faster on one thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_images(n: int, seed: int) -> list[Image.Image]:
    """Dark 32x32 images with two to four bright squares: the tokens differ, as on real pictures."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 40, (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3)).astype(np.uint8)
        for _ in range(rng.integers(2, 5)):
            y, x = rng.integers(0, tiny.IMAGE_SIZE - 6, 2)
            size = int(rng.integers(4, 12))
            pixels[y : y + size, x : x + size] = rng.integers(120, 256, 3)
        out.append(Image.fromarray(pixels))
    return out


def write_images(folder, n: int, seed: int) -> str:
    folder.mkdir()
    for i, image in enumerate(blob_images(n, seed)):
        image.save(folder / f"img_{i:03d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    model_folder = root / "model"
    tiny.model(use_deft=True, deft_retention_ratio=0.25).save_pretrained(model_folder)
    tiny.processor(use_deft=True, deft_retention_ratio=0.25).save_pretrained(model_folder)
    return {
        "root": root,
        "model": str(model_folder),
        "train": write_images(root / "train", 24, seed=1),
        "eval": write_images(root / "eval", 16, seed=2),
    }


def run(folders, out: str, **overrides) -> dict:
    settings = dict(
        model_folder=folders["model"],
        images=folders["train"],
        out=str(folders["root"] / out),
        teacher="cls_attention",
        steps=40,
        batch_size=8,
        learning_rate=3e-3,
        eval_images=folders["eval"],
    )
    return warm_start(WarmStartArguments(**{**settings, **overrides}), progress=False)


def state(folder) -> dict:
    model = DeftLlavaForConditionalGeneration.from_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(folders):
    log = run(folders, "cls")
    return log, state(folders["root"] / "cls")


def test_only_the_deft_scorer_changes(folders, trained):
    log, after = trained
    before = state(folders["model"])
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    scoring = ("model.deft.semantic_abstraction.", "model.deft.saliency_scorer.", "model.deft.score_mixer.")
    assert changed and all(k.startswith(scoring) for k in changed), changed
    # every scoring weight moved, and none became NaN/inf
    for key in (k for k in before if k.startswith(scoring)):
        assert key in changed and torch.isfinite(after[key]).all(), key
    # tower, projector, language model, lm_head and the RTD are bit-identical
    assert any(k.startswith("model.vision_tower.") for k in before)
    assert any(k.startswith("model.deft.token_dictionary.") for k in before)
    assert log["last_loss"] < log["first_loss"]


def test_deterministic_for_a_seed(folders, trained):
    _, first = trained
    run(folders, "cls_again")
    again = state(folders["root"] / "cls_again")
    assert all(torch.equal(first[k], again[k]) for k in first)
    run(folders, "cls_seed1", seed=1)
    other = state(folders["root"] / "cls_seed1")
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("teacher", ["cls_attention", "divprune"])
def test_agreement_with_the_teacher_rises_on_held_out_images(folders, trained, teacher):
    log = trained[0] if teacher == "cls_attention" else run(folders, "div", teacher=teacher)
    agreement = log["agreement"]
    assert agreement["eval_after"] > agreement["eval_before"] + 0.05, agreement
    # the number in the log is what a fresh load measures
    out = folders["root"] / ("cls" if teacher == "cls_attention" else "div")
    model = DeftLlavaForConditionalGeneration.from_pretrained(out).eval()
    paths = sorted(str(p) for p in (folders["root"] / "eval").iterdir())
    processor = tiny.processor()
    measured = teacher_agreement(model, processor, paths, teacher, 0.25, 8)
    assert measured == pytest.approx(agreement["eval_after"], abs=1e-6)


def test_saved_folder_loads_with_the_auto_class_and_generates(folders, trained):
    out = folders["root"] / "cls"
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(model).__name__ == "DeftLlavaForConditionalGeneration"
    from modeling_deft_llava import DeftLlavaProcessor

    processor = DeftLlavaProcessor.from_pretrained(out)
    inputs = processor(images=blob_images(1, 5), text=[tiny.prompt(1)], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    log = json.loads((out / LOG_FILE).read_text())
    assert log["arguments"]["teacher"] == "cls_attention" and len(log["loss_every_step"]) == 40


def test_command_line_with_progress_bar(folders, capsys):
    out = folders["root"] / "cli"
    command.main(
        [
            folders["model"],
            "--images",
            folders["train"],
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "4",
        ]
    )
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "warm start (divprune)" in captured.err  # tqdm writes to stderr
    assert json.loads((out / LOG_FILE).read_text())["arguments"]["steps"] == 3
    # the flags take their defaults from WarmStartArguments
    assert (
        command.build_parser().parse_args(["m", "--images", "i", "--out", "o", "--threads", "1"]).threads == 1
    )
    parsed = command.build_parser().parse_args(["m", "--images", "i", "--out", "o"])
    for name, default in WarmStartArguments.defaults().items():
        assert getattr(parsed, name) == default, name
    # a bad value exits with the message, not a traceback
    with pytest.raises(SystemExit) as exit_info:
        command.main([folders["model"], "--images", folders["train"], "--out", str(out), "--steps", "0"])
    assert exit_info.value.code == 2 and "steps must be a positive int, got 0" in capsys.readouterr().err


def test_errors_name_the_bad_value(folders, tmp_path):
    good = dict(model_folder=folders["model"], images=folders["train"], out=str(tmp_path / "o"))
    cases = [
        (dict(steps=0), "steps must be a positive int, got 0"),
        (dict(steps=2.5), "steps must be a positive int, got 2.5"),
        (dict(batch_size=-1), "batch_size must be a positive int, got -1"),
        (dict(teacher="clip"), "teacher must be one of .* got 'clip'"),
        (dict(learning_rate=float("nan")), "learning_rate must be a positive finite number, got nan"),
        (dict(temperature=0), "temperature must be a positive finite number, got 0"),
        (dict(eval_ratio=1.5), r"eval_ratio must be in \(0, 1\], got 1.5"),
        (dict(threads=0), "threads must be a positive int or None, got 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            WarmStartArguments(**{**good, **overrides})

    def fails(message, **overrides):
        with pytest.raises(ValueError, match=message):
            warm_start(WarmStartArguments(**{**good, **overrides}), progress=False)

    fails("model folder '.*missing' does not exist", model_folder=str(tmp_path / "missing"))
    (tmp_path / "empty_model").mkdir()
    fails("is not a model folder: it has no config.json", model_folder=str(tmp_path / "empty_model"))
    stock = tmp_path / "stock"
    tiny.stock_twin(tiny.model(use_deft=False)).save_pretrained(stock)
    fails("is a stock LLaVA folder without DeFT modules: convert it first", model_folder=str(stock))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fails("holds a 'bert' model, not a DeftLlava", model_folder=str(other))
    no_deft = tmp_path / "no_deft"
    tiny.model(use_deft=False).save_pretrained(no_deft)
    fails("has use_deft=False .* no DeFT modules", model_folder=str(no_deft))
    baseline = tmp_path / "baseline"
    tiny.model(use_deft=True, compression_method="divprune").save_pretrained(baseline)
    fails("compression_method='divprune'", model_folder=str(baseline))
    no_processor = tmp_path / "no_processor"  # before: an OSError traceback from the processor's loader
    tiny.model(use_deft=True).save_pretrained(no_processor)
    fails("holds no processor .* save the processor there", model_folder=str(no_processor))
    fails("images folder '.*nowhere' does not exist", images=str(tmp_path / "nowhere"))
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    fails("images folder '.*no_images' holds no images", images=str(tmp_path / "no_images"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_text("not a png")
    fails("bad.png' is not a readable image", images=str(tmp_path / "broken"), steps=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    fails("output folder '.*busy' exists and is not empty", out=str(busy))
    assert (busy / "keep.txt").read_text() == "user data"
    siglip = tmp_path / "siglip"
    tiny.model(use_deft=True, **tiny.SIGLIP).save_pretrained(siglip)
    tiny.processor(**tiny.SIGLIP_PROCESSOR).save_pretrained(siglip)
    fails(
        "teacher='cls_attention' reads the CLS token.*use teacher='divprune'",
        model_folder=str(siglip),
        teacher="cls_attention",
    )
    # divprune needs no CLS token: the SigLIP model warm-starts
    log = warm_start(
        WarmStartArguments(**{**good, "model_folder": str(siglip), "teacher": "divprune", "steps": 2}),
        progress=False,
    )
    assert len(log["loss_every_step"]) == 2


def test_rank_loss_and_overlap_helpers():
    raw = torch.tensor([[0.3, 0.1, 0.9, 0.5]])
    assert torch.equal(rank_scores(raw), torch.tensor([[1 / 3, 0.0, 1.0, 2 / 3]]))
    # the loss is smallest when the student ranks as the teacher does
    teacher = rank_scores(raw)
    assert listwise_loss(teacher, teacher, 0.1) < 1e-6
    assert listwise_loss(1 - teacher, teacher, 0.1) > listwise_loss(teacher, teacher, 0.1) + 1
    assert topk_overlap(teacher, teacher, 0.5) == 1.0
    assert topk_overlap(1 - teacher, teacher, 0.5) == 0.0


@pytest.mark.parametrize(
    "teacher, method, settings",
    [("cls_attention", "visionzip", {"contextual_ratio": 0.0}), ("divprune", "divprune", None)],
)
def test_each_teacher_ranks_as_its_registered_method_keeps(teacher, method, settings):
    """The teacher's top-k is exactly what the method keeps (so the method's row is the teacher's accuracy)."""
    from modeling_deft_llava.training.warm_start import encode

    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    baseline = DeftLlavaForConditionalGeneration(
        tiny.config(
            use_deft=True, deft_retention_ratio=0.25, compression_method=method, compression_settings=settings
        )
    ).eval()
    baseline.load_state_dict(model.state_dict(), strict=False)
    pixel_values = tiny.processor().image_processor(blob_images(6, 3), return_tensors="pt")["pixel_values"]
    _, target, _ = encode(model, pixel_values, teacher)
    with torch.no_grad():
        kept = baseline.model.get_image_features(pixel_values=pixel_values).source_indices
    k = len(kept[0])
    assert k == 4
    for row, indices in zip(target, kept):
        assert set(row.topk(k).indices.tolist()) == set(indices.tolist())


def test_an_unreadable_image_is_named_when_the_folder_is_listed(tmp_path):
    """Every image's header is read when the folder is listed, before a model loads: a broken file among good
    ones was reported only once training reached it."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"b\.png' is not a readable image"):
        list_images(str(tmp_path))
