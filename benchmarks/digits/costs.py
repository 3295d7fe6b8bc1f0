"""What one prefill really costs: visual tokens each layer saw, FLOPs and wall time (digits benchmark).

FLOPs = the matmuls and convolutions `torch.utils.flop_counter.FlopCounterMode` counts in one real prefill
(vision tower, projector, the compressor's own scoring, language model, `logits_to_keep=1` head) + attention
scores and weighted sums, which the counter does not see on CPU (SDPA): `4 * seq_len ** 2 * hidden` per layer
and sample, from the sequence length each vision and language layer was really called with (forward pre-hooks).
So a method that prunes inside the language model (FastV, FiCoCo-L) pays for every token in the layers before
its cut, and a method that prunes inside the vision tower (ToMe, FiCoCo-V) is credited for it. Padding of the
batch is counted as spent, the same for every method (the prompts are the same).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def _layer_lengths(layers, sink: list[int]):
    """Forward pre-hooks recording the sequence length each layer's attention of `layers` is called with
    (the attention module, not the layer: ToMe and FiCoCo-V run a CLIP layer's parts themselves)."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (batch, seq_len, hidden)
        sink.append(int(hidden.shape[1]))

    return [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]


@torch.no_grad()
def prefill_costs(model, batch: dict, repeats: int = 3) -> dict:
    """Per-sample cost of `model`'s prefill on `batch` (a processor batch with `pixel_values` or
    `pixel_values_videos`).

    Returns `prefill_flops` (per sample), `lm_seq_len_per_layer` / `vision_seq_len_per_layer` (lengths the
    layers were called with), `mean_visual_tokens_per_lm_layer` (the language model's visual tokens averaged
    over its layers: K for a method that compresses before the language model, more for in-model pruning) and
    `prefill_s` (median wall time of `repeats` timed prefills of the whole batch after one warm-up) and
    `kv_cache_bytes_per_sample` (the cache the prefill leaves, `kv_cache_bytes`, over the batch)."""
    tower = model.model.vision_tower
    vision_layers = next(m for name, m in tower.named_modules() if name.endswith("encoder.layers"))
    text_layers = model.model.language_model.layers
    lm_lens: list[int] = []
    vision_lens: list[int] = []
    hooks = _layer_lengths(text_layers, lm_lens) + _layer_lengths(vision_layers, vision_lens)
    try:
        with FlopCounterMode(display=False) as counter:
            model(**batch, use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    b = batch["input_ids"].shape[0]
    text_hidden = model.config.text_config.hidden_size
    vision_hidden = model.config.vision_config.hidden_size
    attention = sum(4 * n * n * text_hidden for n in lm_lens) + sum(
        4 * n * n * vision_hidden for n in vision_lens
    )
    # prompt text (padded) around the image; a compressing processor writes K placeholders, not N
    placeholders = batch["input_ids"][0] == model.config.image_token_id
    if getattr(model.config, "video_token_index", None) is not None:
        placeholders |= batch["input_ids"][0] == model.config.video_token_index
    text_tokens = int((~placeholders).sum())
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = model(**batch, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return {
        "prefill_flops": (counter.get_total_flops() + b * attention) / b,
        "lm_seq_len_per_layer": lm_lens,
        "vision_seq_len_per_layer": vision_lens,
        "mean_visual_tokens_per_lm_layer": statistics.mean(n - text_tokens for n in lm_lens),
        "prefill_s": statistics.median(times[1:]),
        "prefill_batch": b,
        "kv_cache_bytes_per_sample": kv_cache_bytes(out.past_key_values) / b,
    }


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values a prefill left in its cache (every layer; padding included)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
