"""FiCoCo-V inside the model's CLIP encoder against a slow loop reference written from the paper
(Han et al., "Filter, Correlate, Compress", arXiv 2411.17686), one image and one token at a time."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from test_model import batch_inputs

from modeling_deft_llava.compressors.method_ficoco_v import ficoco_v_schedule


def ref_layer_attention(layer, x, size, proportional):
    """Eager attention of one CLIP layer on `x` `(T, width)`: output, head-mean logits and probabilities."""
    attn = layer.self_attn
    heads, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(-1, heads, hd).transpose(0, 1)  # (heads, T, hd)
    k = attn.k_proj(x).view(-1, heads, hd).transpose(0, 1)
    v = attn.v_proj(x).view(-1, heads, hd).transpose(0, 1)
    logits = q @ k.transpose(1, 2) * attn.scale
    mean_logits = logits.mean(0)  # taken before the size bias, as the official code
    if proportional:
        logits = logits + size.log()
    probs = logits.softmax(-1)  # (heads, T, T)
    out = (probs @ v).transpose(0, 1).reshape(x.shape[0], -1)
    return attn.out_proj(out), mean_logits, probs.mean(0)


def ref_quantile(values, q):
    """Linear-interpolation quantile of a list of floats."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def ref_reduce(x, size, index, scores, probs, r, cols, s):
    """Filter (on `scores`) -> correlate (on `probs`) -> compress with plain loops.

    `index[t]`: original token (0 = CLS, patch p = p + 1)."""
    t_count = x.shape[0]
    patches = list(range(1, t_count))
    p2p = {i: sum(float(scores[i, j]) for j in patches) / len(patches) for i in patches}
    cls = {i: float(scores[0, i]) for i in patches}
    n_p2p = math.sqrt(sum(v * v for v in p2p.values()))
    n_cls = math.sqrt(sum(v * v for v in cls.values()))
    score = {i: (1 - s.cls_weight) * p2p[i] / n_p2p - s.cls_weight * cls[i] / n_cls for i in patches}
    windows = {}
    for i in patches:  # local penalty: the most redundant token of each window is amplified
        p = int(index[i]) - 1
        windows.setdefault(((p // cols) // s.window, (p % cols) // s.window), []).append(i)
    for members in windows.values():
        top = max(members, key=lambda i: (score[i], -int(index[i])))
        score[top] = score[top] * 2 if score[top] > 0 else score[top] / 2
    filtered = sorted(patches, key=lambda i: -score[i])[:r]  # stable: ties keep the earlier token
    kept = [i for i in patches if i not in filtered]
    mass = size if s.size_weighted_merge else torch.ones_like(size)
    moved = {j: [] for j in kept}  # j -> [(weight, i)]
    for i in filtered:
        sims = {j: float(probs[i, j]) for j in kept}
        threshold = ref_quantile(list(sims.values()), s.targets_quantile)
        best = max(kept, key=lambda j: (sims[j], -j))
        targets = [j for j in kept if sims[j] >= threshold or j == best]
        total = sum(sims[j] for j in targets)
        for j in targets:
            moved[j].append((sims[j] / total, i))
    new_x, new_size = x.clone(), size.clone()
    for j, sources in moved.items():
        if sources:
            total = float(mass[j]) + sum(w * float(mass[i]) for w, i in sources)
            new_x[j] = (mass[j] * x[j] + sum(w * mass[i] * x[i] for w, i in sources)) / total
            new_size[j] = float(size[j]) + sum(w * float(size[i]) for w, i in sources)
    keep = [0] + kept
    return new_x[keep], new_size[keep], index[keep]


def ref_encode(model, pixel_values, num_kept, settings):
    """Per image: embeddings, then every layer: attention -> (FiCoCo-V step) -> MLP; projector on patches."""
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    layers = vision.encoder.layers
    cols = tiny.IMAGE_SIZE // tiny.PATCH
    features, kept = [], []
    for image in pixel_values:
        x = vision.pre_layrnorm(vision.embeddings(image[None]))[0]  # (1 + N, width)
        n = x.shape[0] - 1
        size, index = torch.ones(n + 1), torch.arange(n + 1)
        merged_yet = False
        schedule = ficoco_v_schedule(n, num_kept, len(layers), settings.start_layer)
        for layer, r in zip(layers, schedule):
            proportional = settings.proportional_attention and merged_yet
            out, mean_logits, probs = ref_layer_attention(layer, layer.layer_norm1(x), size, proportional)
            x = x + out
            if settings.attention_scores == "logits":  # official: filter on logits, weights their softmax
                scores, probs = mean_logits, mean_logits.softmax(-1)
            else:
                scores = probs
            if r:
                x, size, index = ref_reduce(x, size, index, scores, probs, r, cols, settings)
                merged_yet = True
            x = x + layer.mlp(layer.layer_norm2(x))
        features.append(model.model.multi_modal_projector(x[1:]))
        kept.append(index[1:] - 1)
    return features, kept


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"targets_quantile": 0.5, "proportional_attention": True},
        {"attention_scores": "probabilities", "size_weighted_merge": True, "proportional_attention": True},
        {"start_layer": 1, "window": 3, "cls_weight": 0.8, "size_weighted_merge": True},
    ],
)
def test_ficoco_v_matches_slow_reference(ratio, extra):
    chosen = {"start_layer": 0, **extra}
    if chosen["start_layer"] == 1 and ratio == 0.25:
        pytest.skip("one reducing layer cannot remove 12 of 16 tokens (half a layer at most)")
    settings = dict(
        use_deft=True,
        deft_retention_ratio=ratio,
        compression_method="ficoco_v",
        compression_settings=chosen,
    )
    model = tiny.model(**settings)
    inputs = batch_inputs(tiny.processor(**settings), n_images=(2, 1))
    k = model.config.num_kept_tokens(tiny.NUM_PATCHES)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"])
        ref_features, ref_kept = ref_encode(model, inputs["pixel_values"], k, model.model.compressor.settings)
    assert [len(f) for f in out.pooler_output] == [k] * 3
    for got, want in zip(out.source_indices, ref_kept):
        assert torch.equal(got, want)
    for got, want in zip(out.pooler_output, ref_features):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_keep_all_is_the_stock_encoder():
    settings = dict(
        use_deft=True,
        deft_retention_ratio=1.0,
        compression_method="ficoco_v",
        compression_settings={"start_layer": 0},
    )
    model = tiny.model(**settings)
    inputs = batch_inputs(tiny.processor(**settings))
    with torch.no_grad():
        ours = model.model.get_image_features(inputs["pixel_values"])
        with model.model.compression_disabled():
            stock = model.model.get_image_features(inputs["pixel_values"])
    for a, b in zip(ours.pooler_output, stock.pooler_output):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_schedule_starts_at_start_layer_and_raises_out_of_range():
    # LLaVA-1.5 (feature layer = output of layer 22): the official r = 42 in the 11 layers 12..22 leaves 114
    assert ficoco_v_schedule(576, 114, 23, 12) == [0] * 12 + [42] * 11
    assert ficoco_v_schedule(576, 144, 23, 12) == [0] * 12 + [40] * 10 + [32]
    assert ficoco_v_schedule(576, 144, 23, 11) == [0] * 11 + [36] * 12
    assert sum(ficoco_v_schedule(16, 4, 2, 0)) == 12
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 22\]"):
        ficoco_v_schedule(576, 144, 23, 23)
    with pytest.raises(ValueError, match="ficoco_v cannot reach 100 of 576"):
        ficoco_v_schedule(576, 100, 23, 22)
