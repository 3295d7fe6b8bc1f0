"""Text-context compression on a fact-recall task built from real data: DeFT vs simple rules, FastV's attention
rule and kvpress's KV-cache presses, at the same budget.

    .venv-kvpress/bin/python -m benchmarks.text_context --out benchmarks/results/text_context_facts.json

(`.venv-kvpress`: `requirements-kvpress.txt`; in an environment without kvpress the kvpress rows are skipped
and the JSON says why.)

Task (real labels, scikit-learn's handwritten digits): a context of `--facts` facts "the digit of <key> is
<value> ." (keys: distinct letters; values: the labels of random samples of `load_digits()`, samples 0..1199
for training, 1200.. for the test set), then one question "what is the digit of <key> ?", answered by
the value. Only 2 of the 7 tokens of a fact carry information (the key and the value); the question and the
chat template are never compressed.

Stages (CPU, minutes):
1. a tiny `DeftLlavaForConditionalGeneration` (`--hidden` 64, `--layers` 2 decoder layers by default; its vision
   tower is unused) learns the task with every context token (`deft_text_retention_ratio=None`, the context
   marked `<context>`);
2. the DeFT text scorers (SAM, saliency, mixture; backbone frozen) learn from DeFT's feedback score: the
   gradient of the answer loss with respect to each context token of the full-token pass (`token_gradients`,
   `feedback_loss`), the seed's feedback-guided scoring;
3. evaluation on held-out examples: the full context, then each budget K = floor(ratio * n + 0.5) context tokens
   kept by DeFT (untrained and trained scorers), by the rules `random`, `first`, `last` (same K, the same
   model path: the rules replace DeFT's `compress_text` hook for the call), by FastV's attention rule on the
   context (`fastv`: inside the decoder, layers before `--fastv-layer` see every token; `fastv_pre`: the same
   ranking before the language model, which then sees K context tokens in every layer;
   `text_attention_rules.py`) and, when kvpress is installed (`requirements-kvpress.txt`), by kvpress presses
   that prune the KV cache of a context-only prefill to the same number of entries before the question runs
   (`text_kvpress.py`). Kept tokens keep their original positions. Accuracy = the answer token is the argmax
   at the last prompt position. Costs per method: tokens entering the language model, tokens per decoder layer
   (mean over layers), KV-cache entries per layer after the prefill, and the prefill time of one prompt
   (`--time-samples` prompts one by one, the fastest of 5 runs each, median over prompts; batch 1).
4. the same model and DeFT scorers on longer contexts (`--long-facts`, 12 facts by default: the model was
   trained on `--facts` only, so this measures how it and every method carry over to twice the length).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from modeling_deft_llava.processing.word_tokenizer import build_word_tokenizer
from modeling_deft_llava.utilities.process_state import restores_process_state
from sklearn.datasets import load_digits

from modeling_deft_llava import DeftLlavaConfig, DeftLlavaForConditionalGeneration
from modeling_deft_llava.compressors.compression_method import TextSelection
from modeling_deft_llava.deft.topk_selector import kept_counts
from modeling_deft_llava.text_context import TextContext

from .text_attention_rules import PLACEMENTS, text_attention_rule
from .text_kvpress import kvpress_reference

KEYS = [chr(c) for c in range(ord("a"), ord("q"))]  # 16 keys
FILLER = ["the", "digit", "of", "is", "."]
WORDS = ["USER", ":", "ASSISTANT", "what", "?"] + FILLER + KEYS + [str(d) for d in range(10)]
TRAIN_SAMPLES = 1200  # digits samples 0..1199 give the training values, 1200..1796 the test values
RULES = ("random", "first", "last")


def build_tokenizer():
    return build_word_tokenizer(WORDS, context=True)


def build_model(
    tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64
) -> DeftLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = DeftLlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),  # fmt: skip
        text_config=dict(
            model_type="llama",
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),  # fmt: skip
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        context_start_token_index=tokenizer.convert_tokens_to_ids("<context>"),
        context_end_token_index=tokenizer.convert_tokens_to_ids("</context>"),
        use_deft=True,
        deft_semantic_dim=32,
        deft_saliency_hidden_dim=32,
        deft_enable_rtd=False,
    )
    return DeftLlavaForConditionalGeneration(config)


def examples(n: int, facts: int, split: str, seed: int, questions: int = 1) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs; values are labels of random samples of the digits dataset's `split` part.

    `questions` > 1 (training): the prompt goes on with the answer and further questions about other facts,
    "... ASSISTANT: <value> what is the digit of <key> ? ASSISTANT:", and the answer is every value in order
    (space separated): more answer tokens per sequence for the same context."""
    labels = load_digits().target
    labels = labels[:TRAIN_SAMPLES] if split == "train" else labels[TRAIN_SAMPLES:]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # random samples, not consecutive ones: the dataset's labels run 0, 1, ..., 9 in order, so neighbouring
        # facts would give the answer away
        values = [str(v) for v in labels[rng.choice(len(labels), size=facts, replace=False)]]
        keys = list(rng.choice(KEYS, size=facts, replace=False))
        asked = [int(a) for a in rng.permutation(facts)[:questions]]
        context = " ".join(f"the digit of {k} is {v} ." for k, v in zip(keys, values))
        turns = [f"what is the digit of {keys[a]} ? ASSISTANT:" for a in asked]
        prompt = f"USER: <context>{context}</context> " + " ".join(
            t + f" {values[a]}" for t, a in zip(turns[:-1], asked[:-1])
        )
        out.append(((prompt + " " + turns[-1]).replace("  ", " "), " ".join(values[a] for a in asked)))
    return out


