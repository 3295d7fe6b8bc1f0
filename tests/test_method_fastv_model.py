"""FastV inside the model's language model against a slow reference written from the paper (arXiv 2403.06764).

The reference never re-packs anything: it runs every layer on the full sequence with eager attention, takes
layer K-1's attention probabilities of the last prompt token, and in layers K.. simply masks the dropped
visual tokens out as keys. The model instead removes them (shorter sequence, shorter cache, SDPA)."""

from __future__ import annotations

import tiny
import torch
from test_model import GEN, batch_inputs

SETTINGS = dict(
    use_deft=True,
    deft_retention_ratio=0.25,
    compression_method="fastv",
    compression_settings={"fastv_layer": 1},
)


def reference(model, inputs, cut=1, k=4):
    """Logits `(batch, seq, vocab)` at the kept positions and the kept patch indices, per image."""
    lm = model.model.language_model
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, seq = ids.shape
    with torch.no_grad():
        with model.model.compression_disabled():  # all N rows, plain LLaVA features
            feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        embeds = lm.embed_tokens(ids)
        image = ids == model.config.image_token_index
        embeds[image] = torch.cat(feats)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cos_sin = lm.rotary_emb(embeds, positions)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        key_ok = valid.clone()
        h = embeds
        kept_per_image, attention_row = [], None
        for i, layer in enumerate(lm.layers):
            if i == cut:  # rank with layer cut-1's eager attention of the last token
                for b in range(batch):
                    cols = image[b].nonzero().squeeze(1).tolist()
                    for start in range(0, len(cols), 16):
                        block = cols[start : start + 16]
                        scores = [float(attention_row[b, c]) for c in block]
                        best = sorted(range(16), key=lambda j: (-scores[j], j))[:k]
                        for j in range(16):
                            if j not in best:
                                key_ok[b, block[j]] = False
                        kept_per_image.append(torch.tensor(sorted(best)))
            mask = (causal & key_ok[:, None, :]) | torch.eye(seq, dtype=torch.bool)  # (batch, seq, seq)
            normed = layer.input_layernorm(h)
            attn = layer.self_attn
            q = attn.q_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            kk = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
            cos, sin = (t.unsqueeze(1) for t in cos_sin)
            rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1)  # noqa: E731
            q, kk = q * cos + rot(q) * sin, kk * cos + rot(kk) * sin
            groups = q.shape[1] // kk.shape[1]
            kk, v = kk.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            logits = (q @ kk.transpose(-1, -2)) * attn.scaling
            probs = logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1)  # (batch, heads, seq, seq)
            if i == cut - 1:
                attention_row = probs[:, :, -1].mean(1)  # (batch, seq) the last token's attention
            out = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(lm.norm(h))
    return logits, key_ok, kept_per_image


def test_fastv_matches_slow_reference():
    model, processor = tiny.model(**SETTINGS), tiny.processor(**SETTINGS)
    inputs = batch_inputs(processor, n_images=(2, 1))
    ref_logits, ref_keep, ref_kept = reference(model, inputs)
    with torch.no_grad():
        out = model(**inputs)
    assert len(out.kept_indices) == 3
    for got, want in zip(out.kept_indices, ref_kept):
        assert torch.equal(got.cpu(), want)
    torch.testing.assert_close(out.logits[ref_keep], ref_logits[ref_keep], rtol=1e-4, atol=1e-5)
    assert out.compression_scores.shape == (3, 16)


def test_later_layers_cache_is_shorter_and_decoding_matches_reference():
    model, processor = tiny.model(**SETTINGS), tiny.processor(**SETTINGS)
    inputs = batch_inputs(processor, n_images=(2, 1))
    seq = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    # row 0 has 2 images (24 dropped), row 1 one image (12 dropped, 12 more padding): width = seq - 24
    assert cache.get_seq_length(0) == seq and cache.get_seq_length(1) == seq - 24
    generated = model.generate(**inputs, **GEN)
    mask = inputs["attention_mask"]
    for step in range(4):  # the reference re-runs everything, ranking with the last PROMPT token
        extended = dict(
            inputs,
            input_ids=generated[:, : seq + step],
            attention_mask=torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1),
        )
        logits, _, _ = reference_with_prompt(model, extended, seq)
        logits[:, -1, [4, 5]] = float("-inf")
        assert torch.equal(logits[:, -1].argmax(-1), generated[:, seq + step])


def reference_with_prompt(model, inputs, prompt_length):
    """`reference` ranking with token `prompt_length - 1` (generated tokens follow the prompt)."""
    seq = inputs["input_ids"].shape[1]
    if seq == prompt_length:
        return reference(model, inputs)
    # rank on the prompt alone, then keep that choice for the longer sequence
    _, keep_prompt, kept = reference(
        model,
        {
            **inputs,
            "input_ids": inputs["input_ids"][:, :prompt_length],
            "attention_mask": inputs["attention_mask"][:, :prompt_length],
        },
    )
    return reference_fixed(model, inputs, keep_prompt), None, kept


def reference_fixed(model, inputs, keep_prompt, cut=1):
    """Logits with the dropped keys of `keep_prompt` masked out of layers >= cut (generated tokens kept)."""
    lm = model.model.language_model
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, seq = ids.shape
    key_ok = torch.cat([keep_prompt, valid[:, keep_prompt.shape[1] :]], 1)
    with torch.no_grad():
        with model.model.compression_disabled():
            feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        embeds = lm.embed_tokens(ids)
        embeds[ids == model.config.image_token_index] = torch.cat(feats)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        h = embeds
        for i, layer in enumerate(lm.layers):
            ok = valid if i < cut else key_ok
            mask = ((causal & ok[:, None, :]) | torch.eye(seq, dtype=torch.bool))[:, None]
            h = layer(
                h,
                attention_mask=mask,
                position_embeddings=lm.rotary_emb(h, positions),
                position_ids=positions,
            )
        return model.lm_head(lm.norm(h))


def test_beam_search_runs():
    model, processor = tiny.model(**SETTINGS), tiny.processor(**SETTINGS)
    inputs = batch_inputs(processor)
    beams = model.generate(
        **inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, suppress_tokens=[4, 5]
    )
    assert beams.shape[0] == 4
