"""`vision_attention` against the attention weights a CLIP vision layer returns with eager attention."""

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from modeling_deft_llava.compressors.vision_attention import cls_attention, patch_keys


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    # 16 patches = (32 // 8) ** 2
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
    )
    return CLIPVisionModel(config).eval()


def test_cls_attention_matches_eager_weights(tiny_clip):
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = tiny_clip(pixel_values, output_attentions=True, output_hidden_states=True)
        for i, layer in enumerate(tiny_clip.encoder.layers):
            ours = cls_attention(layer, out.hidden_states[i])  # (3, 16)
            theirs = out.attentions[i][:, :, 0, 1:].mean(dim=1)  # (3, 16)
            assert ours.shape == (3, 16)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_cls_attention_per_row_and_sdpa_model(tiny_clip):
    """The recomputation is row-independent and works when the model itself runs SDPA."""
    pixel_values = torch.randn(2, 3, 32, 32)
    sdpa = copy.deepcopy(tiny_clip)
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    sdpa.eval()
    with torch.no_grad():
        hidden = sdpa(pixel_values, output_hidden_states=True).hidden_states[1]
        layer = sdpa.encoder.layers[1]
        both = cls_attention(layer, hidden)
        one = cls_attention(layer, hidden[1:])
        eager = tiny_clip(pixel_values, output_attentions=True).attentions[1][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(both[1:], one)
    torch.testing.assert_close(both, eager, rtol=1e-5, atol=1e-6)


def test_patch_keys_shape_and_value(tiny_clip):
    hidden = torch.randn(2, 17, 32)
    layer = tiny_clip.encoder.layers[0]
    with torch.no_grad():
        keys = patch_keys(layer, hidden)
        full = layer.self_attn.k_proj(layer.layer_norm1(hidden)).view(2, 17, 4, 8).mean(2)[:, 1:]
    assert keys.shape == (2, 16, 8)
    torch.testing.assert_close(keys, full)
