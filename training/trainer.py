"""`DeftLlavaTrainer`: `transformers.Trainer` with DeFT's feedback-guided scoring and atomic checkpoints.

Feedback-guided scoring (DeFT FGCS, `s_fb`) on a feedback step:

1. full-token pass: the image rows `(N, hidden_size)` per image come from `get_image_features` inside
   `model.model.compression_disabled()`, are detached with `requires_grad`, and go back into the model through
   `mm_encoder_outputs={"image": ...}` with the full-token ids (N placeholders per image);
2. `g = torch.autograd.grad(lm_loss_full, rows)`: the task-loss gradient per visual token (no parameter
   gradient is taken: this pass only measures what the task needs);
3. compressed pass: `model(..., deft_token_gradients=list(g))`. DeFT turns `g` into
   `s_fb = ||g|| * exp(-alpha_var * Var(g))`, mixes it into the scores, and returns `feedback_loss`, the MSE
   that pulls the learned saliency `s_sem` towards `s_fb`.

Total loss (computed by the model in training mode, `DeftLlavaCausalLMOutputWithPast`):
`loss = lm_loss + deft_rtd_loss_weight * rtd_loss + deft_feedback_loss_weight * feedback_loss`, where
`lm_loss` is the next-token loss of the compressed pass (mean over the answer tokens of the batch),
`rtd_loss` the RTD reconstruction MSE of the pruned tokens (present with `deft_enable_rtd`) and
`feedback_loss` is present on feedback steps only; both are means over the batch's images.

Gradient accumulation (and several processes, with `average_tokens_across_devices`) gives the same step as one
batch holding every sample. The Trainer counts the answer tokens of all micro-batches of an optimizer step
(`num_items_in_batch`, passed to the model: `lm_loss` is each micro-batch's token sum over that count); this
trainer also counts their images (`deft_num_images_in_batch`): the model weights each micro-batch's RTD and
feedback losses by its share of the images. The full-token feedback pass is normalised by the same
`num_items_in_batch`, so each sample's feedback gradient, and so its `s_fb`, does not depend on which
micro-batch it falls in. `lm_loss`, `rtd_loss` and `feedback_loss` are logged next to `loss`: the mean over
the answer tokens (`lm_loss`) or images (the DeFT terms) of the logging window, over all processes.

Activation checkpointing must be non-reentrant when the feedback pass is on (it takes `torch.autograd.grad`,
which reentrant checkpointing refuses): the trainer raises a `ValueError` at construction otherwise.

Checkpoints and the final adapter are kill-safe (`utilities/atomic_write.py`; docs/reliability.md):

- a checkpoint is written to `<output_dir>/.tmp-checkpoint-<step>/checkpoint-<step>`; once every process has
  written its part, `save_complete.json` (every file and its size) is written last and the folder is moved to
  `checkpoint-<step>` (swapped in one step when that step is saved again, e.g. after resuming from an older
  checkpoint). Only folders whose marker matches their files count as checkpoints (`last_complete_checkpoint`);
- rotation (`save_total_limit`) renames an old checkpoint to a hidden trash name before deleting it;
- the final `save_model()` goes to `<output_dir>/.tmp-final/`, is marked complete, then its files are moved into
  `output_dir` one by one (the weights last, the marker after them); a kill part-way is finished by the next run;
- `recover_output_dir` (run by `train` before resuming) finishes or undoes what a killed run left;
- resuming from a checkpoint at or past the run's last step trains nothing (`finished_before` is then True).
"""

from __future__ import annotations

import logging
import os
import re

import torch
import torch.distributed as dist
from modeling_deft_llava.utilities.atomic_write import (
    MARKER,
    fsync_dir,
    is_complete,
    mark_complete,
    marker,
    place,
    recover_all,
    remove_tree,
)
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_deft_llava.modeling_outputs_deft_llava import DeftVisualFeaturesOutput

from .collator import IGNORE_INDEX

logger = logging.getLogger(__name__)

LOSS_COMPONENTS = ("lm_loss", "rtd_loss", "feedback_loss")
STAGING_PREFIX = ".tmp-checkpoint-"
FINAL_STAGING = ".tmp-final"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
NUM_IMAGES_KEY = "deft_num_images_in_batch"  # added to each micro-batch by `get_batch_samples`


