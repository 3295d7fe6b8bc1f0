"""lmms-eval's `deft_llava` model (evaluation/lmms_eval_model.py) through the real `lmms-eval` command on a local
task built from the dense digits test split (benchmarks/digits/lmms_eval_task.py, nothing from the Hub): its
`exact_match` equals the repository's own evaluation of the same samples and settings, sample by sample, and the
logged samples carry the visual tokens kept. Skipped where lmms-eval is not installed (the default environment);
in the environment of docs/evaluation.md:

    venv-lmms/bin/python -m pytest tests/test_lmms_eval_plugin.py -m slow
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/
from modeling_deft_llava.evaluation.lmms_eval_model import deft_overrides, user_content  # noqa: E402

from benchmarks.digits.evaluate_methods import load  # noqa: E402
from benchmarks.digits.lmms_eval_task import TASK_NAME, repo_score, samples, write_task  # noqa: E402
from benchmarks.digits.tasks import TASKS  # noqa: E402

pytestmark = pytest.mark.slow
N = 50
BATCH = 10
BASE = ROOT / "checkpoints" / "digits-dense-llava-base"  # a stock llava folder
DEFT = ROOT / "checkpoints" / "digits-dense-deft-llava"  # a DeFT-LLaVA folder (question-aware DeFT, 25%)
SETTINGS = {
    "stock+visionzip-25%": (BASE, {"compression_method": "visionzip", "deft_retention_ratio": 0.25}),
    "deft-folder": (DEFT, {}),
    "deft-folder-12.5%": (DEFT, {"deft_retention_ratio": 0.125}),
    "stock-off": (BASE, {"use_deft": False}),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("deft_digits")
    write_task(out, N)
    return out


def _lmms_eval(task_dir: Path, out: Path, pretrained: Path, settings: dict, extra=()) -> dict:
    args = ",".join([f"pretrained={pretrained}", "device=cpu", *(f"{k}={v}" for k, v in settings.items())])
    command = [
        str(Path(sys.executable).parent / "lmms-eval"), "eval", "--model", "deft_llava", "--model_args", args,
        "--tasks", TASK_NAME, "--include_path", str(task_dir), "--batch_size", str(BATCH),
        "--output_path", str(out), "--log_samples", "--verbosity", "INFO", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # local files only
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=out, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    (logged,) = out.rglob(f"*_samples_{TASK_NAME}.jsonl")
    rows = [json.loads(line) for line in logged.read_text().splitlines()]
    return {
        "exact_match": json.loads(results.read_text())["results"][TASK_NAME]["exact_match,none"],
        "rows": sorted(rows, key=lambda r: r["doc_id"]),
        "log": result.stdout + result.stderr,
    }


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_lmms_eval_equals_the_repository_evaluation(task_dir, tmp_path, name):
    pretrained, settings = SETTINGS[name]
    run = _lmms_eval(task_dir, tmp_path, pretrained, settings)
    ours = repo_score(str(pretrained), settings, N, BATCH)
    assert run["exact_match"] == ours["strict_accuracy"], (run["exact_match"], ours)
    # sample by sample: the same answers as the repository's greedy generate
    from benchmarks.digits.common import evaluate_generate

    model, processor = load(str(pretrained), deft_overrides(settings))
    expected = evaluate_generate(
        model, processor, list(samples(N)), BATCH, max_new_tokens=TASKS["dense"].max_answer_tokens + 1
    )["predictions"]
    assert [r["filtered_resps"].strip() for r in run["rows"]] == expected
    # K from the loaded config (evaluate_config's `mean_visual_tokens` reads the ratio from `settings` alone, so it
    # says 64 for a DeFT folder given without settings)
    n = (
        TASKS["dense"].make_split("test", 1, seed=0)[0].image.shape[0]
        // model.config.vision_config.patch_size
    )
    kept = model.config.num_kept_tokens(n * n) if model.config.use_deft else n * n
    assert {r["token_counts"][0]["visual_tokens"] for r in run["rows"]} == {kept}
    assert f"visual tokens kept per image: mean {kept:.2f}" in run["log"]


def test_sampled_generation_runs(task_dir, tmp_path):
    """`temperature > 0` samples (lmms-eval's --gen_kwargs override the task's): answers are strings, logged."""
    run = _lmms_eval(
        task_dir, tmp_path, DEFT, {}, extra=("--gen_kwargs", "temperature=1.0,do_sample=true", "--seed", "0")
    )
    assert len(run["rows"]) == N and 0.0 <= run["exact_match"] <= 1.0


def test_model_arguments():
    assert deft_overrides({"pretrained": "x", "deft_retention_ratio": 0.25}) == {
        "deft_retention_ratio": 0.25,
        "use_deft": True,
    }
    assert deft_overrides({"compression_settings": '{"feature_space": "projected"}'})[
        "compression_settings"
    ] == {"feature_space": "projected"}
    with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['retention'\]"):
        deft_overrides({"retention": 0.25})
    assert user_content("q ?<image>", 1) == [{"type": "text", "text": "q ?"}, {"type": "image"}]
    assert user_content("q ?", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q ?"}]
    with pytest.raises(ValueError, match="holds 1 '<image>' token"):
        user_content("<image> q", 2)
