"""The text-context benchmark's reference methods (issue 16): FastV's attention rule on a `<context>`
(`benchmarks/text_attention_rules.py`, inside the decoder and before it) and kvpress's KV compression after the
prefill (`benchmarks/text_kvpress.py`). They act through the model's hooks, so they must keep the model's
guarantees: exactly K context tokens per sample, batch rows equal single runs, the whole context kept = the
model's own logits."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import text_context as tc
from benchmarks.text_attention_rules import PLACEMENTS, keep_top_per_row, text_attention_rule
from benchmarks.text_kvpress import run_one, split_prompt
from modeling_deft_llava.deft.topk_selector import kept_counts

TOKENIZER = tc.build_tokenizer()


def model(layers=3):
    return tc.build_model(TOKENIZER, layers=layers).eval()


def batch(facts=(6, 3)):
    """Prompts with contexts of different lengths: left padding differs between rows."""
    data = [tc.examples(1, f, "test", seed=10 + i)[0] for i, f in enumerate(facts)]
    ids, mask, _ = tc.encode(TOKENIZER, data)
    return data, ids, mask


def test_keep_top_per_row_keeps_each_rows_count_among_members_ties_to_the_earlier():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9], [1.0, 0.2, 0.2, 0.2, 0.0]])
    member = torch.tensor([[True, False, True, True, True], [False, True, True, True, True]])
    keep = keep_top_per_row(scores, member, torch.tensor([2, 2]))
    assert keep.tolist() == [
        [True, False, False, False, True],
        [False, True, True, False, False],
    ]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("layer", [1, 2])
def test_attention_rule_keeps_k_context_tokens_and_batch_rows_equal_single_runs(placement, layer):
    net = model()
    data, ids, mask = batch()
    ratio = 0.3
    with torch.no_grad(), text_attention_rule(net, placement, ratio, layer) as record:
        logits = net(input_ids=ids, attention_mask=mask).logits[:, -1]
        kept = record["kept"]
        singles = []
        for example in data:
            one_ids, one_mask, _ = tc.encode(TOKENIZER, [example])
            singles.append((net(input_ids=one_ids, attention_mask=one_mask).logits[0, -1], record["kept"][0]))
    for row, (single, single_kept) in enumerate(singles):
        n = 7 * (6, 3)[row]  # 7 tokens a fact
        assert len(kept[row]) == int(kept_counts(torch.tensor([n]), ratio)[0])
        # the same context tokens (input positions shift with the row's left padding)
        pad = int((~mask[row].bool()).sum())
        assert (kept[row] - pad).tolist() == single_kept.tolist()
        torch.testing.assert_close(logits[row], single, atol=2e-5, rtol=1e-4)
    assert net.model.deft.__dict__.get("run_language_model") is None  # the hook is restored
    assert net.config.deft_text_retention_ratio is None


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_attention_rule_that_keeps_the_whole_context_computes_the_models_own_logits(placement):
    net = model()
    _, ids, mask = batch()
    with torch.no_grad():
        reference = net(input_ids=ids, attention_mask=mask).logits[:, -1]
        with text_attention_rule(net, placement, 1.0, 1) as record:
            logits = net(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
    assert [len(k) for k in record["kept"]] == [42, 21]


def test_both_placements_rank_alike_at_layer_1_and_inside_costs_more_layers():
    net = model()
    _, ids, mask = batch()
    records = {}
    for placement in PLACEMENTS:
        with torch.no_grad(), text_attention_rule(net, placement, 0.25, 1) as record:
            net(input_ids=ids, attention_mask=mask)
        records[placement] = record
    inside, before = records["fastv"], records["fastv_pre"]
    assert [k.tolist() for k in inside["kept"]] == [k.tolist() for k in before["kept"]]
    assert all(a > b for a, b in zip(inside["token_layers"], before["token_layers"]))
    assert all(a > b for a, b in zip(inside["tokens_seen"], before["tokens_seen"]))


def test_attention_rule_refuses_bad_arguments():
    net = model(layers=2)
    with pytest.raises(ValueError, match="placement must be one of"):
        with text_attention_rule(net, "fastv_late", 0.5, 1):
            pass
    with pytest.raises(ValueError, match=r"layer must be in \[1, 1\]"):
        with text_attention_rule(net, "fastv", 0.5, 2):
            pass
    net.config.use_deft = False
    with pytest.raises(ValueError, match="use_deft=True"):
        with text_attention_rule(net, "fastv", 0.5, 1):
            pass


def test_kvpress_path_without_a_press_computes_the_models_own_logits():
    """The kvpress reference splits a prompt into prefill (template + context) and question and continues the
    positions; without a press that must be the model's forward over the whole prompt."""
    net = model()
    data, _, _ = batch((6,))
    ids, mask, _ = tc.encode(TOKENIZER, data)
    prefill, question, n = split_prompt(ids[0], net.config, TOKENIZER.convert_tokens_to_ids("what"))
    assert n == 42 and TOKENIZER.convert_ids_to_tokens(int(question[0])) == "what"
    assert len(prefill) + len(question) == ids.shape[1] - 2  # the two markers dropped
    with torch.no_grad():
        logits, kv = run_one(net, prefill, question, None)
        reference = net(input_ids=ids, attention_mask=mask).logits[0, -1]
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
    assert kv == len(prefill)


@pytest.mark.skipif(importlib.util.find_spec("kvpress") is None, reason="kvpress is not installed")
def test_kvpress_press_prunes_the_prefill_to_the_budget():
    from benchmarks.text_kvpress import PRESSES

    net = model()
    data, ids, _ = batch((6,))
    prefill, question, n = split_prompt(ids[0], net.config, TOKENIZER.convert_tokens_to_ids("what"))
    n_kept = int(kept_counts(torch.tensor([n]), 0.25)[0]) + len(prefill) - n
    for name, make in PRESSES.items():
        with torch.no_grad():
            _, kv = run_one(net, prefill, question, make(1 - (n_kept + 0.5) / len(prefill)))
        assert kv == n_kept, name