def unwrap_deft_model(model):
    """The `DeftLlavaForConditionalGeneration` inside a `PeftModel` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def complete_checkpoints(output_dir) -> list[tuple[int, str]]:
    """`(step, path)` of every complete `checkpoint-<step>` folder of `output_dir`, oldest first; folders whose
    `save_complete.json` is missing or does not match their files are left out (and named in a warning)."""
    if not os.path.isdir(output_dir):
        return []
    found, incomplete = [], []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            (found if is_complete(path) else incomplete).append((int(match.group(1)), path))
    if incomplete:
        logger.warning(
            "ignoring incomplete checkpoint folder(s) %s (no %s matching their files: half-written, half-deleted, "
            "or written by an older version; pass --resume_from_checkpoint to use one anyway)",
            sorted(os.path.basename(p) for _, p in incomplete),
            MARKER,
        )
    return sorted(found)


def unmarked_checkpoints(output_dir) -> list[str]:
    """Names of the `checkpoint-<step>` folders of `output_dir` that are not complete (`complete_checkpoints`)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        name
        for name in os.listdir(output_dir)
        if _CHECKPOINT.fullmatch(name)
        and os.path.isdir(os.path.join(output_dir, name))
        and not is_complete(os.path.join(output_dir, name))
    )


def last_complete_checkpoint(output_dir) -> str | None:
    """Newest complete `checkpoint-<step>` folder of `output_dir` (checked by content, see `complete_checkpoints`)."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def final_save_complete(output_dir) -> bool:
    """The final `save_model()` of a run finished in `output_dir` (its marker matches the files)."""
    return is_complete(output_dir)


def recover_output_dir(output_dir) -> list[str]:
    """Finish or undo what a killed run left in `output_dir`; returns one line per action (also logged).

    - a staged checkpoint whose marker matches its files is moved into place when no complete folder holds its
      step (the work is kept); any other staged checkpoint is deleted;
    - a marked final save is moved into place (finishing a killed move); an unmarked one is deleted;
    - a folder renamed aside while being replaced is put back; trash is deleted (`atomic_write.recover`)."""
    if not os.path.isdir(output_dir):
        return []
    done = recover_all(output_dir)  # asides back first: a staged copy then only replaces a missing step
    for name in sorted(os.listdir(output_dir)):
        staging = os.path.join(output_dir, name)
        if name.startswith(STAGING_PREFIX):
            step = name[len(STAGING_PREFIX) :]
            staged = os.path.join(staging, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            final = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            if is_complete(staged) and not is_complete(final):
                place(staged, final, overwrite=True)
                done.append(f"moved the complete staged {PREFIX_CHECKPOINT_DIR}-{step} into place")
            remove_tree(staging, owner=final)
            done.append(f"deleted {name}")
        elif name == FINAL_STAGING:
            if marker(staging) is not None:
                _commit_final(staging, output_dir)
                done.append("finished moving the final save into place")
            remove_tree(staging)
            done.append(f"deleted {name}")
    if done:
        logger.warning("recovered %s after a killed run: %s", output_dir, "; ".join(done))
    return done


def _commit_final(staging: str, output_dir: str) -> None:
    """Move the marked final save in `staging` into `output_dir`: its marker first leaves `output_dir`, the files
    follow (weights last), the marker comes last. Restartable: it moves whatever is still in `staging`."""
    stale = os.path.join(output_dir, MARKER)
    if os.path.exists(stale):
        os.unlink(stale)
        fsync_dir(output_dir)
    names = sorted(n for n in os.listdir(staging) if n != MARKER)
    names.sort(key=lambda n: n.endswith(".safetensors"))  # the weights last
    for name in names:
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(source):
            place(source, target, overwrite=True)
        else:
            os.replace(source, target)
    fsync_dir(output_dir)
    os.replace(os.path.join(staging, MARKER), stale)
    fsync_dir(output_dir)


def rotate_complete_checkpoints(output_dir, save_total_limit, best_model_checkpoint=None) -> None:
    """Keep the newest `save_total_limit` complete checkpoints (and the best one); delete the others through trash
    (`remove_tree`), so a kill never leaves a half-deleted checkpoint under its name."""
    if not save_total_limit or save_total_limit <= 0:
        return
    found = [os.path.abspath(path) for _, path in complete_checkpoints(output_dir)]
    protected = set(found[-1:])  # the newest, to resume from
    if best_model_checkpoint:
        protected.add(os.path.abspath(best_model_checkpoint))
    excess = len(found) - max(save_total_limit, len(protected))
    for path in found:
        if excess <= 0:
            break
        if path not in protected:
            remove_tree(path)
            excess -= 1


def checkpointing_settings(args) -> tuple[str, bool, dict | None]:
    """`(flag name, enabled, kwargs)` of activation checkpointing in `TrainingArguments`: `activation_checkpointing*`
    in recent transformers (`gradient_checkpointing*` mirror them as deprecated aliases), `gradient_checkpointing*`
    in older ones (5.18)."""
    name = (
        "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    )
    return name, bool(getattr(args, name)), getattr(args, f"{name}_kwargs")


def reentrant_checkpointing(args) -> bool:
    """Whether the Trainer will enable reentrant activation checkpointing (`torch.utils.checkpoint`)."""
    _, enabled, kwargs = checkpointing_settings(args)
    if not enabled:
        return False
    # `every_n_layers` and `offload` are the Trainer's own keys; the rest goes to torch's checkpoint
    kwargs = {k: v for k, v in dict(kwargs or {}).items() if k not in ("every_n_layers", "offload")}
    if not kwargs:
        return False  # transformers then passes use_reentrant=False
    return bool(kwargs.get("use_reentrant", True))  # torch's checkpoint: reentrant when not given


class DeftLlavaTrainer(Trainer):
    """`Trainer` for DeFT-LLaVA (module docstring).

    Args (beyond `Trainer`):
        feedback_every_n_steps: run the full-token feedback pass on optimizer steps where
            `global_step % n == 0` (1 = every step, 0 = never). Needs a collator that writes the `full_*`
            inputs (`DeftLlavaDataCollator` with `full_processor`).
    """

    def __init__(self, *args, feedback_every_n_steps: int = 1, **kwargs):
        if not isinstance(feedback_every_n_steps, int) or feedback_every_n_steps < 0:
            raise ValueError(f"feedback_every_n_steps must be an int >= 0, got {feedback_every_n_steps!r}")
        super().__init__(*args, **kwargs)
        self.feedback_every_n_steps = feedback_every_n_steps
        if feedback_every_n_steps > 0 and reentrant_checkpointing(self.args):
            name, _, kwargs = checkpointing_settings(self.args)
            raise ValueError(
                f"{name} with use_reentrant=True ({name}_kwargs={kwargs!r}; torch's checkpoint is reentrant when "
                f"use_reentrant is not given) cannot run the feedback pass (feedback_every_n_steps="
                f"{feedback_every_n_steps}): it takes torch.autograd.grad, which reentrant checkpointing refuses. "
                f"Use --{name}_kwargs '{{\"use_reentrant\": false}}' (or no kwargs: transformers then uses "
                "it), or turn feedback off with --feedback_every_n_steps 0"
            )
        if self.label_smoother is not None or self.compute_loss_func is not None:
            # Trainer would compute the loss from the logits alone: the DeFT losses would be dropped silently
            raise ValueError(
                "DeftLlavaTrainer trains on the model's own loss (language model + DeFT terms); "
                f"label_smoothing_factor={self.args.label_smoothing_factor} and compute_loss_func="
                f"{self.compute_loss_func!r} are not supported (use 0 and None)"
            )
        self._component_sums = torch.zeros(len(LOSS_COMPONENTS), dtype=torch.float64)
        self._component_counts = torch.zeros(len(LOSS_COMPONENTS), dtype=torch.float64)
        self._staging_dir = None
        self.finished_before = False  # set in `train()`: resumed at or past the last step, nothing trained

    # ------------------------------------------------------------------ loss
    def feedback_step(self) -> bool:
        n = self.feedback_every_n_steps
        return n > 0 and self.state.global_step % n == 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their answer-token count (`Trainer`); each micro-batch also
        gets the step's image count (`deft_num_images_in_batch`), over all processes when the token count is."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items_in_batch is None:
            return batch_samples, num_items_in_batch
        images = sum(  # images and videos: the items DeFT's per-item losses average over
            b[key].shape[0]
            for b in batch_samples
            for key in ("pixel_values", "pixel_values_videos")
            if b.get(key) is not None
        )
        # over all processes exactly when Trainer counts the tokens over all processes
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            images = int(self.accelerator.gather(torch.tensor([images], device=device)).sum())
        for batch in batch_samples:
            batch[NUM_IMAGES_KEY] = images
        return batch_samples, num_items_in_batch

    def feedback_gradients(self, model, inputs: dict, full_inputs: dict, **loss_kwargs) -> list[torch.Tensor]:
        """Per image, then per video, `(N, hidden_size)` gradients of the full-token task loss w.r.t. its
        projected rows (`feedback_gradients` below, on the unwrapped model: no DDP hooks, only the rows get a
        gradient); `inputs` gives `pixel_values` and/or `pixel_values_videos`."""
        module = self.accelerator.unwrap_model(model)
        return feedback_gradients(
            module,
            full_inputs,
            pixel_values=inputs.get("pixel_values"),
            pixel_values_videos=inputs.get("pixel_values_videos"),
            **loss_kwargs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        num_images = inputs.pop(NUM_IMAGES_KEY, None)
        full_inputs = {k[len("full_") :]: inputs.pop(k) for k in list(inputs) if k.startswith("full_")}
        # as Trainer decides: the loss is normalised over the whole batch (not divided by the accumulation steps)
        whole_batch = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss_kwargs = {"num_items_in_batch": num_items_in_batch} if whole_batch else {}
        has_visual = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
        if model.training and full_inputs and self.feedback_step() and has_visual:
            inputs["deft_token_gradients"] = self.feedback_gradients(
                model, inputs, full_inputs, **loss_kwargs
            )
        if model.training and whole_batch and num_images:
            inputs[NUM_IMAGES_KEY] = num_images
        # Trainer passes num_items_in_batch on and scales for several processes
        loss, outputs = super().compute_loss(
            model, {**inputs, "use_cache": False}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            self._record_components(outputs, inputs, num_items_in_batch if whole_batch else None)
        return (loss, outputs) if return_outputs else loss

    def _record_components(self, outputs, inputs, num_items_in_batch) -> None:
        """Add this micro-batch's loss components to the window's sums: `lm_loss` per answer token, the DeFT
        terms per image (the weights the batch loss gives them)."""
        labels, pixel_values = inputs.get("labels"), inputs.get("pixel_values")
        # the causal LM loss predicts labels[..., 1:]
        tokens = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
        images = pixel_values.shape[0] if pixel_values is not None else 0
        for i, name in enumerate(LOSS_COMPONENTS):
            value = getattr(outputs, name, None)
            weight = tokens if name == "lm_loss" else images
            if value is None or weight == 0:
                continue
            value = float(value.detach().float())
            if name == "lm_loss" and num_items_in_batch is not None:  # the token sum over the batch's tokens
                self._component_sums[i] += value * float(num_items_in_batch)
            else:  # a mean over this micro-batch's tokens or images
                self._component_sums[i] += value * weight
            self._component_counts[i] += weight

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the loss components of the window
            sums, counts = self._component_sums.clone(), self._component_counts.clone()
            if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
                packed = torch.cat([sums, counts]).to(self.args.device)
                dist.all_reduce(packed)
                sums, counts = packed.cpu().split(len(LOSS_COMPONENTS))
            for i, name in enumerate(LOSS_COMPONENTS):
                if counts[i] > 0:
                    logs[name] = round(float(sums[i] / counts[i]), 6)
            self._component_sums.zero_()
            self._component_counts.zero_()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ the end of a run
    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        """As `Trainer`, but a run resumed at (or past) its last step trains nothing: `Trainer` would enter the
        epoch loop and train one step more before checking `max_steps` whenever the end is not an epoch end."""
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs
        )
        self.finished_before = self.state.global_step >= max_steps
        if self.finished_before:
            logger.info(
                "the checkpoint is at step %d of %d: nothing left to train", self.state.global_step, max_steps
            )
            return num_train_epochs, 0  # the epoch loop `range(epochs_trained, num_train_epochs)` is empty
        return epochs_trained, steps_in_epoch

    def _finalize_training(self, *args, **kwargs):
        # Trainer deletes every checkpoint but the best with save_total_limit=1 using rmtree: through trash here
        if self.args.should_save and self.state.best_model_checkpoint and self.args.save_total_limit == 1:
            best = os.path.abspath(self.state.best_model_checkpoint)
            for _, path in complete_checkpoints(self.args.output_dir):
                if os.path.abspath(path) != best:
                    remove_tree(path)
        return super()._finalize_training(*args, **kwargs)

    # ------------------------------------------------------------------ atomic checkpoints
    def _get_output_dir(self, trial):
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{self.state.global_step}")
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self._barrier()  # every process has written its part (RNG states are per process)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            mark_complete(os.path.join(staging, name), global_step=self.state.global_step)
            # the same step saved again (resumed from an older checkpoint): swapped in one step, old one deleted
            place(os.path.join(staging, name), final, overwrite=True)
            remove_tree(staging, owner=final)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = final
            rotate_complete_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self._barrier()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As `Trainer.save_model`; a save into the run's `output_dir` (the final adapter) is staged in
        `.tmp-final/`, marked complete, then moved into place (module docstring)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            return super().save_model(output_dir, _internal_call)  # e.g. a checkpoint's staging folder
        staging = os.path.join(output_dir, FINAL_STAGING)
        if self.args.should_save and os.path.exists(staging):
            remove_tree(staging)  # left by a failed save of this process
        self._barrier()
        super().save_model(staging, _internal_call=True)
        self._barrier()
        if self.args.should_save:
            mark_complete(staging, global_step=self.state.global_step)
            _commit_final(staging, output_dir)
            remove_tree(staging)
        self._barrier()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=getattr(self.args, "hub_revision", None))

    def _barrier(self):
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()


def feedback_gradients(
    model,
    full_inputs: dict,
    pixel_values: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    **loss_kwargs,
) -> list[torch.Tensor]:
    """DeFT's task-loss feedback: per image, then per video, the `(N, hidden_size)` gradient of the full-token
    task loss (`full_inputs`: `input_ids`, `attention_mask`, `labels` with every placeholder) w.r.t. that item's
    projected rows, for `forward(deft_token_gradients=...)`. The encoder runs without gradients and with
    compression off; only the rows get a gradient (no weight's `.grad` changes). A row the loss does not reach
    gets zeros.

    `loss_kwargs` (`num_items_in_batch`) normalise that loss as the compressed pass's `lm_loss` is: by the
    answer tokens of the whole batch, so a sample's gradient does not depend on its micro-batch.

    Raises:
        ValueError: neither `pixel_values` nor `pixel_values_videos` is given.
    """
    if pixel_values is None and pixel_values_videos is None:
        raise ValueError("feedback_gradients needs pixel_values and/or pixel_values_videos, got neither")
    inner = unwrap_deft_model(model).model
    encoded, rows = {}, []
    with torch.enable_grad(), inner.compression_disabled():
        for modality, pixels in (("image", pixel_values), ("video", pixel_values_videos)):
            if pixels is None:
                continue
            with torch.no_grad():
                features = (inner.get_image_features if modality == "image" else inner.get_video_features)(
                    pixels, return_dict=True
                )
            items = [r.detach().requires_grad_(True) for r in features.pooler_output]  # each (N, D)
            rows += items
            encoded[modality] = DeftVisualFeaturesOutput(
                pooler_output=items,
                source_indices=features.source_indices,
                num_source_tokens=features.num_source_tokens,
            )
        full = model(
            input_ids=full_inputs["input_ids"],
            attention_mask=full_inputs["attention_mask"],
            labels=full_inputs["labels"],
            mm_encoder_outputs=encoded,
            use_cache=False,
            **loss_kwargs,
        )
        grads = torch.autograd.grad(full.lm_loss, rows, allow_unused=True)
    return [g.detach() if g is not None else torch.zeros_like(r) for g, r in zip(grads, rows)]


__all__ = [
    "DeftLlavaTrainer",
    "FINAL_STAGING",
    "LOSS_COMPONENTS",
    "STAGING_PREFIX",
    "complete_checkpoints",
    "feedback_gradients",
    "final_save_complete",
    "last_complete_checkpoint",
    "recover_output_dir",
    "rotate_complete_checkpoints",
    "unmarked_checkpoints",
    "unwrap_deft_model",
]
