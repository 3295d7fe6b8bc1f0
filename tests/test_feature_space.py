"""VisionZip and DeCo compress the vision features before the projector, as their official code (issue 14)."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from test_model import batch_inputs

from modeling_deft_llava.compressors.compression_registry import build_compressor
from modeling_deft_llava.compressors.token_compressor import CompressionContext
from modeling_deft_llava.compressors.vision_attention import cls_attention, patch_keys


def test_visionzip_minimal_input_official_order():
    """A target and one member, both 1, under a GELU projector: official proj(1 + 1) = GELU(2) = 1.955; the
    projected order gives GELU(1) + GELU(1) = 1.683."""
    zip_ = build_compressor("visionzip", 1, {"contextual_ratio": 0.5})
    features = torch.tensor([[[5.0], [1.0], [1.0]]])  # patch 0 dominant; patch 1 target, patch 2 member
    context = CompressionContext(
        spatial_shape=(1, 3), num_kept=2, cls_attention=torch.tensor([[0.6, 0.2, 0.1]])
    )
    official = F.gelu(zip_(features, context).tokens)[0, 1, 0]
    projected_first = zip_(F.gelu(features), context).tokens[0, 1, 0]
    assert official.item() == pytest.approx(1.9545, abs=1e-4)
    assert projected_first.item() == pytest.approx(1.6827, abs=1e-4)


def test_deco_minimal_input_official_order():
    """Two patches -2 and +2 pooled to one under a GELU projector: official GELU(mean) = 0, mean(GELU) = 0.954."""
    deco = build_compressor("deco", 1)
    features = torch.tensor([[[-2.0], [2.0]]])
    context = CompressionContext(spatial_shape=(1, 2), num_kept=1)
    assert F.gelu(deco(features, context).tokens).item() == pytest.approx(0.0, abs=1e-6)
    assert deco(F.gelu(features), context).tokens.item() == pytest.approx(0.9545, abs=1e-4)


def _selected_and_layer_input(model, pixel_values):
    vision = model.model.vision_tower(pixel_values, output_hidden_states=True)
    layer = model.config.vision_feature_layer  # -1 in the tiny model
    selected = vision.hidden_states[layer][:, 1:]  # (images, N, vision width), CLS dropped
    layer_input = vision.hidden_states[layer - 1]  # enters the layer whose output is the feature layer
    return selected, layer_input


@pytest.mark.parametrize("method", ["visionzip", "deco"])
@pytest.mark.parametrize("space", ["vision", "projected"])
def test_the_model_compresses_in_the_configured_space(method, space):
    settings = dict(
        use_deft=True,
        deft_retention_ratio=0.25,
        compression_method=method,
        compression_settings={"feature_space": space},
    )
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    pixel_values = batch_inputs(processor)["pixel_values"]
    inner = model.model
    with torch.no_grad():
        rows = torch.stack(inner.get_image_features(pixel_values).pooler_output)  # (images, K, D)
        selected, layer_input = _selected_and_layer_input(model, pixel_values)
        layer = inner._feature_layer_module()
        context = CompressionContext(
            spatial_shape=(4, 4),
            num_kept=4,
            cls_attention=cls_attention(layer, layer_input) if method == "visionzip" else None,
            vision_keys=patch_keys(layer, layer_input) if method == "visionzip" else None,
        )
        if space == "vision":
            assert inner.compressor.token_dim == model.config.vision_config.hidden_size
            expected = inner.multi_modal_projector(inner.compressor(selected, context).tokens)
        else:
            expected = inner.compressor(inner.multi_modal_projector(selected), context).tokens
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-5)


def renumbered_repacking_model(method: str):
    """A tiny model and processor at 25% with renumbered positions, for a method that re-packs the batch
    (`recoverable`, or DeFT `hybrid` that never reconstructs)."""
    from test_model import NEVER_UNCERTAIN

    if method == "deft_hybrid":
        settings = dict(use_deft=True, deft_inference_mode="hybrid", **NEVER_UNCERTAIN)
    else:
        settings = dict(use_deft=True, compression_method=method)
    settings.update(deft_retention_ratio=0.25, deft_keep_original_positions=False)
    return tiny.model(**settings), tiny.processor(**settings)


@pytest.mark.parametrize("method", ["recoverable", "deft_hybrid"])
def test_renumbered_positions_are_contiguous_after_re_packing(method):
    """Before: with deft_keep_original_positions=False, methods with content-dependent counts kept gaps
    (ids [0, 1, 2, 20, 21, ...]): the contiguous ids were computed over all N placeholders before re-packing."""
    model, processor = renumbered_repacking_model(method)
    out = model(**batch_inputs(processor))
    mask = out.deft_attention_mask.bool()
    expected = (mask.long().cumsum(1) - 1).masked_fill(~mask, 0)
    assert torch.equal(out.deft_position_ids, expected)


@pytest.mark.parametrize("method", ["recoverable", "deft_hybrid"])
def test_generate_renumbers_like_forward(method):
    """Before: generate passes position ids numbered over all N placeholders, and the re-packed prefill kept
    their gaps, so `deft_keep_original_positions=False` changed nothing under generate (the renumbered digits
    benchmark gave Recoverable exactly its original-position accuracy)."""
    from test_model import GEN

    model, processor = renumbered_repacking_model(method)
    inputs = batch_inputs(processor)
    with torch.no_grad():
        forward_last = model(**inputs).logits[:, -1]
    out = model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(out.logits[0], forward_last, rtol=0, atol=1e-5)
