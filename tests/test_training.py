"""Fine-tuning (training/): data formats and bad input, the collator, LoRA targets, a few-step run with
feedback-guided scoring, adapter and merge round trips, a 2-process run and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import datasets
import pytest
import tiny
import torch
from modeling_deft_llava.hub_card.export import export_for_hub
from modeling_deft_llava.training.collator import IGNORE_INDEX, DeftLlavaDataCollator
from modeling_deft_llava.training.data import ConversationDataset
from modeling_deft_llava.training.lora import language_model_target_regex, prepare_model_for_finetuning
from modeling_deft_llava.training.saving import load_finetuned, merge_and_export
from modeling_deft_llava.training.train import parse_args, train
from modeling_deft_llava.training.trainer import STAGING_PREFIX, unwrap_deft_model
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

RATIO = 0.25
K = 4  # num_kept_tokens(16, 0.25)
QUESTION = "what is in the picture ?"
REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(tiny.images(n, seed)):
        image.save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def llava_rows(n: int, prefix: str = "images/") -> list[dict]:
    return [
        {
            "id": str(i),
            "image": f"{prefix}{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": ["a cat", "a dog"][i % 2]},
            ],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("training"))


def make_workspace(root):
    """An exported tiny DeFT-LLaVA (retention 0.25) and an 8-row LLaVA JSON dataset under `root`."""
    base = export_for_hub(
        tiny.model(use_deft=True, deft_retention_ratio=RATIO),
        tiny.processor(use_deft=True, deft_retention_ratio=RATIO),
        root / "base",
    )
    write_images(root / "data" / "images", 8)
    (root / "data" / "data.json").write_text(json.dumps(llava_rows(8)))
    return dict(root=root, base=base, data=root / "data" / "data.json")


def run_args(workspace, output_dir, *extra, max_steps: int = 8) -> list[str]:
    return [
        "--model_name_or_path", str(workspace["base"]),
        "--data_path", str(workspace["data"]),
        "--output_dir", str(output_dir),
        "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--lora_r", "4",
        "--logging_steps", "1",
        "--save_steps", "4",
        "--seed", "7",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def deft_collator(feedback=True, max_length=None):
    processor = tiny.processor(use_deft=True, deft_retention_ratio=RATIO)
    full = tiny.processor(use_deft=False) if feedback else None
    return DeftLlavaDataCollator(processor, full, max_length=max_length)


def record(answer="a cat", question=QUESTION, seed=0):
    return {
        "messages": [
            {"role": "user", "content": f"<image>\n{question}"},
            {"role": "assistant", "content": answer},
        ],
        "images": tiny.images(1, seed),
        "source": "test:row 0",
    }


# ----------------------------------------------------------------------------- collator
def test_collator_matches_the_processor_and_masks_prompt_images_padding():
    collator = deft_collator()
    records = [record("a cat"), record("a dog and a cat", question="what ?", seed=1)]
    batch = collator(records)
    processor, full_processor = collator.processor, collator.full_processor
    for row, rec in enumerate(records):
        text = processor.apply_chat_template(rec["messages"], tokenize=False)
        for prefix, proc, count in (("", processor, K), ("full_", full_processor, tiny.NUM_PATCHES)):
            ref = proc(images=rec["images"], text=[text], return_tensors="pt")["input_ids"][0]
            ids = batch[f"{prefix}input_ids"][row]
            mask = batch[f"{prefix}attention_mask"][row].bool()
            assert torch.equal(ids[mask], ref)  # right padding, same ids as the processor
            assert int((ids == 4).sum()) == count
            labels = batch[f"{prefix}labels"][row]
            learned = collator.tokenizer.decode(labels[labels != IGNORE_INDEX])
            assert learned.split() == rec["messages"][1]["content"].split() + ["</s>"]
            assert (labels[ids == 4] == IGNORE_INDEX).all() and (labels[~mask] == IGNORE_INDEX).all()
    # both encodings hold the same text tokens
    for row in range(2):
        compressed = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        full = batch["full_input_ids"][row][batch["full_attention_mask"][row].bool()]
        assert torch.equal(compressed[compressed != 4], full[full != 4])
    assert batch["pixel_values"].shape == (2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)


def test_too_long_rule_cuts_answers_never_images(tmp_path):
    long_answer = " ".join(["cat"] * 30)
    collator = deft_collator(max_length=40)
    required, total = collator.required_length(record(long_answer))
    assert total > 40 > required
    batch = collator([record(long_answer)])
    assert batch["full_input_ids"].shape[1] == 40  # the longer (full-token) encoding sets the cut
    assert int((batch["full_input_ids"] == 4).sum()) == tiny.NUM_PATCHES
    cut = batch["full_input_ids"].shape[1] - 40
    assert batch["input_ids"].shape[1] == 40 - (tiny.NUM_PATCHES - K) - cut
    # a prompt that cannot fit: skipped at load time and counted, never cut
    write_images(tmp_path / "images", 3)
    rows = llava_rows(3)
    rows[1]["conversations"][0]["value"] = "<image>\n" + " ".join(["what"] * 40)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data = ConversationDataset(
        tmp_path / "d.json", length_fn=collator.required_length, max_length=40, skip_bad_rows=False
    )
    assert len(data) == 2 and data.skipped == {"too long": 1}
    with pytest.raises(ValueError, match="test:row 0: needs"):
        collator([_too_long_record()])


def _too_long_record():
    rec = record()
    rec["messages"][0]["content"] = "<image>\n" + " ".join(["what"] * 40)
    return rec


# ----------------------------------------------------------------------------- data formats and bad input
def test_imagefolder_and_parquet_layouts(tmp_path):
    names = write_images(tmp_path / "folder", 2)
    with open(tmp_path / "folder" / "metadata.jsonl", "w") as f:
        for name, answer in zip(names, ["a cat", "a dog"]):
            f.write(json.dumps({"file_name": name, "question": QUESTION, "answer": answer}) + "\n")
    data = ConversationDataset(tmp_path / "folder")
    item = data[1]
    assert data.format == "imagefolder" and data.layout == "question+answer"
    assert item["messages"][0]["content"] == f"<image>\n{QUESTION}" and item["images"][0].size == (32, 32)
    # parquet with embedded image bytes and a chat-style `messages` column
    table = datasets.Dataset.from_dict(
        {
            "image": [str(tmp_path / "folder" / n) for n in names],
            "messages": [
                [{"role": "user", "content": "<image>\nwhat ?"}, {"role": "assistant", "content": a}]
                for a in ("a cat", "a dog")
            ],
        }
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "train.parquet"))
    data = ConversationDataset(tmp_path / "train.parquet")
    assert data.format == "parquet" and data.layout == "messages" and len(data) == 2
    assert data[0]["images"][0].size == (32, 32)
    assert deft_collator()([data[0], data[1]])["input_ids"].shape[0] == 2


def test_bad_input_names_file_and_row(tmp_path):
    write_images(tmp_path / "images", 4)
    rows = llava_rows(4)
    rows[1]["image"] = "images/missing.png"
    rows[2]["conversations"][0]["value"] = QUESTION  # no <image>
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"d\.json:row 1: image file .*missing\.png.* does not exist"):
        ConversationDataset(path)
    data = ConversationDataset(path, skip_bad_rows=True)
    assert len(data) == 2 and data.skipped == {"missing image": 1, "placeholder mismatch": 1}
    rows[1]["image"] = "images/1.png"
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"row 2: the conversation has no image placeholder"):
        ConversationDataset(path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl"):
        ConversationDataset(tmp_path / "empty.jsonl")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"img": "x.png", "caption": "a cat"}) + "\n")
    with pytest.raises(ValueError, match=r"odd\.jsonl: unknown column layout \['caption', 'img'\]"):
        ConversationDataset(tmp_path / "odd.jsonl")


@pytest.mark.parametrize(
    "layout, answers",
    [
        ("conversations", ["  \n "]),
        ("messages", ["\t"]),
        ("question+answer", [" "]),
        ("conversations", ["a cat", ""]),  # a second answer with nothing to learn, after a good one
        ("messages", ["a cat", "\u3000"]),  # an ideographic space is whitespace too
    ],
)
def test_an_answer_of_only_whitespace_is_refused(tmp_path, layout, answers):
    """Such an answer would teach only the end-of-turn token: the row is refused, naming row and turn."""
    write_images(tmp_path / "images", 2)
    rows = llava_rows(2)
    for row in rows:
        turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answers[0]}]
        for answer in answers[1:]:
            turns += [{"from": "human", "value": "and ?"}, {"from": "gpt", "value": answer}]
        row["conversations"] = turns
    rows[0]["conversations"] = llava_rows(1)[0]["conversations"]  # row 0 is fine, row 1 is bad
    if layout == "messages":
        for row in rows:
            row["messages"] = [
                {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                for t in row.pop("conversations")
            ]
    elif layout == "question+answer":
        for row in rows:
            turns = row.pop("conversations")
            row["question"], row["answer"] = QUESTION, turns[1]["value"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    turn = 2 * len(answers) - 1
    with pytest.raises(ValueError, match=rf"d\.json:row 1: the assistant answer in turn {turn} is empty"):
        ConversationDataset(path)
    data = ConversationDataset(path, skip_bad_rows=True)
    assert len(data) == 1 and data.skipped == {"empty answer": 1}


# ----------------------------------------------------------------------------- LoRA targets
def test_lora_reaches_the_language_model_only():
    model = prepare_model_for_finetuning(tiny.model(use_deft=True, deft_retention_ratio=RATIO), lora_r=4)
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert lora and all(".language_model." in n for n in lora)
    assert len(lora) == 2 * 7  # 2 decoder layers x 7 linear layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or (".modules_to_save." in n) for n in trainable)
    assert any(".deft.modules_to_save." in n for n in trainable)
    assert any(".multi_modal_projector.modules_to_save." in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    vision_name = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    import re

    assert not re.fullmatch(language_model_target_regex(["q_proj"]), vision_name)


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace["root"] / "run"
    args, training_args = parse_args(
        run_args(workspace, out, "--merge_output_dir", str(workspace["root"] / "merged"))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(args, training_args)
    return dict(trainer=trainer, out=out, merged=workspace["root"] / "merged", warnings=caught)


def test_a_run_raises_none_of_the_warnings_that_are_ours(trained):
    """Every run warned that pinned memory is unused on CPU and that `is_gradient_checkpointing` is deprecated
    (peft reads it); both are ours to fix or silence at the source."""
    messages = [str(w.message) for w in trained["warnings"]]
    assert not [m for m in messages if "pin_memory" in m or "is_gradient_checkpointing" in m], messages


def eval_inputs():
    processor = tiny.processor(use_deft=True, deft_retention_ratio=RATIO)
    return processor(images=tiny.images(2, seed=5), text=[tiny.prompt()] * 2, return_tensors="pt")


def test_few_steps_loss_goes_down_and_deft_scorer_learns(workspace, trained):
    history = [h for h in trained["trainer"].state.log_history if "loss" in h]
    assert len(history) == 8
    assert all({"lm_loss", "rtd_loss", "feedback_loss"} <= set(h) for h in history)
    first, last = history[0]["lm_loss"], sum(h["lm_loss"] for h in history[-2:]) / 2
    assert last < first - 0.2, (first, last)
    # total loss = lm + rtd + feedback (weights 1.0 in the tiny config; logged means of the same steps)
    for h in history:
        assert h["loss"] == pytest.approx(
            h["lm_loss"] + h["rtd_loss"] + h["feedback_loss"], rel=1e-4, abs=1e-5
        )
    base = DeftLlavaForConditionalGeneration.from_pretrained(workspace["base"])
    trained_deft = unwrap_deft_model(trained["trainer"].model).model.deft
    trained_state = trained_deft.modules_to_save["default"].state_dict()
    base_state = base.model.deft.state_dict()
    for prefix in ("saliency_scorer", "semantic_abstraction", "score_mixer", "token_dictionary"):
        changed = [
            k for k in base_state if k.startswith(prefix) and not torch.equal(base_state[k], trained_state[k])
        ]
        assert changed, f"no {prefix} parameter changed"
    # the vision tower stayed frozen
    saved = load_file(str(trained["out"] / "adapter_model.safetensors"))
    assert not any("vision_tower" in k for k in saved)
    assert any(".deft." in k for k in saved) and any("lora_A" in k for k in saved)
    assert sorted(p.name for p in trained["out"].iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4",
        "checkpoint-8",
    ]


def test_adapter_round_trip(workspace, trained):
    model = trained["trainer"].model.eval()
    inputs = eval_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
        base = DeftLlavaForConditionalGeneration.from_pretrained(workspace["base"])
        assert not torch.allclose(base(**inputs).logits, reference)  # training changed the outputs
        via_peft = PeftModel.from_pretrained(base, str(trained["out"])).eval()
        torch.testing.assert_close(via_peft(**inputs).logits, reference, rtol=0, atol=1e-6)
        via_helper = load_finetuned(trained["out"])
        torch.testing.assert_close(via_helper(**inputs).logits, reference, rtol=0, atol=1e-6)
        auto = AutoPeftModelForCausalLM.from_pretrained(str(trained["out"]), trust_remote_code=True).eval()
        torch.testing.assert_close(auto(**inputs).logits, reference, rtol=0, atol=1e-6)
        plain = DeftLlavaForConditionalGeneration.from_pretrained(workspace["base"])
        plain.load_adapter(str(trained["out"]))
        torch.testing.assert_close(plain.eval()(**inputs).logits, reference, rtol=0, atol=1e-6)
    processor = DeftLlavaProcessor.from_pretrained(str(trained["out"]))
    assert processor.use_deft and processor.deft_retention_ratio == RATIO


def test_merge_round_trip(workspace, trained):
    model = trained["trainer"].model.eval()
    inputs = eval_inputs()
    with torch.no_grad():
        reference = model(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(str(trained["merged"]), trust_remote_code=True)
        torch.testing.assert_close(merged.eval()(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
    assert (trained["merged"] / "modeling_deft_llava.py").is_file()
    # merging again into the same folder needs overwrite; the export helper is atomic
    with pytest.raises(FileExistsError):
        merge_and_export(trained["out"], trained["merged"])


# ----------------------------------------------------------------------------- processes
def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd, timeout=240, **kwargs):
    """`subprocess.run` in its own process group: a timeout kills the launcher's workers too."""
    process = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def test_two_processes_with_torchrun(workspace, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "modeling_deft_llava.training.train",
        *run_args(workspace, out, "--max_steps", "4", "--per_device_train_batch_size", "2", "--ddp_backend", "gloo"),
    ]  # fmt: skip
    done = _run(cmd, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["global_step"] == 4
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (out / "checkpoint-4").iterdir()}
    assert all("feedback_loss" in h for h in state["log_history"] if "loss" in h)
    assert (out / "adapter_model.safetensors").is_file()


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from transformers import TrainerCallback
    from modeling_deft_llava.training.train import parse_args, train

    class Slow(TrainerCallback):  # gives the test time to kill the process after checkpoint-4
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 4:
                time.sleep(30)

    train(*parse_args(sys.argv[1:]), callbacks=[Slow()])
    """
)


def test_kill_and_resume_ends_with_the_same_weights(workspace, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    process = subprocess.Popen(
        [sys.executable, str(script), *run_args(workspace, out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-4 within 180 s"
            time.sleep(0.2)
        time.sleep(1.0)  # now inside step 5's pause
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists() and not (out / "checkpoint-8").exists()
    # a save killed half-way leaves only a staging folder, which resume ignores and removes
    (out / f"{STAGING_PREFIX}6" / "checkpoint-6").mkdir(parents=True)
    (out / f"{STAGING_PREFIX}6" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half")
    resumed = _run(
        [
            sys.executable,
            "-m",
            "modeling_deft_llava.training.train",
            *run_args(workspace, out, "--resume", "true"),
        ]
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert not (out / f"{STAGING_PREFIX}6").exists()
    reference = tmp_path / "uninterrupted"
    straight = _run(
        [sys.executable, "-m", "modeling_deft_llava.training.train", *run_args(workspace, reference)]
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    # progress bars (loading weights) may come first; the error is one line, the last, with no traceback
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_user_errors_are_one_error_line(workspace, tmp_path, capsys):
    from modeling_deft_llava.training.train import main

    cases = [
        (["--data_path", str(tmp_path / "missing.json")], "does not exist"),
        (["--model_name_or_path", str(tmp_path / "no_model")], "does not exist"),
        (["--model_name_or_path", str(tmp_path)], "no config.json"),
    ]
    # a stock llava folder trained with DeFT off and fresh DeFT weights, after one warning
    stock = tmp_path / "stock"
    tiny.stock_twin(tiny.model(use_deft=False)).save_pretrained(stock)
    cases.append(
        (["--model_name_or_path", str(stock)], "holds a 'llava' model, not a DeFT-LLaVA folder: convert it")
    )
    for extra, words in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as caught:
            main(run_args(workspace, tmp_path / "out", *extra))
        assert caught.value.code == 2
        assert words in _one_error_line(capsys)


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(workspace, tmp_path, capsys, monkeypatch):
    from modeling_deft_llava.training import train as train_module
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    original = train_module.train
    monkeypatch.setattr(train_module, "train", lambda a, t: original(a, t, callbacks=[CtrlC()]))
    out = tmp_path / "interrupted"
    argv = run_args(workspace, out, "--overwrite_output_dir", "true")
    with pytest.raises(SystemExit) as caught:
        train_module.main(argv)
    assert caught.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"the last complete checkpoint is {out / 'checkpoint-4'}" in err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python -m modeling_deft_llava.training.train ") and command.endswith(
        "--resume true"
    )
    assert "--overwrite_output_dir" not in command and str(out) in command
