"""The flat Hub export of DeFT-LLaVA-NeXT: the NeXT classes and `auto_map`, the isolated `trust_remote_code`
round trip (a clean `python -I` without the project: every Auto class and the pipeline, outputs bit-equal to the
in-repo model) and the same transformers version guard. The LLaVA export is tested in `test_hub_export.py`."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tiny_next as T
import torch
from modeling_deft_llava.configuration.deft_settings import DEFT_RECIPE
from modeling_deft_llava.hub_card import isolated_check
from modeling_deft_llava.hub_card.export import (
    NEXT_MODEL_AUTO_MAP,
    NEXT_PROCESSOR_AUTO_MAP,
    export_family,
    export_for_hub,
)
from PIL import Image
from test_hub_export import _load_with_fake_version, _threads
from transformers import pipeline

MAX_NEW_TOKENS = 4
PROMPT = "USER: <image>\nwhat is in the picture ? ASSISTANT:"
SUPPRESS = [0, 1, 2, 3, 4]  # special tokens and <image>: the greedy text is real words
THREADS = 1  # the same thread count on both sides: a bit-exact comparison
SIZE = (20, 40)  # (height, width): a base view and 1x2 tiles


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny question- and position-aware DeFT-LLaVA-NeXT at 25%, exported; in-repo outputs for one input."""
    root = tmp_path_factory.mktemp("hub_next")
    model = T.model(use_deft=True, deft_retention_ratio=0.25, **DEFT_RECIPE)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # give the zero-started question input weight: the question changes the choice
        layer = model.model.deft.question_encoder.film
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)
    model.generation_config.suppress_tokens = SUPPRESS
    processor = T.processor(use_deft=True, deft_retention_ratio=0.25)
    image_path = root / "image.png"
    T.image(SIZE).save(image_path)
    image = Image.open(image_path).convert("RGB")
    folder = export_for_hub(model, processor, root / "tiny-deft-llava-next")
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad(), _threads(THREADS):
        reference = {
            "input_ids": inputs["input_ids"],
            "logits": model(**inputs).logits,
            "generated": model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
            "base_last_hidden_state": model.model(**inputs).last_hidden_state,
        }
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    with _threads(THREADS):
        out = pipe(
            images=image,
            text=PROMPT,
            generate_kwargs=dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
            return_full_text=False,
        )
    reference["pipeline_text"] = out[0]["generated_text"]
    return dict(folder=folder, root=root, model=model, image_path=image_path, reference=reference)


def test_export_writes_the_next_classes_and_auto_maps(exported):
    folder = exported["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {
        "modeling_deft_llava_next.py",
        "configuration_deft_llava_next.py",
        "processing_deft_llava_next.py",
    } <= names
    assert {
        "modeling_deft_llava.py",
        "anyres_settings.py",
        "supported_versions.py",
    } <= names  # followed imports
    assert not [p for p in folder.iterdir() if p.is_dir()]  # flat
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == NEXT_MODEL_AUTO_MAP
    assert config["model_type"] == "deft_llava_next" and config["deft_question_aware"] is True
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == NEXT_PROCESSOR_AUTO_MAP
    assert processor_config["processor_class"] == "DeftLlavaNextProcessor"
    for target in [*NEXT_MODEL_AUTO_MAP.values(), *NEXT_PROCESSOR_AUTO_MAP.values()]:
        module, cls = target.split(".")
        tree = ast.parse((folder / f"{module}.py").read_text())
        assert cls in {n.name for n in tree.body if isinstance(n, ast.ClassDef)}, target
    assert getattr(exported["model"].config, "auto_map", None) is None  # the caller's config is left alone


def test_export_refuses_a_model_of_another_type():
    with pytest.raises(ValueError, match="model_type 'llava_next'"):
        export_family(T.stock_model())


# other interpreters (each with its own transformers, e.g. the lowest and the newest supported release) to load
# the export in, separated by os.pathsep; the default suite uses this interpreter only
OTHER_PYTHONS = [p for p in os.environ.get("DEFT_ISOLATED_PYTHONS", "").split(os.pathsep) if p]


