"""ToMe inside the model's CLIP encoder against a slow reference written from the paper (arXiv 2210.09461)."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from test_model import batch_inputs

from modeling_deft_llava.compressors.method_tome import tome_schedule


def ref_attention(layer, x, size, proportional):
    """Eager self-attention of one CLIP layer on `x` `(T, width)`, with log(size) added to every key."""
    attn = layer.self_attn
    heads, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(-1, heads, hd).transpose(0, 1)  # (heads, T, hd)
    k = attn.k_proj(x).view(-1, heads, hd).transpose(0, 1)
    v = attn.v_proj(x).view(-1, heads, hd).transpose(0, 1)
    logits = q @ k.transpose(1, 2) * attn.scale  # (heads, T, T)
    if proportional:
        logits = logits + size.log()
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
    return attn.out_proj(out), k.transpose(0, 1).mean(1)  # output, head-averaged keys (T, hd)


def ref_merge(x, size, index, keys, r, order):
    """Bipartite soft matching with plain loops: A = even tokens (not CLS), B = odd tokens.

    Output order: `"positions"` every token in place; `"released"` [CLS, unmerged A ascending, B]."""
    unit = F.normalize(keys, dim=-1)
    a_set, b_set = list(range(2, x.shape[0], 2)), list(range(1, x.shape[0], 2))
    best = {}
    for a in a_set:
        sims = [float(unit[a] @ unit[b]) for b in b_set]
        j = max(range(len(sims)), key=lambda i: (sims[i], -i))  # first maximum
        best[a] = (sims[j], b_set[j])
    chosen = sorted(a_set, key=lambda a: -best[a][0])[:r]  # stable: ties keep the earlier A token
    x, size = x.clone(), size.clone()
    for b in {best[a][1] for a in chosen}:
        group = [b] + [a for a in chosen if best[a][1] == b]
        total = sum(float(size[t]) for t in group)
        x[b] = sum(size[t] * x[t] for t in group) / total
        size[b] = total
    keep = [t for t in range(x.shape[0]) if t not in chosen]
    if order == "released":
        keep = [0] + [a for a in a_set if a not in chosen] + b_set
    return x[keep], size[keep], index[keep]


def ref_encode(model, pixel_values, num_kept, proportional=True, order="released"):
    """Per image: embeddings, then every layer with attention -> merge -> MLP; projector on the patches."""
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)  # CLIPVisionModel is the transformer itself in 5.x
    layers = vision.encoder.layers
    features, kept = [], []
    for image in pixel_values:
        x = vision.pre_layrnorm(vision.embeddings(image[None]))[0]  # (1 + N, width)
        n = x.shape[0] - 1
        size, index = torch.ones(n + 1), torch.arange(n + 1)
        for layer, r in zip(layers, tome_schedule(n, num_kept, len(layers))):
            out, keys = ref_attention(layer, layer.layer_norm1(x), size, proportional)
            x = x + out
            if r:
                x, size, index = ref_merge(x, size, index, keys, r, order)
            x = x + layer.mlp(layer.layer_norm2(x))
        raster = sorted(range(len(index)), key=lambda t: int(index[t]))  # by representative patch, CLS first
        x, index = x[raster], index[raster]
        features.append(model.model.multi_modal_projector(x[1:]))
        kept.append(index[1:] - 1)
    return features, kept


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize(
    ("proportional", "order"), [(True, "released"), (False, "released"), (True, "positions")]
)
def test_tome_matches_slow_reference(ratio, proportional, order):
    settings = dict(
        use_deft=True,
        deft_retention_ratio=ratio,
        compression_method="tome",
        compression_settings={"proportional_attention": proportional, "token_order": order},
    )
    model = tiny.model(**settings)
    inputs = batch_inputs(tiny.processor(**settings), n_images=(2, 1))
    k = model.config.num_kept_tokens(tiny.NUM_PATCHES)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"])
        ref_features, ref_kept = ref_encode(model, inputs["pixel_values"], k, proportional, order)
    assert [len(f) for f in out.pooler_output] == [k] * 3
    for got, want in zip(out.source_indices, ref_kept):
        assert torch.equal(got, want)
    for got, want in zip(out.pooler_output, ref_features):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_keep_all_is_the_stock_encoder():
    model = tiny.model(use_deft=True, deft_retention_ratio=1.0, compression_method="tome")
    inputs = batch_inputs(tiny.processor(use_deft=True, deft_retention_ratio=1.0, compression_method="tome"))
    with torch.no_grad():
        ours = model.model.get_image_features(inputs["pixel_values"])
        with model.model.compression_disabled():
            stock = model.model.get_image_features(inputs["pixel_values"])
    for a, b in zip(ours.pooler_output, stock.pooler_output):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def all_schedules(n, k, layers):
    """Every schedule that removes exactly n - k patch tokens, at most half the patches per layer."""
    found = []

    def extend(patches, left, done):
        if len(done) == layers:
            if left == 0:
                found.append(done)
            return
        for r in range(min(patches // 2, left) + 1):
            extend(patches - r, left - r, done + [r])

    extend(n, n - k, [])
    return found


def test_schedule_is_the_most_even_feasible_one_and_raises_exactly_when_none_exists():
    for n in range(2, 20):
        for layers in (1, 2, 3):
            for k in range(1, n + 1):
                feasible = all_schedules(n, k, layers)
                if not feasible:
                    with pytest.raises(ValueError, match="smallest reachable count"):
                        tome_schedule(n, k, layers)
                    continue
                schedule = tome_schedule(n, k, layers)
                assert schedule in feasible
                assert max(schedule) == min(max(s) for s in feasible)
    assert tome_schedule(576, 144, 23) == [19] * 22 + [14]  # LLaVA-1.5: 576 -> 144 over 23 layers
    with pytest.raises(ValueError, match="smallest reachable count is 144"):
        tome_schedule(576, 143, 2)
