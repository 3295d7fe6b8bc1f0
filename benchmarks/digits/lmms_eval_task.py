"""A local lmms-eval task from the dense digits test split, and the repository's own score of the same samples.

    PYTHONPATH=. python -m benchmarks.digits.lmms_eval_task write --out /tmp/deft_digits --n 50
    lmms-eval eval --model deft_llava --tasks deft_digits_dense --include_path /tmp/deft_digits \
        --model_args pretrained=checkpoints/digits-dense-llava-base,compression_method=visionzip,deft_retention_ratio=0.25 \
        --batch_size 10 --output_path /tmp/deft_digits_out --log_samples
    PYTHONPATH=. python -m benchmarks.digits.lmms_eval_task score --n 50 --batch-size 10 \
        --pretrained checkpoints/digits-dense-llava-base --settings '{"compression_method": "visionzip", "deft_retention_ratio": 0.25}'

`write` puts three files under `--out`, nothing from the Hub: `dataset/` (the first `--n` samples of
`dense.make_split("test", n, seed=TEST_SEED)`, saved with `datasets.save_to_disk`: the image as PNG, the question,
the answer and the question kind), `deft_digits_dense.yaml` (the task: `load_from_disk` on that folder, greedy
generation with the task's answer length + 1 new tokens, as `evaluate_methods` generates) and `utils.py` (the
task's functions: the image, the prompt `question<image>` (the digits model reads the question first, as
`data.chat_messages` orders it), and `exact_match`: the stripped answer equals the sample's answer).

`score` is the repository's own evaluation of the same samples and settings (`evaluate_methods.evaluate_config`:
greedy `generate` in batches, `strict_accuracy` = the decoded, stripped generation equals the answer), the number
`exact_match` of the lmms-eval task must equal. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import TEST_SEED
from .tasks import TASKS

TASK_NAME = "deft_digits_dense"

TASK_YAML = """\
# written by benchmarks/digits/lmms_eval_task.py: the dense digits test split, local files only
task: {task}
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
  samples: {n}
  seed: {seed}
"""

TASK_UTILS = '''\
"""The dense digits task's functions (written by benchmarks/digits/lmms_eval_task.py)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # the digits model reads the question before the image (benchmarks/digits/data.py, chat_messages)
    return doc["question"] + "<image>"


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def samples(n: int, seed: int = TEST_SEED):
    return TASKS["dense"].make_split("test", n, seed=seed)


def write_task(out: str | Path, n: int, seed: int = TEST_SEED) -> Path:
    """Write the dataset, the task YAML and its functions under `out`; returns the YAML's path."""
    import datasets
    from PIL import Image

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = list(samples(n, seed))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "kind": datasets.Value("string"),
        }
    )
    split = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(s.image, mode="RGB") for s in rows],
            "question": [s.question for s in rows],
            "answer": [s.answer for s in rows],
            "kind": [s.kind for s in rows],
        },
        features=features,
    )
    datasets.DatasetDict({"test": split}).save_to_disk(str(out / "dataset"))
    (out / "utils.py").write_text(TASK_UTILS)
    path = out / f"{TASK_NAME}.yaml"
    path.write_text(
        TASK_YAML.format(
            task=TASK_NAME,
            dataset=json.dumps(str(out / "dataset")),
            max_new_tokens=TASKS["dense"].max_answer_tokens + 1,
            n=n,
            seed=seed,
        )
    )
    return path


def repo_score(pretrained: str, settings: dict, n: int, batch_size: int, seed: int = TEST_SEED) -> dict:
    """The repository's own evaluation of the task's samples (`evaluate_config`)."""
    from .evaluate_methods import evaluate_config

    settings = dict(settings)
    if settings and "use_deft" not in settings:
        settings["use_deft"] = True  # as the lmms-eval model reads a compression setting
    out = evaluate_config(pretrained, settings, list(samples(n, seed)), TASKS["dense"], batch_size=batch_size)
    return {k: out[k] for k in ("strict_accuracy", "strict_correct", "accuracy", "n", "mean_visual_tokens")}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write the local lmms-eval task")
    write.add_argument("--out", required=True)
    write.add_argument("--n", type=int, default=50)
    score = sub.add_parser("score", help="the repository's own evaluation of the same samples")
    score.add_argument("--pretrained", required=True)
    score.add_argument("--settings", default="{}", help="DeFT settings as JSON (the lmms-eval model_args)")
    score.add_argument("--n", type=int, default=50)
    score.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "write":
        print(write_task(args.out, args.n))
        return None
    result = repo_score(args.pretrained, json.loads(args.settings), args.n, args.batch_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