@pytest.mark.parametrize("python", [None, *OTHER_PYTHONS], ids=lambda p: p or "this-python")
def test_isolated_load_of_the_next_folder_equals_the_in_repo_model(exported, python, tmp_path):
    out = tmp_path / "isolated.pt"
    summary = isolated_check.run_isolated_check(
        exported["folder"],
        out,
        image=exported["image_path"],
        prompt=PROMPT.replace("<image>", "{image}"),
        max_new_tokens=MAX_NEW_TOKENS,
        threads=THREADS,
        python=python,
    )
    remote = torch.load(out, weights_only=True)
    assert summary["project_importable"] is False and summary["threads"] == THREADS
    print("isolated load under transformers", summary["transformers_version"])
    expected = {
        "config_class": "configuration_deft_llava_next.DeftLlavaNextConfig",
        "processor_class": "processing_deft_llava_next.DeftLlavaNextProcessor",
        "causal_lm_class": "modeling_deft_llava_next.DeftLlavaNextForConditionalGeneration",
        "image_text_to_text_class": "modeling_deft_llava_next.DeftLlavaNextForConditionalGeneration",
        "base_class": "modeling_deft_llava_next.DeftLlavaNextModel",
        "pipeline_model_class": "modeling_deft_llava_next.DeftLlavaNextForConditionalGeneration",
    }
    for key, suffix in expected.items():
        assert summary[key].startswith("transformers_modules."), (key, summary[key])
        assert summary[key].endswith(suffix), (key, summary[key])
    reference = exported["reference"]
    assert torch.equal(remote["input_ids"], reference["input_ids"])  # the remote processor: K + row markers
    layout = exported["model"].model.anyres_layout(list(SIZE))
    assert int((reference["input_ids"] == 4).sum()) == layout.count(0.25, "image", "keep") < layout.num_tokens
    for name in ("causal_lm", "image_text_to_text"):
        assert torch.equal(remote[f"{name}_logits"], reference["logits"]), name
        assert torch.equal(remote[f"{name}_generated"], reference["generated"]), name
    assert torch.equal(remote["base_last_hidden_state"], reference["base_last_hidden_state"])
    assert reference["pipeline_text"].strip()
    assert remote["pipeline_text"] == reference["pipeline_text"]


def test_exported_next_code_has_the_same_transformers_version_guard(exported, tmp_path):
    from modeling_deft_llava.configuration.supported_versions import supported_transformers_range

    too_old = _load_with_fake_version(exported, tmp_path / "old", "5.17.0")
    assert (
        f"IMPORT-ERROR: DeFT-LLaVA supports transformers {supported_transformers_range()}" in too_old.stdout
    ), too_old.stdout + too_old.stderr[-2000:]
    newer = _load_with_fake_version(exported, tmp_path / "new", "5.99.0")
    assert "LOADED" in newer.stdout, newer.stdout + newer.stderr[-2000:]
    warned = [line for line in newer.stderr.splitlines() if "is newer and untested" in line]
    assert len(warned) == 1, newer.stderr[-3000:]


def test_next_processor_scales_16_bit_images_and_refuses_images_without_text():
    processor = T.processor(use_deft=True, deft_retention_ratio=0.25)
    ramp = np.linspace(0, 65535, 20 * 40).round().astype(np.uint16).reshape(20, 40)
    grey16 = Image.fromarray(ramp)
    eight = Image.fromarray((ramp / 257).round().astype(np.uint8)).convert("RGB")
    a = processor(images=[grey16], text=[PROMPT], return_tensors="pt")
    b = processor(images=[eight], text=[PROMPT], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"])  # scaled, not clipped to white
    with pytest.raises(ValueError, match="text=None"):
        processor(images=[eight])
    with pytest.raises(ValueError, match="grey picture needs a channel axis"):
        processor(images=[np.zeros((20, 40), dtype=np.uint8)], text=[PROMPT])
    with pytest.raises(ValueError, match="LLaVA-NeXT takes images only"):
        processor(videos=[[eight]], text=[PROMPT])


def test_the_endpoint_handler_reports_each_images_own_token_count(exported):
    """The exported `handler.py` on a NeXT folder: `num_source_tokens_per_image` is each image's N (base view plus
    its tile grid, different per image size); it reported one view's patch count before."""
    import base64
    import importlib.util
    import io

    folder = Path(exported["folder"])
    spec = importlib.util.spec_from_file_location("deft_next_handler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(str(folder))
    sizes = [SIZE, (40, 20)]
    encoded = []
    for i, size in enumerate(sizes):
        buffer = io.BytesIO()
        T.image(size, seed=i).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    prompt = "USER: <image><image>\nwhat is in the picture ? ASSISTANT:"
    reply = handler({"inputs": {"prompt": prompt, "images": encoded}, "parameters": {"max_new_tokens": 2}})[0]
    model = exported["model"]
    expected = [model.model.anyres_layout([h, w]).num_tokens for h, w in sizes]
    assert reply["num_source_tokens_per_image"] == expected
    assert len(reply["num_visual_tokens_per_image"]) == 2
