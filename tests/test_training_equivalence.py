"""Training equivalences: gradient accumulation equals the full batch (LM, RTD and feedback losses included),
and activation checkpointing either gives the same step (non-reentrant) or is refused up front (reentrant)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from modeling_deft_llava.training.collator import DeftLlavaDataCollator
from modeling_deft_llava.training.lora import prepare_model_for_finetuning
from modeling_deft_llava.training.train import parse_args
from modeling_deft_llava.training.trainer import DeftLlavaTrainer, reentrant_checkpointing
from transformers import TrainingArguments

RATIO = 0.25
QUESTION = "what is in the picture ?"
# micro-batches of 2 (sequential order): 10 + 8 answer words, then 1 + 1, so a per-micro-batch mean weighs the
# short answers' tokens 4.5 times more than the full batch does
ANSWERS = ["a cat and a dog and a cat and a", "a dog and a cat and a dog", "cat", "dog"]


def records(samples: int = 4):
    return [
        {
            "messages": [
                {"role": "user", "content": f"<image>\n{QUESTION}"},
                {"role": "assistant", "content": answer},
            ],
            "images": tiny.images(1, seed=i),
            "source": f"test:row {i}",
        }
        for i, answer in enumerate(ANSWERS[:samples])
    ]


def make_trainer(tmp_path, batch_size, accumulation, feedback=1, samples=4, **training):
    model = tiny.model(seed=0, use_deft=True, deft_retention_ratio=RATIO)
    torch.manual_seed(1)  # LoRA initialisation
    model = prepare_model_for_finetuning(model, lora_r=4, lora_dropout=0.0)
    collator = DeftLlavaDataCollator(
        tiny.processor(use_deft=True, deft_retention_ratio=RATIO),
        tiny.processor(use_deft=False) if feedback else None,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run-{samples}-{batch_size}x{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",  # the update is -lr * gradient: compares gradients (AdamW's first step is lr * sign)
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
        **training,
    )
    return DeftLlavaTrainer(
        model=model,
        args=args,
        train_dataset=records(samples),
        data_collator=collator,
        feedback_every_n_steps=feedback,
    )


def one_step_update(tmp_path, batch_size, accumulation, **kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """Trainable weights after one optimizer step minus before (`{name: delta}`), and the step's logged losses."""
    trainer = make_trainer(tmp_path, batch_size, accumulation, **kwargs)
    assert trainer.model_accepts_loss_kwargs  # the Trainer passes num_items_in_batch to the model
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 1
    after = dict(trainer.model.named_parameters())
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    return {n: after[n].detach() - w for n, w in before.items()}, logged


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[n].flatten() for n in sorted(a)])
    flat_b = torch.cat([b[n].flatten() for n in sorted(b)])
    return float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.fixture(scope="module")
def full_batch(tmp_path_factory):
    """`full_batch(samples)`: one step on all samples in one batch (computed once per sample count)."""
    cache = {}

    def run(samples):
        if samples not in cache:
            cache[samples] = one_step_update(tmp_path_factory.mktemp("full"), samples, 1, samples=samples)
        return cache[samples]

    return run


# 4 samples: micro-batches of 2 + 2 (different answer lengths); 3 samples: 2 + 1 (also different image counts:
# a per-micro-batch mean of the DeFT losses divided by the accumulation steps weighs the lone image 2x)
@pytest.mark.parametrize("samples", [4, 3])
def test_gradient_accumulation_equals_the_full_batch(full_batch, tmp_path, samples):
    full, full_logs = full_batch(samples)
    accumulated, accumulated_logs = one_step_update(tmp_path, 2, 2, samples=samples)
    # every part trains: LoRA B (A gets no gradient while B is zero), the DeFT modules, the projector
    moved = {n for n, d in full.items() if d.abs().max() > 0}
    assert any("lora_B" in n for n in moved) and any("multi_modal_projector" in n for n in moved)
    assert any(".deft." in n and ".token_dictionary." in n for n in moved)  # RTD: learns from rtd_loss only
    assert relative_difference(accumulated, full) < 1e-5
    for part in (".deft.", ".token_dictionary.", "lora_B"):  # parts that small or large losses reach
        names = [n for n in full if part in n]
        assert relative_difference({n: accumulated[n] for n in names}, {n: full[n] for n in names}) < 1e-5, (
            part
        )
    # the logged losses are those of the whole batch, and still add up
    for name in ("loss", "lm_loss", "rtd_loss", "feedback_loss"):
        assert accumulated_logs[name] == pytest.approx(full_logs[name], rel=1e-5, abs=2e-6), (
            name
        )  # 6 decimals
    assert full_logs["loss"] == pytest.approx(
        full_logs["lm_loss"] + full_logs["rtd_loss"] + full_logs["feedback_loss"], rel=1e-5
    )


