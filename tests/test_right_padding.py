"""A right-padded batch (the training collator's padding) equals each row alone, for every method (issue 25).

Before: FastV and FiCoCo-L ranked the visual tokens of every row with the attention of the batch's last
column, a pad token in the shorter row (logits off by 0.28)."""

from __future__ import annotations

import pytest
import tiny
import torch
from test_model import ALWAYS_UNCERTAIN, NEVER_UNCERTAIN
from test_model_methods import METHODS, method_settings

QUESTIONS = ("what is in the picture ?", "a ?")


SETTINGS = {m: method_settings(m) for m in METHODS}
SETTINGS["deft_hybrid"] = dict(method_settings("deft"), deft_inference_mode="hybrid")
# adaptive reads each row's next-token distribution at its last real prompt token
SETTINGS["deft_adaptive_never"] = dict(
    method_settings("deft"), deft_inference_mode="adaptive", **NEVER_UNCERTAIN
)
SETTINGS["deft_adaptive_always"] = dict(
    method_settings("deft"), deft_inference_mode="adaptive", **ALWAYS_UNCERTAIN
)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_right_padded_batch_equals_each_row_alone(name):
    settings = SETTINGS[name]
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    processor.tokenizer.padding_side = "right"
    texts = [tiny.prompt(1, q) for q in QUESTIONS]
    batch = processor(images=tiny.images(2), text=texts, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"][:, -1].all())  # one row is right-padded
    with torch.no_grad():
        together = model(**batch)
    # the rows the language model saw: re-packing methods hand back their compacted (left-padded) mask
    seen = (
        together.deft_attention_mask if together.deft_attention_mask is not None else batch["attention_mask"]
    )
    mask = seen.bool()
    for row in range(2):
        alone = processor(images=tiny.images(2)[row : row + 1], text=[texts[row]], return_tensors="pt")
        with torch.no_grad():
            single = model(**alone)
        torch.testing.assert_close(together.logits[row][mask[row]], single.logits[0], rtol=0, atol=1e-5)
