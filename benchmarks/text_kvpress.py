"""kvpress (NVIDIA, https://github.com/NVIDIA/kvpress) as a reference for the text-context benchmark: compress the
context's KV cache after a full prefill, instead of dropping context tokens before the language model.

kvpress is imported only when installed (it is not a dependency of the project; `requirements-kvpress.txt`
pins the environment it was measured in); without it the benchmark records why and skips these rows. No
kvpress code is copied: its presses are used through their public API (`with press(model): ...`).

How a prompt runs, as kvpress's own pipeline (`KVPressTextGenerationPipeline`) does it:
1. prefill the part BEFORE the question (the chat template's "USER :" and the context tokens; the
   `<context>` markers dropped, as the model drops them) through the DeftLlava's own language model, with
   the press active: kvpress hooks the attention layers of `model.model.language_model` (it warns that
   `DeftLlavaForConditionalGeneration` is not a tested architecture) and prunes each layer's KV right after
   that layer's prefill;
2. run the question ("what is the digit of <key> ? ASSISTANT :") on the pruned cache, continuing the
   original positions (the pipeline's `position_ids = context_length + arange`): the question is never
   compressed and every press is question-agnostic (SnapKV's observation window is the last tokens of the
   context, not the question);
3. the answer is the argmax at the question's last token.

Budget: the same KV entries per layer as the other methods keep tokens: the press keeps
`n_kept = K + prefix` of the `n + prefix` prefill entries (K = `kept_counts(n, ratio)` context tokens, prefix =
the template tokens before the context, which the other methods never drop), through kvpress's
`int(k_len * (1 - compression_ratio))` with `compression_ratio = 1 - (n_kept + 0.5) / k_len`. The press may
spend that budget on any prefill entry, per KV head. Every token passes through every layer once (tokens
seen = the whole prompt); only the cache the question reads is smaller.
"""

from __future__ import annotations

import math
import time
import traceback

import numpy as np
import torch

from modeling_deft_llava.deft.topk_selector import kept_counts
from modeling_deft_llava.text_context import TextContext

PRESSES = {
    "snapkv": lambda ratio: _kvpress().SnapKVPress(compression_ratio=ratio, window_size=SNAPKV_WINDOW),
    "expected_attention": lambda ratio: _kvpress().ExpectedAttentionPress(compression_ratio=ratio),
    "knorm": lambda ratio: _kvpress().KnormPress(compression_ratio=ratio),
    "streaming_llm": lambda ratio: _kvpress().StreamingLLMPress(compression_ratio=ratio),
}
KVPRESS_NOTE = (
    "kvpress 0.5.2 is the newest release pip installs next to transformers 5.23.0 (0.5.3-0.5.5 require "
    "transformers<5.3). Its presses fail on transformers 5.23 as its own pipeline calls them (prefill "
    "model.model(input_ids, past_key_values=cache)), on a stock LlamaForCausalLM as on DeftLlava: "
    "KeyError: 'cache_position' in BasePress.forward_hook. The benchmark passes cache_position=arange(prefill) "
    "to the prefill, which the decoder layers hand to the attention hook; then every press runs."
)
SNAPKV_WINDOW = (
    4  # kvpress's default (64) is longer than the whole prefill here; kept always, inside the budget
)


def _kvpress():
    import kvpress

    return kvpress


