"""With compression off the model behaves as stock `LlavaForConditionalGeneration` where transformers' generic
model tests look (issue 24, item 3); each difference that stays is documented where it lives."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import GenerationMixin
from transformers.utils import ModelOutput

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaModel


def _pixels(n: int = 2) -> torch.Tensor:
    return tiny.processor(use_deft=False)(
        images=tiny.images(n), text=[tiny.prompt()] * n, return_tensors="pt"
    )["pixel_values"]


@pytest.mark.parametrize("use_deft", [False, True])
@pytest.mark.parametrize("how", ["argument", "config"])
def test_get_image_features_returns_a_tuple_without_return_dict(use_deft, how):
    """Stock: `return_dict=False` (or `config.return_dict=False`) gives `output.to_tuple()`; before: always an
    output object."""
    model = tiny.model(use_deft=use_deft).eval()
    stock = tiny.stock_twin(model).eval()
    pixels = _pixels()
    kwargs = {"return_dict": False} if how == "argument" else {}
    if how == "config":
        model.config.return_dict = stock.config.return_dict = False
    with torch.no_grad():
        ours, theirs = model.get_image_features(pixels, **kwargs), stock.get_image_features(pixels, **kwargs)
        inner = model.model.get_image_features(pixels, **kwargs)
    assert isinstance(theirs, tuple) and isinstance(ours, tuple) and isinstance(inner, tuple)
    assert not isinstance(ours, ModelOutput)
    if not use_deft:  # the same leading fields, equal
        assert torch.equal(ours[0], theirs[0])
        assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1], strict=True))


@pytest.mark.parametrize("return_dict", [True, None])
def test_get_image_features_returns_an_output_by_default(return_dict):
    model = tiny.model(use_deft=True).eval()
    kwargs = {} if return_dict is None else {"return_dict": return_dict}
    with torch.no_grad():
        out = model.get_image_features(_pixels(), **kwargs)
    assert isinstance(out, ModelOutput) and out.last_hidden_state is not None and len(out.pooler_output) == 2


def test_a_model_whose_config_says_no_return_dict_still_runs_and_generates():
    """The model's own calls ask for the output object: `config.return_dict=False` changes only what the user
    gets back."""
    model = tiny.model(use_deft=True).eval()
    processor = tiny.processor(use_deft=True)
    inputs = processor(images=tiny.images(1), text=[tiny.prompt()], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        model.config.return_dict = False
        out = model(**inputs)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert isinstance(out, tuple) and torch.equal(out[0], expected)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("how", ["argument", "config"])
def test_get_video_features_returns_a_tuple_without_return_dict(how):
    model = tiny.model(use_deft=True).eval()
    videos = torch.randn(1, 2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    kwargs = {"return_dict": False} if how == "argument" else {}
    if how == "config":
        model.config.return_dict = False
    with torch.no_grad():
        out = model.get_video_features(videos, **kwargs)
    assert isinstance(out, tuple) and not isinstance(out, ModelOutput)


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(use_deft=False), set()),
        (dict(use_deft=True), {"score_mixer"}),
        (dict(use_deft=True, compression_method="tome"), set()),
    ],
)
def test_keep_in_fp32_modules_names_only_modules_that_exist(settings, expected):
    """Before: `score_mixer` was named by the class, also where no DeFT module exists."""
    model = tiny.model(**settings)
    for m in (model, model.model):
        assert set(m._keep_in_fp32_modules) == expected
        names = {part for name, _ in m.named_modules() for part in name.split(".")}
        assert set(m._keep_in_fp32_modules) <= names
    assert DeftLlavaForConditionalGeneration._keep_in_fp32_modules is None
    assert DeftLlavaModel._keep_in_fp32_modules is None


def test_generation_mixin_is_a_direct_base():
    """transformers checks that a generative class lists `GenerationMixin` among its own bases."""
    assert GenerationMixin in DeftLlavaForConditionalGeneration.__bases__
    assert DeftLlavaForConditionalGeneration.can_generate()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_and_eager_logits(model, processor, fullgraph):
    inputs = processor(images=tiny.images(2), text=[tiny.prompt()] * 2, return_tensors="pt")
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model.forward, fullgraph=fullgraph, backend="eager")(**inputs).logits
    return eager, compiled


@pytest.mark.parametrize("settings", [dict(use_deft=False), dict(use_deft=True, compression_method="tome")])
def test_torch_compile_traces_a_full_graph(settings, fresh_dynamo):
    """Before: dynamo could not trace the `DeftSettings` dataclass read inside `forward`, then the placeholder
    checks (data-dependent)."""
    model, processor = tiny.model(**settings).eval(), tiny.processor(**settings)
    eager, compiled = _compiled_and_eager_logits(model, processor, fullgraph=True)
    assert torch.equal(compiled, eager)


def test_torch_compile_of_a_hooking_method_refuses_a_full_graph_and_runs_without(fresh_dynamo):
    model, processor = tiny.model(use_deft=True).eval(), tiny.processor(use_deft=True)
    with pytest.raises(Exception, match="torch.compile cannot trace compression method 'deft'"):
        _compiled_and_eager_logits(model, processor, fullgraph=True)
    torch._dynamo.reset()
    eager, compiled = _compiled_and_eager_logits(model, processor, fullgraph=False)
    assert torch.equal(compiled, eager)
