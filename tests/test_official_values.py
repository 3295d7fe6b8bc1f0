"""Issue 14: each method's default reproduces its official code, on minimal inputs with hand-checked values.

Each test names the official file it follows and checks the value the official rule gives; where the project
deliberately departs (or fixes an official bug), the test checks the documented setting or the intended value.
"""

from __future__ import annotations

import math

import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from modeling_deft_llava.compressors.method_ficoco_l import FiCoCoLSettings, ficoco_l_merge
from modeling_deft_llava.compressors.method_ficoco_v import (
    FiCoCoVSettings,
    ficoco_v_compress,
    ficoco_v_schedule,
    head_mean_scores,
)
from modeling_deft_llava.compressors.method_recoverable import (
    RecoverableSettings,
    merge_clusters,
    released_cls_attention,
)
from modeling_deft_llava.compressors.method_tome import ToMeSettings
from modeling_deft_llava.compressors.tome_merge import tome_bipartite_merge
from modeling_deft_llava.compressors.vision_attention import cls_attention

# ----------------------------------------------------------------- FiCoCo-V (kawhiiiileo/FiCoCo, FiCoCo_V.py)


def test_ficoco_v_filter_reads_the_head_mean_of_the_logits():
    """3 heads, 2 keys: the mean logit ranks key 1 first, the mean probability key 0 (official: logits)."""
    logits = torch.tensor([[0.0, 10.0], [1.5, 0.0], [1.5, 0.0]]).view(1, 3, 1, 2)  # (batch, heads, T=1, keys)
    assert FiCoCoVSettings().attention_scores == "logits"
    by_logits = head_mean_scores(logits, None, "logits")[0, 0]
    torch.testing.assert_close(by_logits, torch.tensor([1.0, 10.0 / 3]))
    assert by_logits.argmax().item() == 1
    by_probs = head_mean_scores(logits, None, "probabilities")[0, 0]
    assert by_probs.argmax().item() == 0
    torch.testing.assert_close(by_probs.sum(), torch.tensor(1.0))


def test_ficoco_v_logits_ignore_the_size_bias_probabilities_include_it():
    logits = torch.zeros(1, 2, 2, 2)
    bias = torch.tensor([0.0, 2.0]).log().view(1, 1, 1, 2).nan_to_num(neginf=-1e9)  # key 0 masked out
    assert torch.equal(head_mean_scores(logits, bias, "logits"), torch.zeros(1, 2, 2))
    torch.testing.assert_close(head_mean_scores(logits, bias, "probabilities")[0, :, 0], torch.zeros(2))


def test_ficoco_v_starts_at_layer_12_with_42_tokens_in_11_layers():
    """Official: reduce in layer i when i > control_encoding_layer = 11, r = 42; the feature layer is the
    output of layer 22 (LLaVA-1.5's -2 of 24), so layers 12..22 reduce: 576 - 11 * 42 = 114 tokens."""
    start = FiCoCoVSettings().start_layer
    assert start == 12
    assert ficoco_v_schedule(576, 114, 23, start) == [0] * 12 + [42] * 11


def test_ficoco_v_defaults_carry_no_sizes():
    """Official: `_ficoco_info["size"]` stays None, so no proportional attention and unit-size merges."""
    settings = FiCoCoVSettings()
    assert settings.proportional_attention is False and settings.size_weighted_merge is False


def official_ficoco_v_compress(x, merged, target, weight, kept_in_score_order):
    """The official Compress index arithmetic on 1-D tokens: kept rows in score order (CLS, score +inf,
    last), each merged token added at its target's ORIGINAL index into that list, then divided by the size
    accumulated at the same row."""
    rows = [float(x[i]) for i in kept_in_score_order]
    size = [1.0] * len(rows)
    row = target if target < len(rows) else target - 1  # the official `>= max_length -> - r` shift, r = 1
    rows[row] += weight * float(x[merged])
    size[row] += weight
    return [v / s for v, s in zip(rows, size)]


def test_ficoco_v_merges_into_the_intended_token_and_keeps_cls_first():
    """Tokens [0, 10, 20, 30, 40] (0 is CLS), token 2 merged into token 3, kept order [4, 3, 1, 0]:
    official [40, 30, 10, 10] (row 3 of the score-ordered list is CLS); intended: token 3 becomes 25."""
    x = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0]).view(1, 5, 1)
    assert official_ficoco_v_compress(x.flatten(), 2, 3, 1.0, [4, 3, 1, 0]) == [40.0, 30.0, 10.0, 10.0]
    step = ficoco_v_compress(
        x,
        torch.ones(1, 5),
        filtered=torch.tensor([[2]]),
        kept_patches=torch.tensor([[1, 3, 4]]),
        weights=torch.tensor([[[0.0, 1.0, 0.0]]]),
        size_weighted=False,
    )
    assert step.tokens.flatten().tolist() == [0.0, 10.0, 25.0, 40.0]
    assert step.kept_positions.tolist() == [[0, 1, 3, 4]] and step.sizes.tolist() == [[1.0, 1.0, 2.0, 1.0]]