def test_non_reentrant_checkpointing_with_feedback_gives_the_same_step(full_batch, tmp_path):
    full, _ = full_batch(4)
    checkpointed, logs = one_step_update(
        tmp_path, 4, 1, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert "feedback_loss" in logs
    assert relative_difference(checkpointed, full) < 1e-5


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {"preserve_rng_state": True}])
def test_reentrant_checkpointing_with_feedback_is_refused_up_front(tmp_path, kwargs):
    # torch < 2.9's checkpoint (and torch 2.13's, with a warning) is reentrant when use_reentrant is not given
    with pytest.raises(ValueError, match=r"use_reentrant=True.*feedback.*use_reentrant.: false"):
        make_trainer(tmp_path, 4, 1, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    # without the feedback pass, reentrant checkpointing is the user's choice
    make_trainer(
        tmp_path, 4, 1, feedback=0, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs
    )


def test_reentrant_setting_is_read_from_the_command_line():
    required = ["--model_name_or_path", "base/", "--data_path", "data.json", "--output_dir", "run/"]

    def reentrant(*flags):
        return reentrant_checkpointing(parse_args([*required, "--use_cpu", "true", *flags])[1])

    assert reentrant(
        "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'
    )
    assert not reentrant(
        "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}'
    )
    assert not reentrant("--gradient_checkpointing", "true")  # transformers' default: non-reentrant
    assert not reentrant(
        "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"every_n_layers": 2}'
    )
    assert not reentrant("--gradient_checkpointing_kwargs", '{"use_reentrant": true}')  # checkpointing off


def test_a_loss_from_the_logits_alone_is_refused(tmp_path):
    # Trainer's label smoother would replace the model's loss and drop the DeFT terms
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1"):
        make_trainer(tmp_path, 4, 1, label_smoothing_factor=0.1)


def test_the_model_weights_the_deft_losses_by_its_share_of_the_batch_images():
    model = tiny.model(seed=0, use_deft=True, deft_retention_ratio=RATIO, deft_rtd_loss_weight=1e3).train()
    processor = tiny.processor(use_deft=True, deft_retention_ratio=RATIO)
    inputs = processor(images=tiny.images(2), text=[tiny.prompt() + " a cat"] * 2, return_tensors="pt")
    inputs["labels"] = inputs["input_ids"].clone()
    with torch.no_grad():
        whole = model(**inputs)
        part = model(**inputs, deft_num_images_in_batch=8)  # these 2 images are a quarter of the batch
    assert whole.rtd_loss > 0 and float(part.rtd_loss) == float(whole.rtd_loss)
    # the weight makes the RTD term (MSE ~ 1e-5 in the tiny model) stand out of the LM loss in float32
    assert float(whole.loss - whole.lm_loss) == pytest.approx(1e3 * float(whole.rtd_loss), rel=1e-4)
    assert float(part.loss - part.lm_loss) == pytest.approx(1e3 * float(part.rtd_loss) / 4, rel=1e-4)
    with pytest.raises(ValueError, match="deft_num_images_in_batch must count every image.*got 1.*holds 2"):
        model(**inputs, deft_num_images_in_batch=1)


TWO_PROCESSES = """
import os, sys, pathlib, torch
import test_training_equivalence as t
out = pathlib.Path(sys.argv[1])
delta, logs = t.one_step_update(out, 2, 1)
if int(os.environ["RANK"]) == 0:
    torch.save({"delta": delta, "logs": logs}, out / "two_processes.pt")
"""


@pytest.mark.slow  # starts 2 processes (about 20 s on 2 cores)
def test_two_processes_equal_the_full_batch(full_batch, tmp_path):
    full, full_logs = full_batch(4)
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESSES)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "two_processes.pt")
    assert relative_difference(result["delta"], full) < 1e-5  # measured 4e-7
    for name in ("loss", "lm_loss", "rtd_loss", "feedback_loss"):
        assert result["logs"][name] == pytest.approx(full_logs[name], rel=1e-5, abs=2e-6), name
