"""Recoverable Compression inside the model against a hand-built reference (arXiv 2409.01179).

The reference takes one sample at a time, without padding: the plain LLaVA features (all N), the CLS token of
the feature layer through the projector, the CLS attention (by default the released code's: the last encoder
layer as one full-width head; it ranks patches and weighs the released cluster merge), the model's own input embeddings of its row's text (before and after the image), the standalone compressor, and then the stock language model fed the K tokens of each image at the positions of
their representative patches (the text after an image resumes after all N)."""

from __future__ import annotations

import pytest
import tiny
import torch
from test_model import GEN, batch_inputs

from modeling_deft_llava.compressors.compression_registry import build_compressor
from modeling_deft_llava.compressors.method_recoverable import released_cls_attention
from modeling_deft_llava.compressors.token_compressor import CompressionContext
from modeling_deft_llava.compressors.vision_attention import cls_attention

SETTINGS = dict(use_deft=True, deft_retention_ratio=0.25, compression_method="recoverable")
IMAGE = 4  # <image> id in the tiny vocabulary


def reference_last_logits(model, ids, pixel_values, merge, attention_layer="released", merge_space="vision"):
    """Last-position logits and kept indices for ONE unpadded sample `ids` `(seq,)`.

    `merge_space="vision"` (the released order): the compressor ranks the projected features and sums its
    merged tokens from the projector's input (the feature layer's patch states), which the projector maps."""
    lm = model.model.language_model
    vision = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    with torch.no_grad(), model.model.compression_disabled():
        feats = model.model.get_image_features(pixel_values)
        cls = model.model.multi_modal_projector(feats.hidden_states[-1][:, :1])[:, 0]  # (images, D)
        # the tiny feature layer is -1: the last encoder layer, fed hidden_states[-2]
        layer_input = vision(pixel_values, output_hidden_states=True).hidden_states[
            -2
        ]  # (images, 1 + N, width)
        attention = cls_attention(vision.encoder.layers[-1], layer_input)  # (images, N)
        if attention_layer == "released":  # the last layer as one full-width head, whatever the feature layer
            attention = released_cls_attention(vision.encoder.layers[-1], layer_input)
        embeds = lm.embed_tokens(ids)  # (seq, D)
        compressor = build_compressor(
            "recoverable", embeds.shape[-1], {"cluster_merge": merge, "cls_attention_layer": attention_layer}
        )
        pieces, positions, kept_all, pos, t, item = [], [], [], 0, 0, 0
        while t < len(ids):
            if ids[t] != IMAGE:
                pieces.append(embeds[t : t + 1])
                positions.append(pos)
                pos, t = pos + 1, t + 1
                continue
            after = [u for u in range(len(ids)) if ids[u] != IMAGE]  # the question: the row's text
            context = CompressionContext(
                spatial_shape=(4, 4),
                num_kept=4,
                cls_embedding=cls[item : item + 1],
                cls_attention=attention[item : item + 1],
                text_embeds=embeds[after][None],
            )
            if merge_space == "vision":
                patches = feats.hidden_states[-1][item : item + 1, 1:]  # (1, N, width) the projector's input
                out = compressor.compress_merging_vision(
                    feats.pooler_output[item][None], patches, model.model.multi_modal_projector, context
                )
            else:
                out = compressor(feats.pooler_output[item][None], context)
            pieces.append(out.tokens[0])
            positions += [pos + int(j) for j in out.kept_indices[0]]
            kept_all.append(out.kept_indices[0])
            pos, t, item = pos + 16, t + 16, item + 1
        hidden = lm(
            inputs_embeds=torch.cat(pieces)[None],
            position_ids=torch.tensor([positions]),
            attention_mask=torch.ones(1, len(positions), dtype=torch.long),
        ).last_hidden_state
        return model.lm_head(hidden[0, -1]), kept_all


@pytest.mark.parametrize("merge_space", ["vision", "projected"])
@pytest.mark.parametrize("merge", ["released", "mean"])
def test_recoverable_matches_hand_built_reference(merge, merge_space):
    settings = dict(SETTINGS, compression_settings={"cluster_merge": merge, "merge_space": merge_space})
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    questions = ("what is in the picture ?", "a cat and a dog ?")
    inputs = batch_inputs(processor, n_images=(2, 1), questions=questions)
    assert ((inputs["input_ids"] == IMAGE).sum(1) == torch.tensor([32, 16])).all()  # N placeholders
    with torch.no_grad():
        out = model(**inputs)
    assert out.deft_attention_mask is not None  # rows were dropped and the batch re-packed
    first_image = 0
    for b, n_images in enumerate((2, 1)):
        valid = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][valid]
        pixels = inputs["pixel_values"][first_image : first_image + n_images]
        logits, kept = reference_last_logits(model, ids, pixels, merge, merge_space=merge_space)
        torch.testing.assert_close(out.logits[b, -1], logits, rtol=1e-4, atol=1e-5)
        for got, want in zip(out.kept_indices[first_image : first_image + n_images], kept):
            assert torch.equal(got, want)
        first_image += n_images


def test_feature_layer_cls_attention_is_a_setting():
    # the default is the released code's CLS attention (last layer, one full-width head); the feature layer's
    # head-averaged attention is a setting, and it reaches the method inside the model
    assert tiny.model(**SETTINGS).model.compressor.settings.cls_attention_layer == "released"
    settings = dict(SETTINGS, compression_settings={"cls_attention_layer": "feature_layer"})
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = batch_inputs(processor, questions=("what is in the picture ?", "a cat and a dog ?"))
    with torch.no_grad():
        out = model(**inputs)
        vision = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
        layer_input = vision(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        released = released_cls_attention(vision.encoder.layers[-1], layer_input)
    assert not torch.allclose(
        released, cls_attention(vision.encoder.layers[-1], layer_input)
    )  # the setting differs from the default
    for b in range(2):
        valid = inputs["attention_mask"][b].bool()
        logits, kept = reference_last_logits(
            model,
            inputs["input_ids"][b][valid],
            inputs["pixel_values"][b : b + 1],
            "released",
            "feature_layer",
        )
        torch.testing.assert_close(out.logits[b, -1], logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(out.kept_indices[b], kept[0])


def test_choice_depends_on_its_own_prompt_only():
    # another row's question does not move this row's choice; generated tokens after the prompt do not either
    model, processor = tiny.model(**SETTINGS), tiny.processor(**SETTINGS)
    with torch.no_grad():
        a = model(**batch_inputs(processor, questions=("what is in the picture ?", "a cat ?")))
        b = model(**batch_inputs(processor, questions=("what is in the picture ?", "7 9 and 3 ?")))
    assert torch.equal(a.kept_indices[0], b.kept_indices[0])
    inputs = batch_inputs(processor)
    generated = model.generate(**inputs, **GEN)
    longer = dict(inputs, input_ids=generated, attention_mask=torch.ones_like(generated))
    longer["attention_mask"][:, : inputs["input_ids"].shape[1]] = inputs["attention_mask"]
    with torch.no_grad():
        fixed = model(**longer, deft_prompt_length=inputs["input_ids"].shape[1])
        prefill = model(**inputs)
    for got, want in zip(fixed.kept_indices, prefill.kept_indices):
        assert torch.equal(got, want)