def test_ficoco_v_size_weighted_merge_is_a_setting():
    """With sizes carried (ToMe's rule), a token of size 3 weighs three times as much."""
    x = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 4, 1)
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    args = dict(filtered=torch.tensor([[2]]), kept_patches=torch.tensor([[1, 3]]))
    weights = torch.tensor([[[0.0, 1.0]]])
    unit = ficoco_v_compress(x, size, weights=weights, size_weighted=False, **args)
    weighted = ficoco_v_compress(x, size, weights=weights, size_weighted=True, **args)
    assert unit.tokens.flatten().tolist() == [0.0, 10.0, 25.0]
    assert weighted.tokens.flatten().tolist() == [0.0, 10.0, 22.5]
    assert unit.sizes.tolist() == weighted.sizes.tolist() == [[1.0, 1.0, 4.0]]


# ------------------------------------------------------------ FiCoCo-L (kawhiiiileo/FiCoCo, FiCoCo_L.py)


def test_ficoco_l_compress_rules():
    """Visual tokens [1, 0], [0, 1], [0.1, 1] then 2 text tokens; token 2 is removed and merged into token 1
    (its most similar kept token, weight 1). Released code: the raw sum [0.1, 2.0]; the paper's compression
    (as FiCoCo-V, the default): [0.05, 1.0]."""
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [5.0, 5.0], [6.0, 6.0]]])  # (1, 5, 2)
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0]])
    visual_items = torch.tensor([[0, 0, 0, -1, -1]])
    assert FiCoCoLSettings().compress_rule == "average"
    expected = {"sum": [0.1, 2.0], "average": [0.05, 1.0]}
    for rule, token_1 in expected.items():
        keep, out = ficoco_l_merge(hidden, scores, visual_items, 2, 0.998, rule)
        assert keep.tolist() == [[True, True, False, True, True]]
        torch.testing.assert_close(out[0, 1], torch.tensor(token_1))
        assert torch.equal(out[0, [0, 3, 4]], hidden[0, [0, 3, 4]])  # untouched: bit-exact


# ---------------------------------- Recoverable Compression (banjiuyufen/Recoverable-Compression, clip_encoder.py)


def test_recoverable_cluster_merge_rules():
    """Centre [1, 0], members [0.9, 0.1] and [0.8, 0.2], CLS attention [0.5, 0.3, 0.2]: the released update
    x_c + sum_j a_j x_j gives [1.43, 0.07] (the default); the plain mean [0.9, 0.1]."""
    features = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.8, 0.2]]])
    attention = torch.tensor([[0.5, 0.3, 0.2]])
    slots, members, assign = torch.tensor([[0]]), torch.tensor([[1, 2]]), torch.tensor([[0, 0]])
    assert RecoverableSettings().cluster_merge == "released"
    released = merge_clusters(features, slots, members, assign, attention[:, 1:], normalise=False)
    torch.testing.assert_close(released[0, 0], torch.tensor([1.43, 0.07]))
    mean = merge_clusters(features, slots, members, assign, torch.ones(1, 2), normalise=True)
    torch.testing.assert_close(mean[0, 0], torch.tensor([0.9, 0.1]))


def test_recoverable_released_cls_attention_is_one_full_width_head():
    """The released code: softmax(q_cls . k / sqrt(width)) of the last layer's q_proj / k_proj outputs, all
    heads as one; the model's `cls_attention` (per head, then averaged) differs."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4)
    layer = CLIPEncoderLayer(config).eval()
    x = torch.randn(2, 5, 16)  # CLS + 4 patches
    with torch.no_grad():
        got = released_cls_attention(layer, x)
        normed = layer.layer_norm1(x)
        for b in range(2):
            q = layer.self_attn.q_proj(normed[b, 0])
            logits = [float(q @ layer.self_attn.k_proj(normed[b, j])) / math.sqrt(16) for j in range(5)]
            want = torch.tensor(logits).softmax(0)[1:]
            torch.testing.assert_close(got[b], want)
        assert not torch.allclose(got, cls_attention(layer, x))


# ------------------------------------------------------------------- ToMe (facebookresearch/ToMe, tome/merge.py)


def tome_groups(order: str) -> list[list[int]]:
    """Two merges of r = 1 on CLS [1, 0] + tokens [-3, -1], [-2, -1], [3, 0], [1, 2]; the groups formed."""
    x = torch.tensor([[[1.0, 0.0], [-3.0, -1.0], [-2.0, -1.0], [3.0, 0.0], [1.0, 2.0]]])
    first = tome_bipartite_merge(x, None, 1, protect_first=True, order=order)
    second = tome_bipartite_merge(
        first.tokens, first.sizes, 1, source=first.source, protect_first=True, order=order
    )
    return sorted(row.nonzero().flatten().tolist() for row in second.source[0])


def test_tome_token_order_changes_the_second_merge():
    """Both orders first merge token 2 into token 1. The official [unmerged A, B] order ([0, 4, 1', 3]) then
    pairs 1' with token 4; in place ([0, 1', 3, 4]) token 3 goes to token 4."""
    assert ToMeSettings().token_order == "released"
    assert tome_groups("released") == [[0], [1, 2, 4], [3]]
    assert tome_groups("positions") == [[0], [1, 2], [3, 4]]