def split_prompt(ids: torch.Tensor, config, question_marker: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One prompt `(seq,)` (no padding) -> the prefill ids before the question (markers dropped), the question
    ids (from `question_marker`'s first occurrence after the context on), and the context token count."""
    context = TextContext.find(
        ids[None], None, config.context_start_token_index, config.context_end_token_index
    )
    after = int(context.index[0, -1]) + 1  # first position after the last context token
    where = (ids[after:] == question_marker).nonzero().flatten()
    split = after + int(where[0])
    prefill = ids[:split][~context.markers[0, :split]]
    return prefill, ids[split:], int(context.tokens.sum())


@torch.no_grad()
def run_one(model, prefill, question, press):
    """Logits `(vocab,)` at the question's last token, and the KV entries per layer after the prefill."""
    from transformers import DynamicCache

    language_model = model.model.language_model
    embed = model.get_input_embeddings()
    cache = DynamicCache(config=language_model.config)
    context = press(model) if press is not None else _null()
    with context:
        # kvpress 0.5.2's hook reads `cache_position` from the attention layer's kwargs; transformers 5.23's
        # Llama no longer makes one (KeyError: 'cache_position', on a stock LlamaForCausalLM too), so the
        # prefill passes it (the layers forward it); the 0.5.3+ releases that need no such help ask for
        # transformers < 5.3, outside this project's range
        language_model(
            inputs_embeds=embed(prefill[None]),
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(len(prefill)),
        )
    kv = cache.get_seq_length()
    positions = torch.arange(len(prefill), len(prefill) + len(question))[None]
    out = language_model(
        inputs_embeds=embed(question[None]), past_key_values=cache, position_ids=positions, use_cache=True
    )
    return model.lm_head(out.last_hidden_state[0, -1]), kv


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def kvpress_reference(model, tokenizer, data, args, keys) -> dict:
    """Accuracy and cost of each press in `args.kvpress` at each ratio of `args.ratios`, one prompt at a time.

    Returns `{"version", "presses", "results": {"kvpress_<press>@<ratio>": ..., "kvpress_none": ...}}`, or
    `{"error": ...}` (with the exact exception) when kvpress is not installed or a press fails on this model."""
    names = [name for name in args.kvpress.split(",") if name]
    if not names:
        return {"skipped": "no presses asked (--kvpress '')"}
    try:
        _kvpress()
    except ImportError as error:
        return {"error": f"kvpress is not installed here ({error!r}): the kvpress rows are skipped"}
    unknown = sorted(set(names) - set(PRESSES))
    if unknown:
        raise ValueError(f"--kvpress names unknown presses {unknown}; known: {sorted(PRESSES)}")
    question_marker = tokenizer.convert_tokens_to_ids("what")
    layers = model.config.text_config.num_hidden_layers
    attention = [layer.self_attn for layer in model.model.language_model.layers]
    had_rotary = [hasattr(a, "rotary_emb") for a in attention]
    from importlib.metadata import version

    report = {
        "version": version("kvpress"),
        "transformers": version("transformers"),
        "presses": names,
        "note": KVPRESS_NOTE,
        "results": {},
    }
    prompts = []
    for prompt, answer in data:
        enc = tokenizer(prompt, return_tensors="pt")
        prefill, question, n = split_prompt(enc["input_ids"][0], model.config, question_marker)
        prompts.append((prefill, question, n, tokenizer.convert_tokens_to_ids(answer.split()[-1])))
    runs = [("none", None)] + [(name, ratio) for ratio in args.ratios for name in names]
    try:
        for name, ratio in runs:
            correct = kv_total = 0
            times = []
            for i, (prefill, question, n, answer) in enumerate(prompts):
                press = None
                if ratio is not None:
                    n_kept = int(kept_counts(torch.tensor([n]), ratio)[0]) + len(prefill) - n
                    press = PRESSES[name](max(0.0, 1 - (n_kept + 0.5) / len(prefill)))
                logits, kv = run_one(model, prefill, question, press)
                correct += int(int(logits.argmax()) == answer)
                kv_total += kv + len(question)
                if i < args.time_samples:
                    best = math.inf
                    for _ in range(5):
                        began = time.perf_counter()
                        run_one(model, prefill, question, press)
                        best = min(best, time.perf_counter() - began)
                    times.append(best)
            tokens = sum(len(p) + len(q) for p, q, _, _ in prompts) / len(prompts)
            key = "kvpress_none" if ratio is None else f"kvpress_{name}@{ratio:.3f}"
            report["results"][key] = {
                "accuracy": correct / len(prompts),
                "asked_fact_kept": None,  # per KV head: no single kept set
                "context_tokens_seen": sum(n for _, _, n, _ in prompts) / len(prompts),
                "kept_per_example": None,
                "tokens_seen": tokens,  # every token passes through every layer
                "tokens_per_layer": tokens,
                "kv_per_layer": kv_total / len(prompts),  # cache entries the question's last token reads
                "prefill_ms": 1000 * float(np.median(times)) if times else None,
                "layers": layers,
            }
            print(key, report["results"][key], flush=True)
    except Exception as error:  # noqa: BLE001 (recorded exactly, the benchmark goes on)
        report["error"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc()
    finally:
        for a, had in zip(attention, had_rotary):
            if not had and "rotary_emb" in a._modules:
                del a.rotary_emb  # kvpress leaves the rotary module on each attention layer
    return report


__all__ = ["PRESSES", "kvpress_reference", "run_one", "split_prompt"]