def encode(tokenizer, batch):
    """Left-padded input ids, mask and the (last) answer ids `(batch,)`."""
    enc = tokenizer([p for p, _ in batch], return_tensors="pt", padding=True)
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(a.split()[-1]) for _, a in batch])
    return enc["input_ids"], enc["attention_mask"], answers


def encode_with_labels(tokenizer, batch):
    """Prompt + final answer as one sequence; labels only on the answer tokens (every turn's answer)."""
    enc = tokenizer([p + " " + a.split()[-1] for p, a in batch], return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    after_assistant = torch.zeros_like(ids, dtype=torch.bool)
    colon_after_assistant = (ids[:, :-1] == tokenizer.convert_tokens_to_ids("ASSISTANT")) & (
        ids[:, 1:] == tokenizer.convert_tokens_to_ids(":")
    )
    after_assistant[:, 2:] = colon_after_assistant[:, :-1]  # the token after "ASSISTANT :"
    is_answer = after_assistant & torch.isin(ids, answer_ids)
    return ids, enc["attention_mask"], ids.masked_fill(~is_answer, -100)


def answer_loss(model, ids, mask, answers):
    logits = model(input_ids=ids, attention_mask=mask).logits[
        :, -1
    ]  # (batch, vocab) at the last prompt token
    return torch.nn.functional.cross_entropy(logits, answers), logits


def train_base(model, tokenizer, args):
    """Stage 1: the whole model on full contexts (text compression off)."""
    model.config.deft_text_retention_ratio = None
    model.train()
    params = [p for n, p in model.named_parameters() if not n.startswith("model.deft.")]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    data = examples(
        args.train_steps * args.batch, args.facts, "train", seed=1, questions=args.train_questions
    )
    began = time.perf_counter()
    for step in range(args.train_steps):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, mask, labels = encode_with_labels(tokenizer, data[step * args.batch : (step + 1) * args.batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).lm_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.train_steps - 1:
            print(
                f"base step {step} loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True
            )
    model.eval()


def train_deft_feedback(model, tokenizer, args):
    """Stage 2: DeFT's text scorers learn the feedback score of the full-token pass (backbone frozen)."""
    deft = model.model.deft
    for p in model.parameters():
        p.requires_grad_(False)
    for p in deft.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(deft.parameters(), lr=args.deft_lr)
    config = model.config
    captured = {}

    def leaf_embeddings(module, inputs, output):  # the input embeddings as a leaf: their gradient is s_fb's
        captured["embeds"] = output.detach().requires_grad_(True)
        return captured["embeds"]

    hook = model.get_input_embeddings().register_forward_hook(leaf_embeddings)
    data = examples(args.deft_steps * args.batch, args.facts, "train", seed=2)
    for step in range(args.deft_steps):
        ids, mask, answers = encode(tokenizer, data[step * args.batch : (step + 1) * args.batch])
        context = TextContext.find(
            ids, mask, config.context_start_token_index, config.context_end_token_index
        )
        model.config.deft_text_retention_ratio = None  # the full-token pass
        loss, _ = answer_loss(model, ids, mask, answers)
        embeds = captured["embeds"]  # (batch, seq, D), input layout
        (grads,) = torch.autograd.grad(loss, embeds)
        tokens, token_grads = context.pack(embeds.detach()), context.pack(grads)
        out = deft(
            tokens=tokens,
            modality="text",
            attention_mask=context.token_mask,
            token_gradients=token_grads,
            retention_ratio=args.ratios[0],
        )
        optimizer.zero_grad()
        out.feedback_loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.deft_steps - 1:
            print(f"deft step {step} feedback loss {out.feedback_loss.item():.4f}", flush=True)
    hook.remove()
    for p in model.parameters():
        p.requires_grad_(True)


@contextmanager
def text_rule(model, rule: str, seed: int = 0):
    """Replace DeFT's `compress_text` hook for the block: keep the same K context tokens by a simple rule."""
    generator = torch.Generator().manual_seed(seed)

    def compress_text(text):
        counts = kept_counts(text.token_mask.sum(1), text.retention_ratio)  # (batch,) the same K as DeFT
        n = text.token_mask.shape[1]
        rank = torch.arange(n).expand_as(text.token_mask)  # (batch, n) slot order
        if rule == "random":
            rank = torch.rand(text.token_mask.shape, generator=generator).argsort(1).argsort(1)
        elif rule == "last":
            rank = (text.token_mask.sum(1, keepdim=True) - 1 - rank).masked_fill(~text.token_mask, n)
        rank = rank.masked_fill(~text.token_mask, n)  # padding last
        order = rank.argsort(1)  # (batch, n) slots by preference
        kept = torch.zeros_like(text.token_mask)
        kept.scatter_(1, order, torch.arange(n).expand_as(order) < counts.unsqueeze(1))
        return TextSelection(kept=kept & text.token_mask)

    deft = model.model.deft
    deft.compress_text = compress_text  # an instance attribute shadows the method for this block
    try:
        yield
    finally:
        del deft.compress_text


def prefill_ms(model, tokenizer, data, repeats: int = 5) -> float | None:
    """Median wall time (ms) of one forward over one prompt (batch 1, the benchmark's threads), over `data`:
    each example `repeats` times, its fastest kept (the machine is shared), then the median over examples."""
    if not data:
        return None
    times = []
    for example in data:
        ids, mask, _ = encode(tokenizer, [example])
        best = math.inf
        for _ in range(repeats):
            began = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            best = min(best, time.perf_counter() - began)
        times.append(best)
    return 1000 * float(np.median(times))


@torch.no_grad()
def evaluate(model, tokenizer, data, ratio, batch: int, record=None, time_samples: int = 0) -> dict:
    """Accuracy, what was kept and what it cost. `record`: filled by a rule that runs the decoder itself
    (`text_attention_rule`) with the kept context tokens and the tokens each layer saw; otherwise every
    decoder layer sees the language model's input."""
    model.config.deft_text_retention_ratio = ratio if record is None else None
    layers = model.config.text_config.num_hidden_layers
    correct = seen = context_tokens = token_layers = 0
    informative = 0  # kept key/value tokens of the asked fact
    kinds = {"key": 0, "value": 0, "filler": 0}  # kept context tokens by kind
    key_ids = torch.tensor(tokenizer.convert_tokens_to_ids(KEYS))
    value_ids = torch.tensor(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        ids, mask, answers = encode(tokenizer, data[i : i + batch])
        out = model(input_ids=ids, attention_mask=mask)
        correct += int((out.logits[:, -1].argmax(-1) == answers).sum())
        lm_input = (
            int(out.deft_attention_mask.sum()) if out.deft_attention_mask is not None else int(mask.sum())
        )
        seen += lm_input if record is None else sum(record["tokens_seen"])
        kept_lists = out.text_kept_indices if record is None else record["kept"]
        token_layers += lm_input * layers if record is None else sum(record["token_layers"])
        for b, kept in enumerate(kept_lists):
            context_tokens += len(kept)
            asked = int(ids[b, -4])  # the key: "... <key> ? ASSISTANT :"
            kept_ids = ids[b, kept]
            kinds["key"] += int(torch.isin(kept_ids, key_ids).sum())
            kinds["value"] += int(torch.isin(kept_ids, value_ids).sum())
            kinds["filler"] += len(kept) - int(torch.isin(kept_ids, torch.cat([key_ids, value_ids])).sum())
            # the asked fact survives when its key and the value two tokens later are both kept
            where = (kept_ids == asked).nonzero().flatten()
            informative += int(any(int(kept[w]) + 2 in set(kept.tolist()) for w in where))
    seconds = time.perf_counter() - start
    n = len(data)
    return {
        "accuracy": correct / n,
        "asked_fact_kept": informative / n,
        "context_tokens_seen": context_tokens / n,
        "kept_per_example": {kind: count / n for kind, count in kinds.items()},
        "tokens_seen": seen / n,  # tokens entering the language model (its first layer)
        "tokens_per_layer": token_layers / n / layers,  # mean over the decoder layers
        "kv_per_layer": token_layers / n / layers,  # KV-cache entries per layer after the prefill (the same)
        "prefill_ms": prefill_ms(model, tokenizer, data[:time_samples]),
        "seconds": seconds,
    }


@restores_process_state
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    ap.add_argument("--train-steps", type=int, default=4000)
    ap.add_argument("--train-questions", type=int, default=6, help="questions per training context")
    ap.add_argument("--deft-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--deft-lr", type=float, default=3e-3)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--ratios", type=lambda s: [float(r) for r in s.split(",")], default=[0.5, 2 / 7, 0.25])
    ap.add_argument("--long-facts", type=lambda s: [int(f) for f in s.split(",") if f], default=[12],
                    help="also evaluate (the same model, trained on --facts) on contexts of these many facts")  # fmt: skip
    ap.add_argument("--fastv-layer", type=int, default=1, help="FastV's L for the attention rules on text")
    ap.add_argument("--time-samples", type=int, default=50, help="prompts timed one by one per method")
    ap.add_argument("--kvpress", default="snapkv,expected_attention,knorm,streaming_llm",
                    help="kvpress presses to run when kvpress is installed ('' for none)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/text_context_facts.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, layers=args.layers, hidden=args.hidden)
    began = time.perf_counter()
    train_base(model, tokenizer, args)
    timed = args.time_samples
    tests = {facts: examples(args.n_test, facts, "test", seed=3) for facts in [args.facts, *args.long_facts]}
    runs = {facts: {} for facts in tests}  # per test set: method@ratio -> result
    kv = {}
    for facts, test in tests.items():
        results = runs[facts]
        results["full"] = evaluate(model, tokenizer, test, None, args.batch, time_samples=timed)
        print(facts, "facts: full", results["full"], flush=True)
        for ratio in args.ratios:
            results[f"deft_untrained@{ratio:.3f}"] = evaluate(model, tokenizer, test, ratio, args.batch)
            for rule in RULES:
                with text_rule(model, rule):
                    results[f"{rule}@{ratio:.3f}"] = evaluate(
                        model, tokenizer, test, ratio, args.batch, time_samples=timed
                    )
            for placement in PLACEMENTS:
                with text_attention_rule(model, placement, ratio, args.fastv_layer) as record:
                    results[f"{placement}@{ratio:.3f}"] = evaluate(
                        model, tokenizer, test, ratio, args.batch, record=record, time_samples=timed
                    )
        kv[facts] = kvpress_reference(model, tokenizer, test, args, KEYS)
        results.update(kv[facts].pop("results", {}))
    train_deft_feedback(model, tokenizer, args)
    for facts, test in tests.items():
        for ratio in args.ratios:
            runs[facts][f"deft@{ratio:.3f}"] = evaluate(
                model, tokenizer, test, ratio, args.batch, time_samples=timed
            )
    for facts, results in runs.items():
        for key, value in results.items():
            kept = value["asked_fact_kept"]
            print(f"{facts} facts {key:32s} acc {value['accuracy']:.3f} asked-fact-kept "
                  f"{'-' if kept is None else f'{kept:.3f}'} context {value['context_tokens_seen']:.1f} "
                  f"seen {value['tokens_seen']:.1f} per layer {value['tokens_per_layer']:.1f} "
                  f"kv {value['kv_per_layer']:.1f} prefill {value['prefill_ms']} ms "
                  f"kept {value['kept_per_example']}")  # fmt: skip
    report = {
        "command": " ".join(["python -m benchmarks.text_context", *(sys.argv[1:] if argv is None else argv)]),
        "task": f"{args.facts} facts 'the digit of <key> is <value> .' (values: sklearn digits labels), one question",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "n_test": args.n_test,
        "minutes": (time.perf_counter() - began) / 60,
        "results": runs[args.facts],
        "kvpress": kv[args.facts],
        "longer_contexts": {
            str(facts): {"facts": facts, "results": runs[facts], "kvpress": kv[facts]}
            for facts in args.long_facts
        },
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
