"""FiCoCo-L inside the model's language model against a slow reference written from its rule (arXiv 2411.17686).

The reference never re-packs anything: it runs every layer on the full sequence with eager attention, takes
layer K-1's attention probabilities of the last prompt token to rank each image's visual tokens, merges every
removed token into its most similar kept tokens one by one in Python loops, and in layers K.. masks the
removed tokens out as keys. The model instead removes them (shorter sequence, shorter cache, SDPA)."""

from __future__ import annotations

import pytest
import tiny
import torch
from test_model import GEN, batch_inputs


def settings(quantile=0.998, rule="average"):
    return dict(
        use_deft=True,
        deft_retention_ratio=0.25,
        compression_method="ficoco_l",
        compression_settings={"ficoco_l_layer": 1, "targets_quantile": quantile, "compress_rule": rule},
    )


def merge_image(h, b, block, scores, k, quantile, rule):
    """Filter / correlate / compress one image (token columns `block` of row b) in place; returns kept j."""
    best = sorted(range(len(block)), key=lambda j: (-scores[j], j))[:k]
    kept = [block[j] for j in sorted(best)]
    removed = [block[j] for j in range(len(block)) if j not in best]
    added = {j: torch.zeros_like(h[b, j]) for j in kept}
    size = {j: 0.0 for j in kept}
    for i in removed:
        sims = torch.stack([torch.nn.functional.cosine_similarity(h[b, i], h[b, j], dim=0) for j in kept])
        threshold = torch.quantile(sims, quantile)
        top = int(sims.argmax())
        targets = [t for t in range(len(kept)) if sims[t] >= threshold or t == top]
        weights = torch.softmax(sims[targets], dim=0)
        for t, w in zip(targets, weights):
            added[kept[t]] += w * h[b, i]
            size[kept[t]] += float(w)
    divide = (lambda j: 1 + size[j]) if rule == "average" else (lambda j: 1.0)  # "sum": the released code
    new = {j: (h[b, j] + added[j]) / divide(j) for j in kept if size[j] > 0}
    for j, value in new.items():
        h[b, j] = value
    return torch.tensor(sorted(best)), removed


def reference(model, inputs, prompt_length=None, cut=1, k=4, quantile=0.998, rule="average"):
    """Logits `(batch, seq, vocab)` and keep `(batch, seq)` and the kept patch indices, per image."""
    lm = model.model.language_model
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, seq = ids.shape
    query = (prompt_length or seq) - 1
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
            if i == cut:  # rank with layer cut-1's eager attention of the last prompt token, then merge
                h = h.clone()
                for b in range(batch):
                    cols = image[b].nonzero().squeeze(1).tolist()
                    for start in range(0, len(cols), 16):
                        block = cols[start : start + 16]
                        scores = [float(attention_row[b, c]) for c in block]
                        kept, removed = merge_image(h, b, block, scores, k, quantile, rule)
                        for c in removed:
                            key_ok[b, c] = False
                        kept_per_image.append(kept)
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
                attention_row = probs[:, :, query].mean(1)  # (batch, seq) the last prompt token's attention
            out = (probs @ v).transpose(1, 2).reshape(batch, seq, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(lm.norm(h))
    return logits, key_ok, kept_per_image


@pytest.mark.parametrize(
    ("quantile", "rule"), [(0.998, "average"), (0.5, "average"), (0.0, "average"), (0.5, "sum")]
)
def test_ficoco_l_matches_slow_reference(quantile, rule):
    model, processor = tiny.model(**settings(quantile, rule)), tiny.processor(**settings(quantile, rule))
    inputs = batch_inputs(processor, n_images=(2, 1))
    ref_logits, ref_keep, ref_kept = reference(model, inputs, quantile=quantile, rule=rule)
    with torch.no_grad():
        out = model(**inputs)
    assert len(out.kept_indices) == 3
    for got, want in zip(out.kept_indices, ref_kept):
        assert torch.equal(got.cpu(), want)
    torch.testing.assert_close(out.logits[ref_keep], ref_logits[ref_keep], rtol=1e-4, atol=1e-5)
    assert out.compression_scores.shape == (3, 16)


def test_merge_differs_from_fastv_drop():
    """Same kept tokens as FastV at the same layer, but the later layers see merged states."""
    fastv = dict(settings(), compression_method="fastv", compression_settings={"fastv_layer": 1})
    model, processor = tiny.model(**settings()), tiny.processor(**settings())
    inputs = batch_inputs(processor, n_images=(2, 1))
    other = tiny.model(**fastv)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        out, dropped = model(**inputs), other(**inputs)
    for a, b in zip(out.kept_indices, dropped.kept_indices):
        assert torch.equal(a, b)
    last = inputs["attention_mask"].shape[1] - 1
    assert not torch.allclose(out.logits[:, last], dropped.logits[:, last])


def test_later_layers_cache_is_shorter_and_decoding_matches_reference():
    model, processor = tiny.model(**settings()), tiny.processor(**settings())
    inputs = batch_inputs(processor, n_images=(2, 1))
    seq = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    # row 0 has 2 images (24 merged away), row 1 one image (12 merged, 12 more padding): width = seq - 24
    assert cache.get_seq_length(0) == seq and cache.get_seq_length(1) == seq - 24
    generated = model.generate(**inputs, **GEN)
    mask = inputs["attention_mask"]
    for step in range(4):  # the reference re-runs everything, deciding with the last PROMPT token
        extended = dict(
            inputs,
            input_ids=generated[:, : seq + step],
            attention_mask=torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1),
        )
        logits, _, _ = reference(model, extended, prompt_length=seq)
        logits[:, -1, [4, 5]] = float("-inf")
        assert torch.equal(logits[:, -1].argmax(-1), generated[:, seq + step])


def test_beam_search_runs():
    model, processor = tiny.model(**settings()), tiny.processor(**settings())
    inputs = batch_inputs(processor)
    beams = model.generate(
        **inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, suppress_tokens=[4, 5]
    )
    assert beams.shape[0] == 4
