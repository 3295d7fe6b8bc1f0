"""`DeftLlavaFinetuneArguments`: the fine-tuning options that `TrainingArguments` does not already have.

Parsed together with `transformers.TrainingArguments` by `HfArgumentParser` (`train.py`); every field has a
`help` text, shown by `python -m modeling_deft_llava.training.train --help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import FORMATS
from .lora import DEFAULT_LORA_TARGETS


@dataclass
class DeftLlavaFinetuneArguments:
    """Model, data, LoRA and DeFT-feedback options of a fine-tuning run."""

    model_name_or_path: str = field(
        metadata={
            "help": "A DeFT-LLaVA folder (e.g. written by modeling_deft_llava.hub_card.export_for_hub) with its "
            "processor. The adapter records this path as its base model."
        }
    )
    data_path: str = field(
        metadata={
            "help": "Training data: a LLaVA conversation .json/.jsonl file, a .parquet file or folder of them, "
            "or an imagefolder folder (images + metadata.jsonl). See training/README.md for the layouts."
        }
    )
    data_format: str = field(default="auto", metadata={"help": f"One of {FORMATS}; auto = by file suffix."})
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths resolve against (default: the data file's folder)."
        },
    )
    max_length: int | None = field(
        default=2048,
        metadata={
            "help": "Longest sample in tokens (the full-token encoding counts when feedback is on). Longer "
            "samples lose answer tokens at the right end; samples whose prompt and image blocks do not fit "
            "are skipped at load time and counted in the log."
        },
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={
            "help": "Skip invalid rows (missing image, placeholder mismatch, no answer) with a count in the log "
            "instead of stopping with an error that names the file and row."
        },
    )
    use_lora: bool = field(
        default=True, metadata={"help": "LoRA on the language model; off = train only the full modules."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default=",".join(DEFAULT_LORA_TARGETS),
        metadata={
            "help": "Comma-separated layer names to adapt, matched inside the language model only (a regex "
            "that cannot reach the vision tower is built from them)."
        },
    )
    train_deft_modules: bool = field(
        default=True,
        metadata={
            "help": "Train the DeFT modules (SAM, saliency MLP, mixture, RTD) in full (modules_to_save)."
        },
    )
    train_projector: bool = field(
        default=True, metadata={"help": "Train the multi-modal projector in full (modules_to_save)."}
    )
    feedback_every_n_steps: int = field(
        default=1,
        metadata={
            "help": "Feedback-guided scoring: run the full-token pass whose task-loss gradient gives DeFT its "
            "s_fb score on optimizer steps where step %% n == 0 (1 = every step, 0 = off). It costs one "
            "extra forward and backward of the full-token sequence."
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Resume from the newest complete checkpoint-* in output_dir (its save_complete.json matches "
            "its files), after repairing what a killed run left. Starts fresh, with a warning, when output_dir "
            "holds no checkpoint folder; refused when it holds only incomplete ones."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in a non-empty output_dir: its previous contents (checkpoints, adapter, "
            "anything else), and those of merge_output_dir, are deleted first. Without it (or --resume), a "
            "non-empty output_dir or merge_output_dir is refused, so a second run never overwrites a first one. "
            "(TrainingArguments dropped this flag in transformers 5.)"
        },
    )
    merge_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "After training, merge the LoRA weights and write a full DeFT-LLaVA Hub folder here "
            "(export_for_hub layout)."
        },
    )

    def __post_init__(self):
        if self.data_format not in FORMATS:
            raise ValueError(f"data_format must be one of {FORMATS}, got {self.data_format!r}")
        if self.feedback_every_n_steps < 0:
            raise ValueError(f"feedback_every_n_steps must be >= 0, got {self.feedback_every_n_steps}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.overwrite_output_dir and self.resume:
            raise ValueError(
                "resume=True continues the run in output_dir; overwrite_output_dir=True deletes it"
            )
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")

    @property
    def lora_target_list(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


__all__ = ["DeftLlavaFinetuneArguments"]
