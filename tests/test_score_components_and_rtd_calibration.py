"""`deft_score_components` (each score component alone at inference) and `calibrate_thresholds` (RTD rule)."""

from __future__ import annotations

import pytest
import tiny
import torch
from modeling_deft_llava.configuration import DeftSettings

from modeling_deft_llava import DeftLlavaConfig, DeFTModule
from modeling_deft_llava.deft.score_mixer import normalize_per_sample
from modeling_deft_llava.deft.token_dictionary import calibrate_thresholds, is_uncertain, uncertainty


def small(**kw):
    torch.manual_seed(0)
    module = DeFTModule(token_dim=16, semantic_dim=12, **kw)
    with torch.no_grad():  # distinct mixture weights, so that dropping a component changes the scores
        module.score_mixer.mixture_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    return module


# ----------------------------------------------------------------------------- the setting
@pytest.mark.parametrize(
    "value, error, message",
    [
        ("group", TypeError, "list of component names"),
        (5, TypeError, "list of component names"),
        ([], ValueError, "at least one"),
        (["group", "colour"], ValueError, "unknown component"),
        (["group", "group"], ValueError, "twice"),
    ],
)
def test_bad_score_components_are_refused(value, error, message):
    with pytest.raises(error, match=message):
        DeftSettings(deft_score_components=value)
    with pytest.raises(error, match=message):
        DeftLlavaConfig(deft_score_components=value)
    with pytest.raises(error, match=message):
        DeFTModule(token_dim=8, semantic_dim=4, score_components=value)


def test_default_is_every_component_and_round_trips_through_json(tmp_path):
    assert DeftSettings().deft_score_components is None
    config = tiny.config(use_deft=True, deft_score_components=["semantic", "group"])
    config.save_pretrained(tmp_path)
    assert DeftLlavaConfig.from_pretrained(tmp_path).deft_score_components == ["semantic", "group"]


def test_one_component_alone_ranks_by_that_component():
    tokens = torch.randn(2, 16, 16)
    for name, key in (("semantic", "s_sem"), ("group", "s_group")):
        out = small(score_components=[name])(tokens, spatial_shape=(4, 4), retention_ratio=0.25)
        assert set(out.scoring_info["mixture_weights"]) == {name}
        assert torch.equal(out.scores, out.scoring_info[key])  # weight 1: the normalised component itself
    mixed = small()(tokens, spatial_shape=(4, 4), retention_ratio=0.25)
    alone = small(score_components=["group"])(tokens, spatial_shape=(4, 4), retention_ratio=0.25)
    assert not torch.equal(mixed.scores, alone.scores)


def test_feedback_alone_needs_gradients():
    tokens = torch.randn(2, 16, 16)
    module = small(score_components=["feedback"])
    with pytest.raises(ValueError, match="feedback score exists only with task_loss or token_gradients"):
        module(tokens, spatial_shape=(4, 4))
    grads = torch.randn(2, 16, 16)
    out = module(tokens, spatial_shape=(4, 4), token_gradients=grads, retention_ratio=0.25)
    assert set(out.scoring_info["mixture_weights"]) == {"feedback"}
    assert torch.equal(out.scores, out.scoring_info["s_fb"])
    assert out.feedback_loss is not None  # the training-time term alone (no inference component listed)


def test_listing_every_component_is_bit_identical_to_the_default():
    tokens = torch.randn(2, 16, 16, requires_grad=True)
    grads = torch.randn(2, 16, 16)
    a = small()(tokens, spatial_shape=(4, 4), token_gradients=grads)
    b = small(score_components=["semantic", "feedback", "group"])(
        tokens, spatial_shape=(4, 4), token_gradients=grads
    )
    assert torch.equal(a.scores, b.scores) and torch.equal(a.feedback_loss, b.feedback_loss)
    assert torch.equal(a.kept_indices, b.kept_indices)


def test_model_reads_the_setting_at_call_time_and_compression_off_ignores_it():
    model = tiny.model(use_deft=True, deft_retention_ratio=0.25)
    processor = tiny.processor(use_deft=True, deft_retention_ratio=0.25)
    inputs = processor(images=tiny.images(2), text=[tiny.prompt(1)] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.model.deft.score_mixer.mixture_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        default = model(**inputs)
        model.config.deft_score_components = ["semantic", "group"]  # = the default at inference
        listed = model(**inputs)
        model.config.deft_score_components = ["semantic"]
        semantic = model(**inputs)
    assert torch.equal(default.logits, listed.logits)
    assert torch.equal(default.compression_scores, listed.compression_scores)
    assert set(semantic.mixture_weights) == {"semantic"}
    assert not torch.equal(default.compression_scores, semantic.compression_scores)
    off = tiny.model(use_deft=False)
    full_inputs = tiny.processor(use_deft=False)(
        images=tiny.images(2), text=[tiny.prompt(1)] * 2, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        reference = off(**full_inputs).logits
        off.config.deft_score_components = ["group"]
        assert torch.equal(off(**full_inputs).logits, reference)


# ----------------------------------------------------------------------------- RTD calibration
def test_calibration_hits_the_target_share_and_the_rule_agrees():
    torch.manual_seed(0)
    logits = torch.randn(4000, 10) * 2
    entropy, confidence = uncertainty(logits)
    for share in (0.0, 0.1, 0.25, 0.5, 1.0):
        cal = calibrate_thresholds(entropy, confidence, share)
        flagged = is_uncertain(logits, cal["entropy_threshold"], cal["confidence_threshold"])
        assert int(flagged.sum()) == round(cal["share"] * len(logits))  # the model's rule flags the same ones
        assert cal["share"] <= share + 1e-9 and share - cal["share"] < 0.01
        assert 0.0 <= cal["entropy_threshold"] <= 1.0 and 0.0 <= cal["confidence_threshold"] <= 1.0


@pytest.mark.parametrize("statistic", ["entropy", "confidence"])
def test_calibration_on_one_statistic_disables_the_other(statistic):
    torch.manual_seed(1)
    entropy, confidence = uncertainty(torch.randn(1000, 10))
    cal = calibrate_thresholds(entropy, confidence, 0.2, statistics=(statistic,))
    if statistic == "entropy":
        assert cal["confidence_threshold"] == 0.0
        assert abs((entropy > cal["entropy_threshold"]).float().mean().item() - 0.2) < 0.01
    else:
        assert cal["entropy_threshold"] == 1.0
        assert abs((confidence < cal["confidence_threshold"]).float().mean().item() - 0.2) < 0.01


def test_calibration_reports_ties_it_cannot_split():
    # every distribution uniform: nothing separates them, so a 30% target flags none (never more than asked)
    entropy, confidence = uncertainty(torch.zeros(100, 10))
    cal = calibrate_thresholds(entropy, confidence, 0.3)
    assert cal["share"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_share=1.5), "target_share"),
        (dict(target_share=True), "target_share"),
        (dict(target_share=0.2, statistics=("margin",)), "statistics"),
        (dict(target_share=0.2, statistics=()), "statistics"),
    ],
)
def test_calibration_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_thresholds(torch.rand(10), torch.rand(10), **kwargs)
    with pytest.raises(ValueError, match="one length"):
        calibrate_thresholds(torch.rand(10), torch.rand(9), 0.2)
    with pytest.raises(ValueError, match="finite"):
        calibrate_thresholds(torch.tensor([float("nan")]), torch.rand(1), 0.2)


def test_normalize_is_what_one_component_alone_ranks_by():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    assert torch.equal(normalize_per_sample(scores, None), torch.tensor([[1.0, 0.0, 0.5]]))
